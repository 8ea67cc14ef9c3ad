"""VideoClusterNet core: the algorithms of the platform, free of Dagster.

Every stage is a plain function or a small class with typed inputs and outputs
(numpy, polars), testable alone. The Dagster layer (``vcn_assets``) calls into
this package; nothing here imports Dagster.
"""

__version__ = "0.1.0"
