"""Track datasets in format v1: reading tracks, crops and ground truth; writing and reading predictions.

A track dataset (``shared/formats/trackset-v1.md``) is a folder of face tracks
detected and tracked elsewhere, as the research protocol of BBT / Buffy has it:
we cluster the literature's tracks, not our own::

    DIR/
      tracks.csv   track_id,shot_id,start_frame,end_frame
      crops.csv    track_id,frame,path
      labels.csv   track_id,identity   (optional ground truth)

Malformed files raise :class:`TracksetError` naming the file and line. Problems
confined to one track (no crops, a missing crop file, a crop outside the
track's frames) are not errors: they are returned as :class:`TrackProblem` and
the track is left Unknown, so one bad track does not cost the whole episode.

Ground truth is kept apart on purpose: :func:`read_trackset` only notes that
``labels.csv`` exists and never opens it; :func:`read_trackset_labels` (or
:func:`read_labels`, for a file kept elsewhere) reads it for evaluation.
Predictions, ``track_id,cluster``, are written by :func:`write_predictions` and
read back by :func:`read_predictions`.
"""

from __future__ import annotations

import csv
import math
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Sequence

import polars as pl

from vcn.errors import VcnError
from vcn.stores.files import atomic_path

TRACKS_FILE = "tracks.csv"
CROPS_FILE = "crops.csv"
LABELS_FILE = "labels.csv"

TRACK_COLUMNS = ("track_id", "shot_id", "start_frame", "end_frame")
CROP_COLUMNS = ("track_id", "frame", "path")

TRACKS_SCHEMA = {"track_id": pl.String, "shot_id": pl.String, "start_frame": pl.Int64, "end_frame": pl.Int64}
CROPS_SCHEMA = {"track_id": pl.String, "frame": pl.Int64, "path": pl.String}

#: An integer as the format means it: optional sign and decimal digits. Python's
#: ``int`` would also take "1_000" and surrounding spaces; a frame "12.0" is refused.
_INTEGER = re.compile(r"[+-]?[0-9]+")
#: Frames are stored as Int64; a longer or larger number is refused, not wrapped.
_INT64_MIN, _INT64_MAX = -(2**63), 2**63 - 1
_INT64_DIGITS = len(str(_INT64_MAX))
_NOT_FOUND = "does not exist"
#: A Windows drive ("C:") or UNC/backslash root: absolute on some platform.
_WINDOWS_ABSOLUTE = re.compile(r"^(?:[A-Za-z]:|[\\/])")


class TracksetError(VcnError, ValueError):
    """A track dataset file is missing or malformed.

    Attributes:
        path: The offending file (or folder).
        line: 1-based line of the file, the header being line 1; ``None`` when
            the problem is the file as a whole.
        reason: What is wrong, without the location.
    """

    def __init__(self, path: object, reason: str, line: int | None = None) -> None:
        self.path = str(path)
        self.line = line
        self.reason = reason
        where = self.path if line is None else f"{self.path}, line {line}"
        super().__init__(f"{where}: {reason}")


@dataclass(frozen=True)
class TrackProblem:
    """Why one track is left Unknown.

    Attributes:
        track_id: The track, as in ``tracks.csv``.
        reason: What is wrong with it, naming the file and line where one applies.
    """

    track_id: str
    reason: str


@dataclass(frozen=True, eq=False)
class TrackSet:
    """A track dataset as read from disk.

    Attributes:
        root: The dataset folder; crop paths are relative to it.
        tracks: One row per track, in file order: ``track_id`` (str),
            ``shot_id`` (str), ``start_frame``, ``end_frame`` (Int64, inclusive).
        crops: One row per crop, in file order: ``track_id`` (str), ``frame``
            (Int64), ``path`` (str, relative to ``root`` as written in the file).
        problems: Per-track problems found while reading; those tracks are to
            be left Unknown.
        has_labels: Whether ``labels.csv`` exists (it is not read; see
            :func:`read_trackset_labels`).
    """

    root: Path
    tracks: pl.DataFrame
    crops: pl.DataFrame
    problems: list[TrackProblem]
    has_labels: bool

    @property
    def problem_track_ids(self) -> set[str]:
        """Ids of the tracks that have at least one problem."""
        return {problem.track_id for problem in self.problems}

    def crop_paths(self) -> list[Path]:
        """Absolute path of every crop, row-aligned with :attr:`crops`."""
        return [self.root / path for path in self.crops["path"]]


