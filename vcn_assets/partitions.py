"""One dynamic partition per movie."""

from __future__ import annotations

import re
import unicodedata

import dagster as dg

movies = dg.DynamicPartitionsDefinition(name="movies")

_SLUG_MAX = 64


def movie_slug(name: str) -> str:
    """A partition key from a file name: lowercase ASCII letters, digits and dashes.

    Dagster partition keys may not contain commas (backfills list keys with them);
    slugs also read well in the UI, in paths and in SQL.
    """
    ascii_name = unicodedata.normalize("NFKD", name).encode("ascii", "ignore").decode()
    slug = re.sub(r"[^a-z0-9]+", "-", ascii_name.lower()).strip("-")[:_SLUG_MAX].strip("-")
    return slug or "movie"


def validate_movie_id(movie_id: str) -> str:
    """Checks a user-given movie id is a usable partition key."""
    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,127}", movie_id):
        raise ValueError(
            f"invalid movie id {movie_id!r}: use letters, digits, '-', '_' and '.', starting with a letter or digit"
        )
    return movie_id
