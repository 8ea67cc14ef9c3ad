"""The projection head put on the backbone for self-distillation (DINO's head).

The head maps a backbone embedding to ``K`` logits over learned "prototypes". It is
randomly initialised for every movie, trained with the self-distillation loss, and
thrown away for cosine embeddings; the loss metric of the clustering uses its logits.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F
from torch.nn.utils.parametrizations import weight_norm

#: Standard deviation of the truncated-normal initialisation of every linear layer.
INIT_STD = 0.02


class ProjectionHead(nn.Module):
    """MLP, L2 normalisation, then a weight-normalised linear layer to ``out_dim`` logits.

    Layout: ``Linear(in_dim, hidden_dim)-GELU-Linear(hidden_dim, hidden_dim)-GELU-
    Linear(hidden_dim, bottleneck_dim)``, L2-normalise, then ``Linear(bottleneck_dim,
    out_dim)`` without bias and with weight normalisation ``W = g * V / ||V||`` (per
    output row). With ``norm_last_layer`` the gain ``g`` is fixed to 1 and frozen, so
    each logit is the cosine between the bottleneck feature and a unit prototype.

    Tuning advice:
        - ``out_dim`` (K, the number of prototypes) is taken from 8192 to 65536; the
          default 16384 is ample for the few dozen to few hundred identities of a
          movie and keeps the last layer (256 x K) and the loss cheap on CPU. A larger
          K gives finer targets but costs memory and time linearly.
        - Keep ``norm_last_layer=True`` (DINO's default): a free gain lets the
          logits' scale grow, which makes training less stable, and the frozen gain
          keeps the logits bounded (|logit| <= 1), so the temperatures alone set the
          sharpness. Set it to False only for small backbones that train stably.
        - DINO also freezes the last layer during the first epoch (zeroing its
          gradients); that belongs in the trainer, not here.

    Input centring: the head subtracts a fixed vector (:attr:`input_center`, a
    buffer, zero by default) from its input. The trainer sets it to the mean
    backbone output over the movie's crops. Face descriptors share a large common
    component (dlib's: all faces lie in a narrow cone), which a freshly initialised
    MLP maps to nearly one bottleneck point for every face; the teacher's centred
    targets are then uniform and training stalls at a loss of ln K (measured on
    a 600-track episode: 9.70 = ln 16384 after three epochs without it, 3.0 after
    three epochs with it). Centring the input removes that component and leaves
    the differences between faces.

    Initialisation: every linear weight (the last layer's ``V`` included) is drawn
    from a truncated normal with std 0.02 (truncated at +-2, DINO's call), biases
    are zero, and ``g`` is set to 1. Seed it with ``generator`` or with
    ``torch.manual_seed`` before construction.

    Args:
        in_dim: Dimension of the backbone embedding.
        hidden_dim: Width of the two hidden layers.
        bottleneck_dim: Dimension of the L2-normalised bottleneck.
        out_dim: Number of output logits K (prototypes).
        norm_last_layer: Fix the last layer's weight-norm gain to 1 and freeze it.
        generator: Random generator for the initialisation; the global one if None.

    Raises:
        ValueError: If a dimension is not a positive integer.
    """

    def __init__(
        self,
        in_dim: int,
        hidden_dim: int = 2048,
        bottleneck_dim: int = 256,
        out_dim: int = 16384,
        norm_last_layer: bool = True,
        generator: torch.Generator | None = None,
    ) -> None:
        super().__init__()
        for name, value in (
            ("in_dim", in_dim),
            ("hidden_dim", hidden_dim),
            ("bottleneck_dim", bottleneck_dim),
            ("out_dim", out_dim),
        ):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        self.in_dim = in_dim
        self.out_dim = out_dim
        self.register_buffer("input_center", torch.zeros(in_dim))
        self.norm_last_layer = norm_last_layer

        self.mlp = nn.Sequential(
            nn.Linear(in_dim, hidden_dim),
            nn.GELU(),
            nn.Linear(hidden_dim, hidden_dim),
            nn.GELU(),
            nn.Linear(hidden_dim, bottleneck_dim),
        )
        last = nn.Linear(bottleneck_dim, out_dim, bias=False)
        with torch.no_grad():
            for module in (*self.mlp, last):
                if isinstance(module, nn.Linear):
                    nn.init.trunc_normal_(module.weight, std=INIT_STD, generator=generator)
                    if module.bias is not None:
                        module.bias.zero_()
        # Weight normalisation: original0 is the gain g (out_dim, 1), original1 the direction V.
        self.last_layer = weight_norm(last)
        gain = self.last_layer.parametrizations.weight.original0
        with torch.no_grad():
            gain.fill_(1.0)
        gain.requires_grad_(not norm_last_layer)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits of a batch of embeddings.

        Args:
            x: (N, in_dim) backbone embeddings.

        Returns:
            (N, out_dim) logits.

        Raises:
            ValueError: If ``x`` is not a floating (N, in_dim) tensor.
        """
        if x.ndim != 2 or x.shape[1] != self.in_dim:
            raise ValueError(f"expected (N, {self.in_dim}) embeddings, got shape {tuple(x.shape)}")
        if not x.is_floating_point():
            raise ValueError(f"expected floating-point embeddings, got {x.dtype}")
        x = self.mlp(x - self.input_center.to(x.dtype))
        x = F.normalize(x, dim=-1)
        return self.last_layer(x)