def read_trackset(directory: str | os.PathLike[str]) -> TrackSet:
    """Reads a track dataset in format v1.

    Every value is read as text first, so ids like ``"007"`` stay strings;
    frames are then parsed as integers. ``labels.csv`` is never opened.

    Args:
        directory: The dataset folder.

    Returns:
        The tracks and crops with the per-track problems found: a track with no
        crops, a crop file that does not exist, a crop frame outside its
        track's ``[start_frame, end_frame]``.

    Raises:
        TracksetError: If the folder, ``tracks.csv`` or ``crops.csv`` is missing,
            a file is empty or lacks a column, a row has the wrong number of
            fields, an id is empty, a frame is not an integer, a track starts
            after it ends, a track id repeats, a crop (track, frame) repeats, a
            crop names a track absent from ``tracks.csv``, a crop path is
            absolute or leaves the folder, or there are no tracks at all.
    """
    root = _existing_directory(directory)
    tracks = _read_tracks(root / TRACKS_FILE)
    crops, crop_lines = _read_crops(root / CROPS_FILE, tracks)
    problems = _track_problems(root, tracks, crops, crop_lines)
    return TrackSet(
        root=root,
        tracks=tracks,
        crops=crops,
        problems=problems,
        has_labels=_file_problem(root / LABELS_FILE) is None,
    )


@dataclass(frozen=True)
class Labels:
    """A ground-truth file as read.

    Attributes:
        identities: ``track_id -> identity``, both strings as written, in file order.
        lines: ``track_id ->`` the line it stands on, to name it in later errors.
    """

    identities: dict[str, str]
    lines: dict[str, int]


def read_trackset_labels(directory: str | os.PathLike[str]) -> dict[str, str]:
    """Reads the ground truth of a track dataset, for evaluation only.

    Args:
        directory: The dataset folder.

    Returns:
        ``track_id -> identity``, both strings as written.

    Raises:
        TracksetError: If the folder or its ``labels.csv`` is missing, or
            :func:`read_labels` refuses the file.
    """
    return read_labels(_existing_directory(directory) / LABELS_FILE).identities


def read_labels(path: str | os.PathLike[str]) -> Labels:
    """Reads a ground-truth file ``track_id,identity`` (a dataset's ``labels.csv``, or one kept elsewhere).

    Every identity must be non-empty: an unlabelled track belongs out of the
    file, not in it.

    Raises:
        TracksetError: If the file is missing, empty or lacks a column, a row
            is malformed, an id or identity is empty, or a track id repeats.
    """
    identities, lines = _track_column(Path(path), "identity", required=True)
    return Labels(identities, lines)


def read_predictions(path: str | os.PathLike[str]) -> dict[str, str | None]:
    """Reads predictions ``track_id,cluster`` as :func:`write_predictions` writes them.

    Returns:
        ``track_id -> cluster`` as written, ``None`` for an empty ``cluster``
        (a track left Unknown).

    Raises:
        TracksetError: If the file is missing, empty or lacks a column, a row
            is malformed, an id is empty, or a track id repeats.
    """
    clusters, _ = _track_column(Path(path), "cluster", required=False)
    return {track_id: cluster or None for track_id, cluster in clusters.items()}


def write_predictions(
    path: str | os.PathLike[str],
    track_ids: Sequence[str],
    clusters: Sequence[str | int | None],
) -> None:
    """Writes ``track_id,cluster`` predictions, atomically.

    The file is written beside ``path`` under a temporary name and moved into
    place, so a reader never sees half a file and a crash leaves the old one.

    Args:
        path: Destination CSV.
        track_ids: One id per track (all tracks of ``tracks.csv``).
        clusters: The cluster of each track; ``None`` (or NaN) for a track left
            Unknown, written as an empty field.

    Raises:
        ValueError: If the lengths differ or a track id repeats.
    """
    track_ids = [str(track_id) for track_id in track_ids]
    clusters = list(clusters)
    if len(track_ids) != len(clusters):
        raise ValueError(f"{len(track_ids)} track ids but {len(clusters)} clusters")
    seen: set[str] = set()
    for track_id in track_ids:
        if track_id in seen:
            raise ValueError(f"duplicate track id {track_id!r} in predictions")
        seen.add(track_id)

    with atomic_path(path) as temporary:
        with open(temporary, "w", newline="", encoding="utf-8") as file:
            writer = csv.writer(file, lineterminator="\n")
            writer.writerow(["track_id", "cluster"])
            writer.writerows(zip(track_ids, map(_cluster_text, clusters)))


