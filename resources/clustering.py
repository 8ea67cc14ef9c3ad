"""How a movie's crops are compared, as a Dagster resource: one setting for the assets that depend on it."""

from __future__ import annotations

from typing import Literal

import dagster as dg
from pydantic import Field


class ClusteringResource(dg.ConfigurableResource):
    """The similarity a movie's tracks are clustered by.

    Two assets act on it: ``track_embeddings`` gives the loss metric's logits
    (of a bounded sample of the crops, while it has the chips decoded) only when
    the clustering will use them, and ``face_clusters`` clusters by it. One
    resource keeps them from disagreeing.
    """

    similarity: Literal["cosine", "loss"] = Field(
        default="cosine",
        description=(
            "How crops are compared: 'cosine' between the movie's (finetuned) embeddings, or 'loss', the finetuned "
            "model's own loss, the paper's metric, read as a divergence between tracks (each track's own loss "
            "subtracted; falls back to cosine when the movie has no finetuned model; see the README). Changing "
            "it means re-materialising track_embeddings as well as face_clusters (the recluster job does both)."
        ),
    )
