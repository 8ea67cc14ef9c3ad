"""Where the platform keeps its data on this machine.

Everything lives under one project data folder, ``$VCN_HOME`` (default:
``./vcn_data`` in the working directory): the Dagster instance (SQLite), the
artifacts, the DuckDB warehouse and the inbox the sensor watches.

Two settings move data to S3: ``VCN_STORAGE=s3://bucket/prefix`` keeps every
artifact (per-movie tables, thumbnails, reports, the model store) there, with
``$VCN_HOME/artifacts`` as this machine's cache; ``VCN_INBOX=s3://bucket/inbox/``
makes the sensor watch that prefix. The S3 connection comes from the standard
AWS environment (``AWS_ENDPOINT_URL``, ``AWS_REGION``, credentials).
"""

from __future__ import annotations

import contextlib
import fcntl
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from vcn.stores.files import atomic_path

if TYPE_CHECKING:
    import dagster as dg

REPO_ROOT = Path(__file__).resolve().parent.parent


@dataclass(frozen=True)
class Settings:
    home: Path

    @classmethod
    def from_env(cls) -> "Settings":
        return cls(Path(os.environ.get("VCN_HOME", Path.cwd() / "vcn_data")).resolve())

    @property
    def dagster_home(self) -> Path:
        return self.home / "dagster"

    @property
    def artifacts(self) -> Path:
        return self.home / "artifacts"

    @property
    def warehouse(self) -> Path:
        return self.home / "warehouse.duckdb"

    @property
    def storage(self) -> str | None:
        """s3://bucket/prefix of the artifacts, or None to keep them in the local artifacts folder."""
        value = os.environ.get("VCN_STORAGE", "").strip()
        if not value or value == "local":
            return None
        if not value.startswith("s3://"):
            raise ValueError(f"VCN_STORAGE={value!r}: set it to s3://bucket/prefix, or leave it unset for local files")
        return value

    @property
    def inbox_uri(self) -> str | None:
        """The S3 prefix the inbox sensor watches, when ``VCN_INBOX`` is an s3:// URI."""
        value = os.environ.get("VCN_INBOX", "")
        return value if value.startswith("s3://") else None

    @property
    def inbox(self) -> Path:
        """The local inbox folder (unused when the inbox is in S3)."""
        value = os.environ.get("VCN_INBOX", "")
        return Path(value if value and not self.inbox_uri else self.home / "inbox").resolve()

    def prepare(self) -> "Settings":
        """Creates the folders and the Dagster instance config; exports the paths to the environment.

        The instance config is the repository's ``dagster.yaml`` copied into
        ``DAGSTER_HOME`` (SQLite storage under it), so processes started from here
        (the webserver, the daemon, run workers) share one instance.
        """
        for folder in (self.home, self.dagster_home, self.artifacts, self.inbox):
            folder.mkdir(parents=True, exist_ok=True)
        template = REPO_ROOT / "dagster.yaml"
        target = self.dagster_home / "dagster.yaml"
        if not template.exists():
            raise FileNotFoundError(f"{template}: the instance configuration is missing from the installation")
        if not target.exists() or target.read_bytes() != template.read_bytes():
            with atomic_path(target) as tmp:  # a process starting beside this one never reads half a file
                tmp.write_bytes(template.read_bytes())
        os.environ["VCN_HOME"] = str(self.home)
        os.environ["DAGSTER_HOME"] = str(self.dagster_home)
        return self

    @contextlib.contextmanager
    def instance(self) -> Iterator[dg.DagsterInstance]:
        """The Dagster instance under ``DAGSTER_HOME`` (call :meth:`prepare` first), open for the block.

        Opening an instance creates its SQLite storage on first use; two processes
        doing that at once on a new home (two ``vcn process`` started together)
        would race to create the same tables, so the opening holds a lock beside them.
        """
        import dagster as dg

        with open(self.dagster_home / ".instance.lock", "a+") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            try:
                instance = dg.DagsterInstance.get()
            finally:
                fcntl.flock(lock, fcntl.LOCK_UN)
        with instance:
            yield instance