def _cluster_text(cluster: object) -> str:
    """A cluster label as written; empty for Unknown."""
    if cluster is None or (isinstance(cluster, float) and math.isnan(cluster)):
        return ""
    return str(cluster)


def _existing_directory(directory: str | os.PathLike[str]) -> Path:
    root = Path(directory)
    try:
        exists, is_dir = root.exists(), root.is_dir()
    except OSError as error:
        raise TracksetError(root, f"cannot access the track dataset folder ({error.strerror or error})") from None
    if not exists:
        raise TracksetError(root, "track dataset folder does not exist")
    if not is_dir:
        raise TracksetError(root, "not a folder (a track dataset is a folder holding tracks.csv and crops.csv)")
    return root


def _rows(path: Path, columns: Sequence[str]) -> Iterator[tuple[int, dict[str, str]]]:
    """The data rows of a CSV file as ``(line, {column: stripped text})``.

    Extra columns are allowed and ignored; blank lines are skipped.
    """
    problem = _file_problem(path)
    if problem:
        raise TracksetError(path, "file not found" if problem == _NOT_FOUND else f"file {problem}")
    try:
        file = open(path, newline="", encoding="utf-8-sig")
    except OSError as error:
        raise TracksetError(path, f"cannot be read ({error.strerror or error})") from None
    with file:
        reader = csv.reader(file)
        try:
            header = next(reader, None)
            if header is None:
                raise TracksetError(path, f"empty file; expected a header {','.join(columns)}")
            header = [name.strip() for name in header]
            missing = [name for name in columns if name not in header]
            if missing:
                raise TracksetError(
                    path, f"missing column(s) {', '.join(missing)}; found columns: {', '.join(header)}", 1
                )
            positions = {name: header.index(name) for name in columns}
            for fields in reader:
                if not fields or (len(fields) == 1 and not fields[0].strip()):
                    continue
                if len(fields) != len(header):
                    raise TracksetError(path, f"expected {len(header)} fields, got {len(fields)}", reader.line_num)
                yield reader.line_num, {name: fields[i].strip() for name, i in positions.items()}
        except csv.Error as error:
            raise TracksetError(path, f"malformed CSV: {error}", reader.line_num) from None
        except UnicodeDecodeError as error:
            raise TracksetError(path, f"not UTF-8 text: {error.reason}") from None


def _nonempty(path: Path, line: int, row: dict[str, str], column: str) -> str:
    value = row[column]
    if not value:
        raise TracksetError(path, f"empty {column}", line)
    return value


def _track_column(path: Path, column: str, required: bool) -> tuple[dict[str, str], dict[str, int]]:
    """``track_id -> column`` of a per-track CSV file, with the line of each track.

    Args:
        path: The file.
        column: The value column.
        required: Whether an empty value is an error (else it reads as "").
    """
    values: dict[str, str] = {}
    lines: dict[str, int] = {}
    for line, row in _rows(path, ("track_id", column)):
        track_id = _nonempty(path, line, row, "track_id")
        value = _nonempty(path, line, row, column) if required else row[column]
        if track_id in values:
            raise TracksetError(path, f"duplicate track_id {track_id!r} (first on line {lines[track_id]})", line)
        values[track_id] = value
        lines[track_id] = line
    return values, lines


def _integer(path: Path, line: int, row: dict[str, str], column: str) -> int:
    value = row[column]
    if not _INTEGER.fullmatch(value):
        raise TracksetError(path, f"{column} must be an integer, got {value!r}", line)
    # Leading zeros dropped and the length checked first: int() refuses more than 4300 digits.
    sign, digits = ("-" if value[0] == "-" else ""), value.lstrip("+-").lstrip("0") or "0"
    number = int(sign + digits) if len(digits) <= _INT64_DIGITS else None
    if number is None or not _INT64_MIN <= number <= _INT64_MAX:
        shown = value if len(value) <= 40 else f"{value[:20]}...{value[-10:]} ({len(value)} characters)"
        raise TracksetError(path, f"{column} {shown} is out of range (64-bit integers only)", line)
    return number


