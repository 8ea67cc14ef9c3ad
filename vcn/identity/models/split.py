"""A face-ID network in three parts: trunk, last stage and head.

Three users of a backbone need it in parts rather than end to end:

- quality estimation (SER-FIQ-style dropout, :mod:`vcn.identity.quality`) runs
  :meth:`~SplitNetwork.forward_features` once and :meth:`~SplitNetwork.forward_head`
  many times on perturbed features;
- the view bank (:mod:`vcn.identity.selfsup.bank`) runs
  :meth:`~SplitNetwork.forward_trunk` once per augmented view and keeps its output;
- finetuning on that bank trains :meth:`~SplitNetwork.forward_tail` (last stage
  and head) on the banked trunk features.

So that every part composes the same way in every architecture, the
compositions are declared here once; an architecture says only where its
parts begin and end.
"""

from __future__ import annotations

import torch
from torch import nn


class SplitNetwork(nn.Module):
    """Chips in, embeddings out, as ``head(last_stage(trunk(chips)))``.

    A subclass sets :attr:`input_size` and defines the three parts:
    :meth:`forward_trunk` (chips to the feature maps entering the last stage,
    checking its input with :meth:`check_chips`), :meth:`forward_last_stage`
    (those maps to flat features) and :meth:`forward_head` (features to the
    embedding). The trunk is the cheap-to-keep, costly-to-run part; the last
    stage holds most of the weights and is what CPU finetuning trains.
    """

    #: Side of the square RGB chip the network takes.
    input_size: int
    #: Parameter-name prefixes of the last stage with the head: what CPU finetuning trains
    #: (:func:`vcn.identity.selfsup.trainer.backbone_part`).
    last_stage_prefixes: tuple[str, ...]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(N, D) embeddings of (N, 3, S, S) chips prepared as the architecture expects."""
        return self.forward_tail(self.forward_trunk(x))

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """(N, F) flat features before the head (input as :meth:`forward`)."""
        return self.forward_last_stage(self.forward_trunk(x))

    def forward_tail(self, trunk: torch.Tensor) -> torch.Tensor:
        """(N, D) embeddings from :meth:`forward_trunk`'s output: ``forward = forward_tail(forward_trunk)``."""
        return self.forward_head(self.forward_last_stage(trunk))

    def forward_trunk(self, x: torch.Tensor) -> torch.Tensor:
        """Feature maps entering the last stage (input as :meth:`forward`)."""
        raise NotImplementedError

    def forward_last_stage(self, trunk: torch.Tensor) -> torch.Tensor:
        """(N, F) flat features from :meth:`forward_trunk`'s output."""
        raise NotImplementedError

    def forward_head(self, features: torch.Tensor) -> torch.Tensor:
        """(N, D) embeddings from :meth:`forward_features`' output."""
        raise NotImplementedError

    def check_chips(self, x: torch.Tensor) -> None:
        """Refuses anything but a floating-point (N, 3, S, S) batch, S = :attr:`input_size`.

        Raises:
            ValueError: Naming the dtype or shape received.
        """
        if not torch.is_floating_point(x):
            raise ValueError(f"chips must be a floating-point tensor, got {x.dtype}")
        if x.ndim != 4 or tuple(x.shape[1:]) != (3, self.input_size, self.input_size):
            raise ValueError(f"chips must have shape (N, 3, {self.input_size}, {self.input_size}), got {tuple(x.shape)}")
