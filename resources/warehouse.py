"""The DuckDB warehouse as a Dagster resource."""

from __future__ import annotations

import dagster as dg
from pydantic import Field

from vcn.stores.warehouse import Warehouse


class WarehouseResource(dg.ConfigurableResource):
    """The platform's DuckDB file; writers serialise on a lock beside it."""

    path: str = Field(description="DuckDB database file.")
    lock_timeout_s: float = Field(default=300.0, description="Seconds a writer waits for other writers.")

    def get(self) -> Warehouse:
        return Warehouse(self.path, self.lock_timeout_s)
