"""Files: written so that readers see the old version or the complete new one, never a part; Parquet read a
row group at a time."""

from __future__ import annotations

import contextlib
import hashlib
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import pyarrow as pa


@contextlib.contextmanager
def atomic_path(final: str | os.PathLike[str], suffix: str = ".tmp") -> Iterator[Path]:
    """Yields a temporary path beside ``final`` to write; it replaces ``final`` only on success.

    On leaving the block normally the temporary file is flushed to disk, made
    readable like an ordinary file (0644: ``mkstemp`` creates it private) and
    renamed onto ``final`` in one step; on an exception it is removed and
    ``final`` is left as it was. The parent folder is created if missing.

    Args:
        final: The file to write.
        suffix: Ending of the temporary name (``.<name>.<random><suffix>``), so
            that leftovers of a killed process are recognisable.
    """
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    handle, temporary = tempfile.mkstemp(prefix=f".{final.name}.", suffix=suffix, dir=final.parent)
    os.close(handle)
    try:
        yield Path(temporary)
        with open(temporary, "rb+") as written:
            os.fsync(written.fileno())
        os.chmod(temporary, 0o644)
        os.replace(temporary, final)
    finally:
        if os.path.exists(temporary):
            os.unlink(temporary)


def sha256_file(path: str | os.PathLike[str]) -> str:
    """Hex sha256 of a file's content, read 8 MiB at a time (model files run to hundreds of MB)."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(8 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def parquet_batches(
    path: str | os.PathLike[str], batch_size: int, columns: list[str] | None = None
) -> Iterator[pa.RecordBatch]:
    """The rows of a Parquet file in file order, at most ``batch_size`` a batch, one row group's reader at a time.

    A batch never spans two row groups. pyarrow's ``ParquetFile.iter_batches``
    over a whole file keeps what it decoded of a binary column until the file
    object goes: reading a 2-hour film's crops (3 KB of JPEG a row) in 512-row
    batches, Arrow's memory pool grew by 1.5 MB a batch, towards the whole
    column. A reader per row group lets each group's go when it is done
    (at most 7.5 MB on the same file).

    Args:
        path: A local Parquet file.
        batch_size: Most rows a batch.
        columns: The columns to read; all when None.
    """
    import pyarrow.parquet as pq

    source = pq.ParquetFile(str(path))
    for group in range(source.num_row_groups):
        yield from source.iter_batches(batch_size=batch_size, row_groups=[group], columns=columns)
