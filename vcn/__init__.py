"""VideoClusterNet core: the algorithms of the platform, free of Dagster.

Every stage is a plain function or a small class with typed inputs and outputs
(numpy, polars), testable alone. The Dagster layer (``vcn_assets``) calls into
this package; nothing here imports Dagster.
"""

__version__ = "0.2.0"

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from vcn.identity.backbone import Backbone


def load_backbone(*args, **kwargs) -> "Backbone":
    """Load a face-ID backbone: :func:`vcn.identity.backbone.load_backbone`, imported on first call.

    Kept lazy so that ``import vcn`` does not import torch.
    """
    from vcn.identity.backbone import load_backbone as _load_backbone

    return _load_backbone(*args, **kwargs)