def _read_tracks(path: Path) -> pl.DataFrame:
    columns: dict[str, list] = {name: [] for name in TRACK_COLUMNS}
    first_line: dict[str, int] = {}
    for line, row in _rows(path, TRACK_COLUMNS):
        track_id = _nonempty(path, line, row, "track_id")
        shot_id = _nonempty(path, line, row, "shot_id")
        start = _integer(path, line, row, "start_frame")
        end = _integer(path, line, row, "end_frame")
        if start > end:
            raise TracksetError(path, f"track {track_id!r}: start_frame {start} > end_frame {end}", line)
        if track_id in first_line:
            raise TracksetError(
                path, f"duplicate track_id {track_id!r} (first on line {first_line[track_id]})", line
            )
        first_line[track_id] = line
        for name, value in zip(TRACK_COLUMNS, (track_id, shot_id, start, end)):
            columns[name].append(value)
    if not first_line:
        raise TracksetError(path, "no tracks (the file has a header but no rows)")
    return pl.DataFrame(columns, schema=TRACKS_SCHEMA)


def _read_crops(path: Path, tracks: pl.DataFrame) -> tuple[pl.DataFrame, list[int]]:
    """The crops table and, row-aligned, the line of each row in ``crops.csv``."""
    known = set(tracks["track_id"])
    columns: dict[str, list] = {name: [] for name in CROP_COLUMNS}
    lines: list[int] = []
    first_line: dict[tuple[str, int], int] = {}
    for line, row in _rows(path, CROP_COLUMNS):
        track_id = _nonempty(path, line, row, "track_id")
        frame = _integer(path, line, row, "frame")
        crop_path = _nonempty(path, line, row, "path")
        if track_id not in known:
            raise TracksetError(path, f"track_id {track_id!r} is not in {TRACKS_FILE}", line)
        key = (track_id, frame)
        if key in first_line:
            raise TracksetError(
                path, f"duplicate crop: track {track_id!r} frame {frame} (first on line {first_line[key]})", line
            )
        reason = _unsafe_path_reason(crop_path)
        if reason:
            raise TracksetError(path, f"crop path {crop_path!r} {reason}", line)
        first_line[key] = line
        lines.append(line)
        for name, value in zip(CROP_COLUMNS, (track_id, frame, crop_path)):
            columns[name].append(value)
    return pl.DataFrame(columns, schema=CROPS_SCHEMA), lines


def _unsafe_path_reason(path: str) -> str | None:
    """Why a crop path may not be used, or ``None``: it must stay inside the folder."""
    if os.path.isabs(path) or _WINDOWS_ABSOLUTE.match(path):
        return "is absolute; paths must be relative to the dataset folder"
    depth = 0
    for part in re.split(r"[\\/]", path):
        if part == "..":
            depth -= 1
            if depth < 0:
                return "leaves the dataset folder ('..'); paths must stay inside it"
        elif part not in ("", "."):
            depth += 1
    if depth == 0:
        return "names the dataset folder itself, not a file"
    return None


def _file_problem(path: Path) -> str | None:
    """Why ``path`` is not a regular file one can open, or ``None`` if it is one.

    ``Path.is_file`` raises, rather than answering no, for a name the system
    refuses (too long) or a folder it may not look into.
    """
    try:
        if path.is_file():
            return None
    except OSError as error:
        return f"cannot be looked up ({error.strerror or error})"
    return _NOT_FOUND


def _track_problems(root: Path, tracks: pl.DataFrame, crops: pl.DataFrame, crop_lines: list[int]) -> list[TrackProblem]:
    """Per-track problems, in the order of ``tracks.csv`` then ``crops.csv``."""
    ranges = {
        track_id: (start, end)
        for track_id, start, end in zip(tracks["track_id"], tracks["start_frame"], tracks["end_frame"])
    }
    found: dict[str, list[str]] = {}
    with_crops: set[str] = set()
    for track_id, frame, path, line in zip(crops["track_id"], crops["frame"], crops["path"], crop_lines):
        with_crops.add(track_id)
        start, end = ranges[track_id]
        if frame < start:
            found.setdefault(track_id, []).append(
                f"{CROPS_FILE} line {line}: crop frame {frame} is before the track's start_frame {start}"
            )
        elif frame > end:
            found.setdefault(track_id, []).append(
                f"{CROPS_FILE} line {line}: crop frame {frame} is after the track's end_frame {end}"
            )
        missing = _file_problem(root / path)
        if missing:
            found.setdefault(track_id, []).append(f"{CROPS_FILE} line {line}: crop file {path} {missing}")
    problems = []
    for track_id in tracks["track_id"]:
        if track_id not in with_crops:
            problems.append(TrackProblem(track_id, f"no crops in {CROPS_FILE}"))
        problems.extend(TrackProblem(track_id, reason) for reason in found.get(track_id, ()))
    return problems
