"""A bank of trunk features of augmented views: finetuning the last stage without rerunning the trunk.

On a CPU, running the whole backbone for both views of every pair at every step
is what makes finetuning slow (the trunk of dlib's ResNet is ~85 % of a forward
pass). When only the last stage trains, the trunk is fixed, so its output for a
given augmented view never changes: the bank computes it once for ``V`` views of
every crop and training draws views from it. View 0 is the chip as it is, view 1
its mirror image, the others random face-preserving augmentations
(:class:`~vcn.identity.selfsup.augment.FaceAugment`); a pair's two sides draw their views
independently, and a crop paired with itself gets two different views.

The price is variety: V fixed views per crop instead of a fresh one per step.
Four views over a movie's thousands of crops, most of them already varied by
the tracks themselves, are ample for a few epochs.

Memory: ``crops x V x trunk size`` in float16 (dlib's ResNet: 16 KiB per view,
so 6,800 crops x 4 views = 435 MiB). :func:`bank_crops` picks a subset of each
track's crops when the movie's crops would not fit a byte budget, so memory stays
bounded on feature-length movies.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import torch

from vcn.identity.selfsup.augment import FaceAugment
from vcn.identity.selfsup.sampling import spread_crops

if TYPE_CHECKING:
    from vcn.identity.backbone import Backbone

log = logging.getLogger(__name__)

#: Storage precision of the bank: float16 keeps ~3 significant digits of the
#: non-negative trunk activations, half the bytes of float32.
STORAGE_DTYPE = torch.float16


@dataclass(frozen=True, eq=False)
class ViewBank:
    """Trunk outputs of ``V`` views of ``N`` crops.

    Attributes:
        features: (N, V, *trunk shape) tensor in :data:`STORAGE_DTYPE`, on the CPU.
        crops: (N,) index of each banked crop in the caller's chips.
    """

    features: torch.Tensor
    crops: np.ndarray

    @property
    def n_views(self) -> int:
        return int(self.features.shape[1])

    @property
    def nbytes(self) -> int:
        return self.features.numel() * self.features.element_size()

    def draw(self, pairs: np.ndarray, generator: torch.Generator, device: torch.device) -> torch.Tensor:
        """Trunk features of one view of each side of ``pairs``, first sides then second sides.

        Args:
            pairs: (B, 2) rows into the bank.
            generator: Draws the views.
            device: Where the float32 result goes.

        Returns:
            (2B, *trunk shape) float32 features.
        """
        pairs = torch.as_tensor(pairs, dtype=torch.long)
        n_views = self.n_views
        first = torch.randint(n_views, (len(pairs),), generator=generator)
        second = torch.randint(n_views, (len(pairs),), generator=generator)
        if n_views > 1:
            # A crop paired with itself must see two different views.
            same = pairs[:, 0] == pairs[:, 1]
            shift = torch.randint(1, n_views, (len(pairs),), generator=generator)
            second = torch.where(same, (first + shift) % n_views, second)
        rows = torch.cat([pairs[:, 0], pairs[:, 1]])
        views = torch.cat([first, second])
        return self.features[rows, views].to(device=device, dtype=torch.float32)


def tail_outputs(module: torch.nn.Module, bank: ViewBank, view: int = 0, batch_size: int = 512) -> torch.Tensor:
    """``module.forward_tail`` of one view of every banked crop: (N, D) float32 on the module's device, no gradients.

    View 0 (the chips as they are) gives the model's own outputs for the crops.
    """
    device = next(module.parameters()).device
    with torch.inference_mode():
        parts = [
            module.forward_tail(bank.features[i : i + batch_size, view].to(device, torch.float32)).float()
            for i in range(0, len(bank.crops), batch_size)
        ]
    return torch.cat(parts) if parts else torch.zeros((0, 0), device=device)


def bank_crops(crop_track: np.ndarray, n_views: int, bytes_per_view: int, max_bytes: int) -> np.ndarray:
    """The crops to bank: all of them if they fit ``max_bytes``, else the most per track that fit.

    Every track keeps ``min(its crops, k)`` crops, spread evenly over the track,
    with ``k`` the largest cap that fits (:func:`~vcn.identity.selfsup.sampling.spread_crops`);
    short tracks thus keep all their crops and the long tracks of the lead actors
    give up some.

    Returns:
        Sorted indices into ``crop_track``.

    Raises:
        ValueError: If not even one crop per track fits.
    """
    crop_track = np.asarray(crop_track)
    per_crop = n_views * bytes_per_view
    budget = max_bytes // per_crop
    n_tracks = len(np.unique(crop_track))
    if budget < n_tracks:
        raise ValueError(
            f"a view bank of {n_tracks} tracks x {n_views} views needs at least "
            f"{n_tracks * per_crop / 2**20:.0f} MiB, more than its budget of {max_bytes / 2**20:.0f} MiB"
        )
    return spread_crops(crop_track, max(budget, 1))


def build_view_bank(
    backbone: Backbone,
    module: torch.nn.Module,
    chips: np.ndarray,
    *,
    n_views: int,
    seed: int,
    device: torch.device,
    batch_size: int = 128,
    crops: np.ndarray | None = None,
) -> ViewBank:
    """Run ``module.forward_trunk`` over ``n_views`` views of each chip.

    Args:
        backbone: Gives the input normalisation (:meth:`~vcn.identity.backbone.Backbone.preprocess`).
        module: The model whose trunk to run (``forward_trunk``); left in its mode.
        chips: (N, S, S, 3) uint8 RGB aligned chips.
        n_views: Views per crop, >= 1: the chip, its mirror image, then random augmentations.
        seed: Seed of the augmentations.
        device: Where the trunk runs.
        batch_size: Chips per forward pass.
        crops: Which chips to bank (default all), as from :func:`bank_crops`.

    Raises:
        ValueError: If ``n_views`` < 1 or the module has no ``forward_trunk``.
    """
    if isinstance(n_views, bool) or not isinstance(n_views, int) or n_views < 1:
        raise ValueError(f"n_views must be a positive int, got {n_views!r}")
    if not hasattr(module, "forward_trunk"):
        raise ValueError(f"{type(module).__name__} has no forward_trunk; a view bank needs one")
    crops = np.arange(len(chips)) if crops is None else np.asarray(crops)
    augment = FaceAugment()
    generator = torch.Generator().manual_seed(seed)
    was_training = module.training
    module.eval()
    features = None  # filled in place, batch by batch: the bank is never in memory twice
    try:
        with torch.inference_mode():
            for start in range(0, len(crops), batch_size):
                batch = torch.from_numpy(np.ascontiguousarray(chips[crops[start : start + batch_size]]))
                x = batch.to(device).permute(0, 3, 1, 2).float()
                for view in range(n_views):
                    if view == 0:
                        v = x
                    elif view == 1:
                        v = x.flip(-1)
                    else:
                        v = augment(x, generator)
                    out = module.forward_trunk(backbone.preprocess(v)).to("cpu", STORAGE_DTYPE)
                    if not bool(torch.isfinite(out).all()):
                        raise FloatingPointError("the trunk gave non-finite features (or they overflow float16)")
                    if features is None:
                        features = torch.empty((len(crops), n_views, *out.shape[1:]), dtype=STORAGE_DTYPE)
                    features[start : start + len(out), view] = out
    finally:
        module.train(was_training)
    if features is None:
        features = torch.zeros((0, n_views), dtype=STORAGE_DTYPE)
    bank = ViewBank(features=features, crops=crops)
    log.info("view bank: %d crops x %d views, %.0f MiB", len(crops), n_views, bank.nbytes / 2**20)
    return bank


def trunk_bytes_per_view(backbone: Backbone, module: torch.nn.Module) -> int:
    """Bytes one view's trunk features take in the bank (one dummy forward pass)."""
    size = backbone.input_size
    with torch.inference_mode():
        device = next(module.parameters()).device
        shape = module.forward_trunk(torch.zeros(1, 3, size, size, device=device)).shape[1:]
    return math.prod(shape) * torch.finfo(STORAGE_DTYPE).bits // 8
