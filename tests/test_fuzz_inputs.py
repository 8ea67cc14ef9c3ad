"""Hostile input: property-based fuzzing of the track-dataset reader, crop images and video ingestion.

Every malformed input must either be read or be refused with one of the
platform's own errors (:class:`vcn.errors.VcnError`) naming the file; no other
exception may escape and nothing may hang. The inputs start from a valid track
dataset or a small real video and are damaged by mutations hypothesis draws
(and shrinks), or are random bytes from the start.

The track-dataset reader is pure Python and runs in this process under a
SIGALRM time limit. Crop images and videos are decoded by OpenCV and FFmpeg,
which can neither be interrupted nor trusted not to take the process down, so
they run in a worker process with a wall-clock limit: a hang or a native crash
fails the example, not the test run. ``derandomize=True`` makes every run draw
the same examples, so CI is reproducible; crashes found while writing this module
are kept as explicit ``@example`` inputs.
"""

from __future__ import annotations

import contextlib
import csv
import io
import logging
import multiprocessing
import os
import signal
import struct
import tempfile
import traceback
import zlib
from fractions import Fraction
from pathlib import Path
from typing import Callable, Iterator

import av
import cv2
import numpy as np
import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from tests import media
from tests.conftest import HAMILTON
from vcn.errors import VcnError, VideoError
from vcn.formats.trackset import TracksetError, read_trackset, read_trackset_labels

