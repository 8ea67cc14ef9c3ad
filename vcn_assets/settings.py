"""Where the platform keeps its data on this machine.

Everything lives under one project data folder, ``$VCN_HOME`` (default:
``./vcn_data`` in the working directory): the Dagster instance (SQLite), the
artifacts, the DuckDB warehouse and the inbox the sensor watches.
"""

from __future__ import annotations

import os
import shutil
from dataclasses import dataclass
from pathlib import Path

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
    def inbox(self) -> Path:
        return Path(os.environ.get("VCN_INBOX", self.home / "inbox")).resolve()

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
            shutil.copyfile(template, target)
        os.environ["VCN_HOME"] = str(self.home)
        os.environ["DAGSTER_HOME"] = str(self.dagster_home)
        return self