FUZZ = settings(
    derandomize=True,
    database=None,
    deadline=None,
    max_examples=100,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
#: Seconds one example may take, in this process and in the worker, before it counts as a hang;
#: real ones take milliseconds (the largest crop regression test a few seconds).
IN_PROCESS_LIMIT_S = 10
WORKER_LIMIT_S = 30
#: Seconds the worker process may take to start (it imports PyAV, OpenCV, polars).
WORKER_START_S = 120


# ---------------------------------------------------------------- the worker process


def _serve(connection) -> None:
    """Runs jobs sent as ``(name, args)`` until the pipe closes; answers with an outcome."""
    logging.disable(logging.CRITICAL)
    jobs = {"ping": lambda: "pong", "decode_video": _decode_video, "align_crops": _align_crops}
    while True:
        try:
            name, args = connection.recv()
        except EOFError:
            return
        connection.send(_outcome(jobs[name], *args))


def _outcome(job: Callable, *args) -> dict:
    """What the job did: ``status`` ok, refused (one of our errors) or crashed, and the details."""
    try:
        return {"status": "ok", "detail": str(job(*args))}
    except VcnError as error:
        return {"status": "refused", "types": [kind.__name__ for kind in type(error).__mro__], "detail": str(error)}
    except Exception as error:  # noqa: BLE001 - anything else is the bug this module looks for
        kind = type(error)
        name = f"{kind.__module__}.{kind.__qualname__}"
        return {"status": "crashed", "types": [name], "detail": traceback.format_exc()}


def _decode_video(path: str) -> str:
    """Probes and decodes every frame (as RGB, downscaled); checks what comes out is consistent."""
    from vcn.media import VideoReader, probe_video

    info = probe_video(path)
    assert info.width > 0 and info.height > 0, info
    reader = VideoReader(path, max_side=48, info=info)
    count = 0
    for frame in reader.frames():
        assert frame.index == count, (frame.index, count)
        assert frame.image is not None and frame.image.dtype == np.uint8
        assert frame.image.shape == (reader.out_height, reader.out_width, 3), frame.image.shape
        count += 1
    assert reader.report.finished and reader.report.frames == count > 0
    return f"{count} frames of {info.width}x{info.height}"


class _NoFaces:
    """A detector that never finds a face, so every readable crop is aligned from the centre prior."""

    name = "no-faces"

    def detect(self, images):
        from vcn.faces.detection.base import Detections

        return [Detections.empty() for _ in images]


def _align_crops(root: str) -> str:
    """Reads the dataset, then decodes and aligns every crop; every crop ends aligned or reported."""
    from vcn.faces.loose_crops import align_loose_crops

    trackset = read_trackset(root)
    aligned = align_loose_crops(trackset, "arcface-112", detector=_NoFaces(), retry_size=None)
    assert aligned.chips.shape[0] == aligned.table.height
    assert set(aligned.table["method"]) <= {"centre_prior"}
    skipped = trackset.problem_track_ids
    expected = trackset.crops.filter(~trackset.crops["track_id"].is_in(sorted(skipped))).height
    unreadable = sum(reason.reason.startswith("crop file ") for reason in aligned.problems)
    assert aligned.table.height + unreadable == expected, (aligned.table.height, unreadable, expected)
    return f"{aligned.table.height} aligned, {unreadable} unreadable"


class Worker:
    """A process that runs one job at a time under a wall-clock limit, restarted after a hang or crash."""

    def __init__(self) -> None:
        self._context = multiprocessing.get_context("spawn")
        self._start()

    def _start(self) -> None:
        self._connection, child = self._context.Pipe()
        self._process = self._context.Process(target=_serve, args=(child,), daemon=True)
        self._process.start()
        child.close()
        self._connection.send(("ping", ()))
        if not self._connection.poll(WORKER_START_S):
            raise RuntimeError(f"the worker process did not start within {WORKER_START_S} s")
        self._connection.recv()

    def stop(self) -> None:
        """Closes the pipe, which ends the worker's loop; kills it if it does not end."""
        self._connection.close()
        self._process.join(5)
        if self._process.is_alive():
            self._process.kill()
            self._process.join()

    def run(self, name: str, *args) -> dict:
        """The job's outcome; fails the test if it hangs or kills the process."""
        return self._ask(name, args, WORKER_LIMIT_S)

    def _ask(self, name: str, args: tuple, limit_s: float) -> dict:
        if not self._process.is_alive():
            code = self._process.exitcode
            self._restart()
            pytest.fail(f"the worker process died after its previous job (exit code {code})")
        self._connection.send((name, args))
        if not self._connection.poll(limit_s):
            self._restart()
            pytest.fail(f"{name}{args} did not finish within {limit_s} s (hang)")
        try:
            return self._connection.recv()
        except EOFError:
            self._process.join()
            code = self._process.exitcode
            self._restart()
            pytest.fail(f"{name}{args} killed the worker process (exit code {code})")

    def _restart(self) -> None:
        self._process.kill()
        self._process.join()
        self._connection.close()
        self._start()


@pytest.fixture(scope="module")
def worker() -> Iterator[Worker]:
    """One worker process for the module's decoding jobs."""
    started = Worker()
    yield started
    started.stop()


def _check_outcome(outcome: dict, path: Path, error_type: type[VcnError] = VcnError) -> None:
    """Read, or refused with an ``error_type`` naming ``path``; anything else fails with the traceback."""
    assert outcome["status"] != "crashed", f"unhandled {outcome['types'][0]} on {path}:\n{outcome['detail']}"
    if outcome["status"] == "refused":
        assert error_type.__name__ in outcome["types"], outcome
        assert str(path) in outcome["detail"], f"{outcome['types'][0]} does not name the file: {outcome['detail']}"


class Hang(Exception):
    """Raised into code that runs past its time limit (not an OSError, which readers may catch)."""


@contextlib.contextmanager
def _time_limit(seconds: float) -> Iterator[None]:
    """Fails the test if the block runs longer than ``seconds`` (SIGALRM; main thread only)."""

    def expire(signum, frame):
        raise Hang(f"still running after {seconds} s")

    previous = signal.signal(signal.SIGALRM, expire)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


# ---------------------------------------------------------------- track datasets

TRACKS = [
    ["track_id", "shot_id", "start_frame", "end_frame"],
    ["007", "01", "10", "20"],
    ["t1", "01", "15", "30"],
    ["t2", "02", "40", "40"],
]
CROPS = [
    ["track_id", "frame", "path"],
    ["007", "10", "crops/007/10.jpg"],
    ["007", "20", "crops/007/20.png"],
    ["t1", "15", "crops/t1/15.jpg"],
    ["t2", "40", "crops/t2/40.jpg"],
]
LABELS = [["track_id", "identity"], ["007", "alice"], ["t1", "bob"], ["t2", "alice"]]
TABLES = {"tracks.csv": TRACKS, "crops.csv": CROPS, "labels.csv": LABELS}


def _picture(suffix: str, width: int = 40, height: int = 40) -> bytes:
    """A small encoded gradient image."""
    image = np.zeros((height, width, 3), np.uint8)
    image[..., 0] = np.arange(width, dtype=np.uint8)[None, :] * 5
    image[..., 1] = np.arange(height, dtype=np.uint8)[:, None] * 5
    ok, data = cv2.imencode(suffix, image)
    assert ok
    return data.tobytes()


JPEG, PNG = _picture(".jpg"), _picture(".png")
#: Stand-ins for file contents in a generated dataset: a folder where a file should be, no file at all.
FOLDER, MISSING = "folder", "missing"


def _png_header(width: int, height: int, body: bytes = b"") -> bytes:
    """A PNG that claims ``width`` x ``height`` RGB pixels, with ``body`` as its (compressed) data."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(body)) + chunk(b"IEND", b"")


def _jpeg_claiming(width: int, height: int) -> bytes:
    """The small JPEG with the size in its start-of-frame marker replaced."""
    data = bytearray(JPEG)
    sof = data.index(b"\xff\xc0")
    data[sof + 5 : sof + 9] = struct.pack(">HH", height, width)
    return bytes(data)


#: Values a frame column should refuse or take: signs, leading zeros, other notations, the int64 bounds,
#: numbers past them and past Python's 4300-digit limit on int(str).
HOSTILE_INTEGERS = [
    "", " ", "-1", "+7", "0", "007", "-0", "1.5", "12.0", "1e3", "0x1F", "1_000", " 12 ", "١٢", "NaN", "inf",
    "9223372036854775807", "-9223372036854775808", "9223372036854775808", "-9223372036854775809",
    "99999999999999999999", "9" * 5000, "-" + "1" * 4400, "0" * 5000 + "1",
]
#: Crop paths that leave the folder, are absolute on some platform, name a folder, or that the
#: file system refuses (a name over 255 bytes, a path over 4096, a NUL).
HOSTILE_PATHS = [
    "", "../x.jpg", "../../etc/passwd", "/etc/passwd", "C:\\crop.jpg", "c:crop.jpg", "\\\\server\\share\\x.jpg",
    "crops/../../x.jpg", "crops/./007/../007/10.jpg", "crops\\007\\10.jpg", "crops", ".", "..", "./", "//",
    "crops/007/10.jpg/", "crops/007/10.jpg/..", "x" * 300 + ".jpg", "crops/" + "y" * 256 + "/1.jpg",
    "a/" * 3000 + "x.jpg", "a\x00b.jpg", "line\nbreak.jpg", "\U0001f600.jpg",
]
#: Ids and names: blanks, duplicates of the valid ids, separators, control and invisible characters.
HOSTILE_TEXT = [
    "", " ", "007", "t1", "007 ", "track_id", "line\nbreak", "cr\rreturn", 'quo"te', "comma,inside", "\ufeffid",
    "\u202eevil", "é", "\U0001f600", "\x7f\x1b[31m", "\t", "\x00",
]

hostile_integers = st.one_of(st.sampled_from(HOSTILE_INTEGERS), st.integers(-(2**70), 2**70).map(str))
hostile_paths = st.one_of(st.sampled_from(HOSTILE_PATHS), st.text(max_size=20))
hostile_text = st.one_of(st.sampled_from(HOSTILE_TEXT), st.text(max_size=20))
field_values = st.one_of(hostile_integers, hostile_paths, hostile_text)
#: What to put in a column of a given name.
HOSTILE_BY_COLUMN = {
    "start_frame": hostile_integers,
    "end_frame": hostile_integers,
    "frame": hostile_integers,
    "path": hostile_paths,
}
any_bytes = st.binary(max_size=300)


@st.composite
def hostile_tracksets(draw, images_only: bool = False) -> dict[str, bytes | str]:
    """A track dataset as ``{relative path: bytes, FOLDER or MISSING}``, damaged by 1-4 mutations.

    With ``images_only`` the CSV files stay valid and only the crop images are damaged.
    """
    tables = {name: [list(row) for row in rows] for name, rows in TABLES.items()}
    images = {row[2]: (PNG if row[2].endswith(".png") else JPEG) for row in CROPS[1:]}
    files: dict[str, bytes | str] = {}
    # Cells are where most of the format is, so they are damaged most often.
    text_mutations = [] if images_only else [_mutate_field, _mutate_field, _mutate_field, _mutate_rows, _mutate_header]
    choices = [_mutate_image] if images_only else [*text_mutations, _mutate_csv_bytes, _mutate_csv_bytes, _mutate_image]
    for _ in range(draw(st.integers(1, 4))):
        mutation = draw(st.sampled_from(choices))
        if mutation is _mutate_image:
            _mutate_image(draw, images)
        elif mutation is _mutate_csv_bytes:
            files.update(_mutate_csv_bytes(draw, tables, files))
        else:
            mutation(draw, tables)
    for name, rows in tables.items():
        files.setdefault(name, _csv_bytes(rows))
    for path, content in images.items():
        files.setdefault(path, content)
    return files


@st.composite
def tracksets_of_hostile_values(draw) -> dict[str, bytes | str]:
    """Well-formed CSV files of valid tracks, with the values of one column made hostile half the time.

    Only one column is damaged per example, so the reader gets past the
    others to it; the hostile values suit the column (numbers for frames,
    paths for paths, text for ids).
    """
    target = draw(st.sampled_from([f"{name}:{column}" for name, rows in TABLES.items() for column in rows[0]]))

    def value(name: str, column: str, valid: str) -> str:
        if f"{name}:{column}" == target and draw(st.booleans()):
            return draw(HOSTILE_BY_COLUMN.get(column, hostile_text))
        return valid

    tracks, crops, labels = [list(TRACKS[0])], [list(CROPS[0])], [list(LABELS[0])]
    for track_id in draw(st.lists(st.sampled_from(["007", "t1", "t2", "t3"]), min_size=1, max_size=4, unique=True)):
        start = draw(st.integers(-3, 40))
        end = start + draw(st.integers(0, 5))
        shot = draw(st.sampled_from(["01", "02"]))
        valid = (track_id, shot, str(start), str(end))
        tracks.append([value("tracks.csv", column, text) for column, text in zip(TRACKS[0], valid)])
        for frame in draw(st.lists(st.integers(start, end), max_size=2, unique=True)):
            valid = (track_id, str(frame), f"crops/{track_id}/{frame}.jpg")
            crops.append([value("crops.csv", column, text) for column, text in zip(CROPS[0], valid)])
        identity = draw(st.sampled_from(["alice", "bob"]))
        labels.append([value("labels.csv", column, text) for column, text in zip(LABELS[0], (track_id, identity))])
    files: dict[str, bytes | str] = {
        "tracks.csv": _quoted_csv_bytes(tracks),
        "crops.csv": _quoted_csv_bytes(crops),
        "labels.csv": _quoted_csv_bytes(labels),
    }
    for _, _, path in crops[1:]:
        if path.startswith("crops/") and ".." not in path and "\0" not in path and len(path) < 200:
            files[path] = JPEG
    return files


def _quoted_csv_bytes(rows: list[list[str]]) -> bytes:
    """Rows written by the csv module: every field survives, commas, quotes and newlines included."""
    text = io.StringIO()
    csv.writer(text, lineterminator="\n").writerows(rows)
    return text.getvalue().encode("utf-8", errors="surrogatepass")


def _csv_bytes(rows: list[list[str]]) -> bytes:
    """Rows joined by commas, unquoted: fields with commas or quotes stay hostile."""
    return "".join(",".join(row) + "\n" for row in rows).encode("utf-8", errors="surrogatepass")


def _mutate_field(draw, tables: dict[str, list[list[str]]]) -> None:
    """One cell (header included) replaced by a hostile value or by another cell (duplicate ids)."""
    rows = tables[draw(st.sampled_from(sorted(tables)))]
    if not rows:
        return
    row = rows[draw(st.integers(0, len(rows) - 1))]
    if not row:
        return
    column = draw(st.integers(0, len(row) - 1))
    if draw(st.integers(0, 3)):
        row[column] = draw(HOSTILE_BY_COLUMN.get(rows[0][column] if column < len(rows[0]) else "", field_values))
    else:
        other = rows[draw(st.integers(0, len(rows) - 1))]
        if len(other) > column:
            row[column] = other[column]


def _mutate_rows(draw, tables: dict[str, list[list[str]]]) -> None:
    """A data row duplicated, dropped, shortened, lengthened, or all rows dropped."""
    rows = tables[draw(st.sampled_from(sorted(tables)))]
    if len(rows) < 2:
        return
    index = draw(st.integers(1, len(rows) - 1))
    action = draw(st.sampled_from(["duplicate", "drop", "shorten", "lengthen", "drop_all", "blank"]))
    if action == "duplicate":
        rows.insert(draw(st.integers(1, len(rows))), list(rows[index]))
    elif action == "drop":
        del rows[index]
    elif action == "shorten" and rows[index]:
        del rows[index][draw(st.integers(0, len(rows[index]) - 1)) :]
    elif action == "lengthen":
        rows[index].extend(draw(st.lists(field_values, min_size=1, max_size=3)))
    elif action == "drop_all":
        del rows[1:]
    else:
        rows.insert(index, [draw(st.sampled_from(["", " ", "\t", ",,,"]))])


def _mutate_header(draw, tables: dict[str, list[list[str]]]) -> None:
    """The header loses, repeats, renames or reorders a column, gains one, or disappears."""
    rows = tables[draw(st.sampled_from(sorted(tables)))]
    if not rows or not rows[0]:
        return
    header = rows[0]
    column = draw(st.integers(0, len(header) - 1))
    action = draw(st.sampled_from(["drop", "repeat", "rename", "reorder", "extra", "remove", "case"]))
    if action == "drop":
        del header[column]
    elif action == "repeat":
        header.insert(draw(st.integers(0, len(header))), header[column])
    elif action == "rename":
        header[column] = draw(field_values)
    elif action == "reorder":
        order = draw(st.permutations(range(len(header))))
        for row in rows:
            if len(row) == len(header):
                row[:] = [row[i] for i in order]
    elif action == "extra":
        for row in rows:
            row.append("extra" if row is header else draw(field_values))
    elif action == "remove":
        del rows[0]
    else:
        header[column] = f" {header[column].upper()} "


def _mutate_csv_bytes(
    draw, tables: dict[str, list[list[str]]], files: dict[str, bytes | str]
) -> dict[str, bytes | str]:
    """A CSV file re-encoded, truncated, spliced with random bytes, replaced, emptied, removed or made a folder."""
    name = draw(st.sampled_from(sorted(tables)))
    current = files.get(name)
    data = current if isinstance(current, bytes) else _csv_bytes(tables[name])
    text = data.decode("utf-8", errors="replace")
    action = draw(
        st.sampled_from(
            ["bom", "crlf", "cr", "utf16", "latin1", "truncate", "insert", "random", "empty", "missing", "folder",
             "no_newline", "quoted_newlines", "nul"]
        )
    )
    if action == "bom":
        data = b"\xef\xbb\xbf" + data
    elif action == "crlf":
        data = text.replace("\n", "\r\n").encode()
    elif action == "cr":
        data = text.replace("\n", "\r").encode()
    elif action == "utf16":
        data = text.encode("utf-16")
    elif action == "latin1":
        data = (text.rstrip("\n") + "é\n").encode("latin-1", errors="replace")
    elif action == "truncate":
        data = data[: draw(st.integers(0, len(data)))]
    elif action == "insert":
        at = draw(st.integers(0, len(data)))
        inserted = st.one_of(any_bytes, st.sampled_from([b'"', b"\r", b"\n", b",", b"\x00", b"\xff", b'"\n"']))
        data = data[:at] + draw(inserted) + data[at:]
    elif action == "random":
        data = draw(st.one_of(any_bytes, st.text(max_size=300).map(lambda s: s.encode("utf-8", "surrogatepass"))))
    elif action == "empty":
        data = b""
    elif action == "missing":
        return {name: MISSING}
    elif action == "folder":
        return {name: FOLDER}
    elif action == "no_newline":
        data = data.rstrip(b"\n")
    elif action == "quoted_newlines":
        data = "\n".join(",".join(f'"{field}\n"' for field in row) for row in tables[name]).encode()
    else:
        data = data.replace(b",", b"\x00", 1)
    return {name: data}


def _mutate_image(draw, images: dict[str, bytes | str]) -> None:
    """A crop image truncated, bit-flipped, overwritten, replaced, emptied, removed, made a folder, or of odd size."""
    path = draw(st.sampled_from(sorted(images)))
    data = images[path] if isinstance(images[path], bytes) and images[path] else JPEG
    action = draw(
        st.sampled_from(
            ["truncate", "flip", "overwrite", "random", "empty", "missing", "folder", "swap", "huge", "shape"]
        )
    )
    if action == "truncate":
        images[path] = data[: draw(st.integers(0, len(data) - 1))]
    elif action == "flip":
        damaged = bytearray(data)
        for at in draw(st.lists(st.integers(0, len(data) - 1), min_size=1, max_size=8)):
            damaged[at] ^= 1 << draw(st.integers(0, 7))
        images[path] = bytes(damaged)
    elif action == "overwrite":
        at = draw(st.integers(0, len(data) - 1))
        patch = draw(st.binary(min_size=1, max_size=64))
        images[path] = data[:at] + patch + data[at + len(patch) :]
    elif action == "random":
        magic = st.sampled_from([b"", b"\xff\xd8\xff", PNG[:16]])
        images[path] = draw(magic) + draw(any_bytes)
    elif action == "empty":
        images[path] = b""
    elif action == "missing":
        images[path] = MISSING
    elif action == "folder":
        images[path] = FOLDER
    elif action == "swap":
        images[path] = PNG if data is JPEG else JPEG
    elif action == "huge":
        # Headers claiming sizes from nothing to far past the crop limit, with almost no data behind them.
        if draw(st.booleans()):
            sides = st.sampled_from([0, 1, 4096, 30000, 32768, 60000])
            images[path] = _png_header(draw(sides), draw(sides), draw(st.binary(max_size=32)))
        else:
            sides = st.sampled_from([0, 1, 2, 4096, 10000, 30000])
            images[path] = _jpeg_claiming(draw(sides), draw(sides))
    else:
        sides = st.sampled_from([1, 2, 3, 31, 4000, 20000])
        width, height = draw(sides), draw(sides)
        if width * height > 4000 * 4000:
            width = 1
        images[path] = _png_header(width, height, bytes((3 * width + 1) * height))


def _write_dataset(root: Path, files: dict[str, bytes | str]) -> Path:
    root.mkdir(parents=True)
    for relative, content in files.items():
        path = root / relative
        path.parent.mkdir(parents=True, exist_ok=True)
        if content == FOLDER:
            path.mkdir(exist_ok=True)
        elif content != MISSING:
            path.write_bytes(content)
    return root


@st.composite
def random_tracksets(draw) -> dict[str, bytes | str]:
    """CSV files of random bytes or text, with or without the right header."""
    files: dict[str, bytes | str] = {}
    for name, rows in TABLES.items():
        header = ",".join(rows[0]) + "\n"
        body = draw(st.one_of(any_bytes, st.text(max_size=200).map(lambda s: s.encode("utf-8", "surrogatepass"))))
        files[name] = (header.encode() if draw(st.booleans()) else b"") + body
    return files


def _check_trackset(root: Path) -> None:
    """Reads tracks, crops and labels; each either reads consistently or is refused naming the file."""
    for read in (read_trackset, read_trackset_labels):
        try:
            with _time_limit(IN_PROCESS_LIMIT_S):
                result = read(root)
        except VcnError as error:
            assert str(root) in str(error), f"{type(error).__name__} does not name the file: {error}"
            assert isinstance(error, TracksetError), type(error)
            continue
        if read is read_trackset_labels:
            assert all(track_id and identity for track_id, identity in result.items())
            continue
        tracks, crops = result.tracks, result.crops
        ids = tracks["track_id"].to_list()
        assert ids and len(set(ids)) == len(ids) and all(ids)
        assert (tracks["start_frame"] <= tracks["end_frame"]).all()
        assert set(crops["track_id"]) <= set(ids) and result.problem_track_ids <= set(ids)
        assert crops.select("track_id", "frame").is_unique().all()
        for path in result.crop_paths():
            inside = os.path.normpath(path)
            assert inside.startswith(str(root) + os.sep), f"crop path {path} leaves {root}"


@FUZZ
@given(hostile_tracksets())
def test_damaged_trackset_is_read_or_refused_naming_the_file(files):
    """A valid dataset damaged in its CSV text, bytes, headers, rows or images reads or raises TracksetError."""
    with tempfile.TemporaryDirectory() as tmp:
        _check_trackset(_write_dataset(Path(tmp) / "ep", files))


@FUZZ
@given(tracksets_of_hostile_values())
# Crashes found by this module, kept as fixed examples: a frame past int64 (polars TypeError) and
# one of 5000 digits (int() ValueError).
@example(files={"tracks.csv": b"track_id,shot_id,start_frame,end_frame\n007,01,-9223372036854775809,0\n"})
@example(files={"tracks.csv": b"track_id,shot_id,start_frame,end_frame\n007,01,0," + b"9" * 5000 + b"\n"})
def test_trackset_of_hostile_values_is_read_or_refused_naming_the_file(files):
    """Well-formed CSV files with huge, negative, duplicate, mistyped or unsafe values read or raise TracksetError."""
    with tempfile.TemporaryDirectory() as tmp:
        _check_trackset(_write_dataset(Path(tmp) / "ep", files))


crop_paths = st.one_of(
    st.sampled_from(HOSTILE_PATHS),
    st.lists(
        st.one_of(
            st.sampled_from(["..", ".", "", "crops", "10.jpg", "x" * 256, "C:", "\\", "\x00"]),
            st.text(max_size=8),
        ),
        min_size=1,
        max_size=6,
    ).map("/".join),
)


@FUZZ
@given(st.lists(crop_paths, min_size=1, max_size=4))
@example(paths=["x" * 300 + ".jpg"])  # found by this module: Path.is_file raised OSError (name too long)
def test_crop_paths_stay_inside_the_folder_or_are_refused(paths):
    """Crop paths that climb out, are absolute, name a folder or that the system refuses: refused or reported."""
    crops = [CROPS[0]] + [["007", str(10 + index), path] for index, path in enumerate(paths)]
    files = {"tracks.csv": _quoted_csv_bytes(TRACKS[:2]), "crops.csv": _quoted_csv_bytes(crops)}
    with tempfile.TemporaryDirectory() as tmp:
        _check_trackset(_write_dataset(Path(tmp) / "ep", files))


@FUZZ
@given(random_tracksets())
def test_random_trackset_is_read_or_refused_naming_the_file(files):
    """CSV files of random bytes or text (with or without a header) read or raise TracksetError."""
    with tempfile.TemporaryDirectory() as tmp:
        _check_trackset(_write_dataset(Path(tmp) / "ep", files))


@settings(FUZZ, max_examples=60)
@given(hostile_tracksets(images_only=True))
def test_damaged_crop_images_are_aligned_or_reported(worker, files):
    """Damaged crop images are aligned or reported as the track's problem; decoding them never crashes."""
    with tempfile.TemporaryDirectory() as tmp:
        root = _write_dataset(Path(tmp) / "ep", files)
        _check_outcome(worker.run("align_crops", str(root)), root)


def _single_crop_dataset(root: Path, image: bytes) -> Path:
    """A one-track, one-crop dataset whose crop is ``image``."""
    return _write_dataset(
        root,
        {
            "tracks.csv": _csv_bytes([TRACKS[0], ["t1", "01", "1", "1"]]),
            "crops.csv": _csv_bytes([CROPS[0], ["t1", "1", "crops/1.jpg"]]),
            "crops/1.jpg": image,
        },
    )


def test_crop_claiming_more_pixels_than_opencv_accepts_is_reported(worker, tmp_path):
    """A 100-byte PNG claiming 60000x60000 pixels is reported as unreadable, not an OpenCV assertion."""
    root = _single_crop_dataset(tmp_path / "ep", _png_header(60000, 60000))
    outcome = worker.run("align_crops", str(root))
    _check_outcome(outcome, root)
    assert outcome["detail"] == "0 aligned, 1 unreadable", outcome


def test_crop_claiming_a_huge_size_is_refused_before_decoding(worker, tmp_path):
    """A 600-byte JPEG claiming 10000x10000 pixels (above the video limit) is reported, not decoded to 300 MB.

    At 30000x30000 the same header would cost 30 s and 5 GB to decode.
    """
    root = _single_crop_dataset(tmp_path / "ep", _jpeg_claiming(10000, 10000))
    outcome = worker.run("align_crops", str(root))
    _check_outcome(outcome, root)
    assert outcome["detail"] == "0 aligned, 1 unreadable", outcome


# ---------------------------------------------------------------- videos

#: Frame size of the synthetic sources; distinct values, so the fuzzer can find and patch them.
WIDTH, HEIGHT = 96, 64
#: (file name, encoder, pixel format, muxer options): one small source per container family.
SOURCES = [
    ("h264_faststart.mp4", "libx264", "yuv420p", {"movflags": "faststart"}),
    ("mjpeg.mov", "mjpeg", "yuvj420p", {}),
    ("h264.mkv", "libx264", "yuv420p", {}),
    ("mpeg4.avi", "mpeg4", "yuv420p", {}),
    ("mjpeg.avi", "mjpeg", "yuvj420p", {}),
    ("mpeg2.ts", "mpeg2video", "yuv420p", {}),
    ("vp9.webm", "libvpx-vp9", "yuv420p", {}),
]
SOURCE_NAMES = [name for name, *_ in SOURCES] + ["hamilton.mp4", "hamilton_faststart.mp4"]


def _encode_source(path: Path, codec: str, pix_fmt: str, options: dict[str, str], frames: int = 24) -> None:
    """``frames`` frames of a bar sliding over a ramp, 24 fps."""
    with av.open(str(path), "w", options=options) as container:
        stream = container.add_stream(codec, rate=24)
        stream.width, stream.height, stream.pix_fmt = WIDTH, HEIGHT, pix_fmt
        if codec == "libx264":
            stream.options = {"preset": "ultrafast"}
        elif codec == "libvpx-vp9":
            stream.options = {"deadline": "realtime", "cpu-used": "8"}
        for index in range(frames):
            image = np.zeros((HEIGHT, WIDTH, 3), np.uint8)
            image[..., 1] = np.arange(WIDTH, dtype=np.uint8)[None, :] * 2
            image[:, (index * 4) % WIDTH : (index * 4) % WIDTH + 8] = 255
            frame = av.VideoFrame.from_ndarray(image, format="rgb24").reformat(format=pix_fmt)
            frame.pts, frame.time_base = index, Fraction(1, 24)
            container.mux(stream.encode(frame))
        container.mux(stream.encode(None))


class Sources(dict):
    """Source name to bytes, shown by name only in hypothesis's reports."""

    def __repr__(self) -> str:
        return f"Sources({', '.join(self)})"


@pytest.fixture(scope="module")
def sources(tmp_path_factory) -> Sources:
    """The bytes of every source video: synthetic ones in each container, and the real clip."""
    directory = tmp_path_factory.mktemp("sources")
    found = Sources({"hamilton.mp4": HAMILTON.read_bytes()})
    found["hamilton_faststart.mp4"] = media.make_truncated(directory, HAMILTON, fraction=1.0).read_bytes()
    for name, codec, pix_fmt, options in SOURCES:
        _encode_source(directory / name, codec, pix_fmt, options)
        found[name] = (directory / name).read_bytes()
    return found


def _size_sites(data: bytes) -> list[tuple[int, bytes, Callable[[int, int], bytes]]]:
    """Where ``data`` stores the frame size, as ``(offset, bytes there, writer of a new width and height)``.

    Container headers (MP4/MOV sample entries, AVI stream headers) and stream
    headers (JPEG start of frame, MPEG-2 sequence header), found by the source
    size they hold.
    """
    patterns = [
        (struct.pack(">HH", WIDTH, HEIGHT), lambda w, h: struct.pack(">HH", w & 0xFFFF, h & 0xFFFF)),
        (struct.pack("<ii", WIDTH, HEIGHT), lambda w, h: struct.pack("<II", w & 0xFFFFFFFF, h & 0xFFFFFFFF)),
        (
            b"\xff\xc0\x00\x11\x08" + struct.pack(">HH", HEIGHT, WIDTH),
            lambda w, h: b"\xff\xc0\x00\x11\x08" + struct.pack(">HH", h & 0xFFFF, w & 0xFFFF),
        ),
        (
            b"\x00\x00\x01\xb3" + (WIDTH << 12 | HEIGHT).to_bytes(3, "big"),
            lambda w, h: b"\x00\x00\x01\xb3" + ((w & 0xFFF) << 12 | h & 0xFFF).to_bytes(3, "big"),
        ),
    ]
    sites = []
    for needle, write in patterns:
        at = data.find(needle)
        while at != -1:
            sites.append((at, needle, write))
            at = data.find(needle, at + 1)
    return sorted(sites, key=lambda site: site[0])


#: Frame sides to claim: zero, tiny, past our limit (8192 x 8192) and FFmpeg's, the integer limits.
CLAIMED_SIDES = [0, 1, 3, 8193, 9000, 16384, 46341, 65535, 2**31 - 1, 2**32 - 1]

video_mutations = st.one_of(
    st.tuples(st.just("truncate"), st.floats(0, 1)),
    st.tuples(st.just("overwrite"), st.floats(0, 1), st.binary(min_size=1, max_size=512)),
    st.tuples(st.just("flip"), st.lists(st.tuples(st.floats(0, 1), st.integers(0, 7)), min_size=1, max_size=16)),
    st.tuples(st.just("header"), st.integers(0, 1023), st.binary(min_size=1, max_size=16)),
    st.tuples(st.just("trailer"), st.integers(1, 1024), st.binary(min_size=1, max_size=16)),
    st.tuples(
        st.just("size"),
        st.integers(0, 2**16),
        st.sampled_from(CLAIMED_SIDES),
        st.sampled_from(CLAIMED_SIDES),
        st.booleans(),
    ),
    st.tuples(st.just("cut"), st.floats(0, 1), st.floats(0, 0.5)),
    st.tuples(st.just("repeat"), st.floats(0, 1), st.integers(1, 4096)),
)


def _mutate_video(data: bytes, mutation: tuple) -> bytes:
    """``data`` damaged as ``mutation`` says; positions given as fractions land inside the file."""
    kind, *args = mutation
    if not data:
        return data

    def at(fraction: float) -> int:
        return min(int(fraction * len(data)), len(data) - 1)

    damaged = bytearray(data)
    if kind == "truncate":
        return data[: at(args[0])]
    if kind == "overwrite":
        start = at(args[0])
        damaged[start : start + len(args[1])] = args[1]
    elif kind == "flip":
        for fraction, bit in args[0]:
            damaged[at(fraction)] ^= 1 << bit
    elif kind == "header":
        start = min(args[0], len(data) - 1)
        damaged[start : start + len(args[1])] = args[1]
    elif kind == "trailer":
        start = max(0, len(data) - args[0])
        damaged[start : start + len(args[1])] = args[1]
    elif kind == "size":
        index, width, height, everywhere = args
        sites = _size_sites(data)
        if sites and not everywhere:
            sites = [sites[index % len(sites)]]
        for offset, needle, write in sites:
            damaged[offset : offset + len(needle)] = write(width, height)
    elif kind == "cut":
        start = at(args[0])
        del damaged[start : start + int(args[1] * len(data))]
    else:
        start = at(args[0])
        damaged[start:start] = data[start : start + args[1]]
    return bytes(damaged)


def _check_video(worker: Worker, name: str, data: bytes) -> None:
    """Writes ``data`` as ``name`` and has the worker probe and decode it."""
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / name
        path.write_bytes(data)
        _check_outcome(worker.run("decode_video", str(path)), path, VideoError)


@FUZZ
@given(st.sampled_from(SOURCE_NAMES), st.lists(video_mutations, min_size=1, max_size=3))
# Crashes found by this module: a sample entry naming no known codec (codec_context None, AttributeError),
# a sample table whose sizes cannot be allocated (av.error.MemoryError from the demuxer) and a sequence
# header declaring a colour matrix libswscale refuses (av.error.OSError converting to RGB).
@example(name="hamilton_faststart.mp4", mutations=[("header", 332, b"\x00\x00\x00\x00\x01")])
@example(name="hamilton_faststart.mp4", mutations=[("header", 802, b"\x00 ")])
@example(name="mpeg2.ts", mutations=[("trailer", 415, b"!")])
def test_damaged_video_decodes_or_is_refused(worker, sources, name, mutations):
    """A real video truncated, overwritten, bit-flipped, cut or resized in its headers decodes or raises VideoError."""
    data = sources[name]
    for mutation in mutations:
        data = _mutate_video(data, mutation)
    _check_video(worker, name, data)


@settings(FUZZ, max_examples=40)
@given(
    st.sampled_from(["mjpeg.mov", "mjpeg.avi", "mpeg2.ts", "mpeg4.avi", "h264_faststart.mp4"]),
    st.sampled_from(CLAIMED_SIDES),
    st.sampled_from(CLAIMED_SIDES),
    st.integers(0, 2**16),
    st.booleans(),
)
def test_video_claiming_another_frame_size_decodes_or_is_refused(
    worker, sources, name, width, height, site, everywhere
):
    """A frame size rewritten in the container or stream headers (zero, tiny, huge) decodes or raises VideoError."""
    _check_video(worker, name, _mutate_video(sources[name], ("size", site, width, height, everywhere)))


@settings(FUZZ, max_examples=60)
@given(
    st.sampled_from(SOURCE_NAMES),
    st.sampled_from([0, 4, 8, 12, 32, 64, 188, 512]),
    st.binary(max_size=4096),
)
def test_random_bytes_behind_a_real_header_are_refused_or_decoded(worker, sources, name, keep, tail):
    """Random bytes, bare or behind the first bytes of a real container (its magic), decode or raise VideoError."""
    _check_video(worker, name, sources[name][:keep] + tail)
