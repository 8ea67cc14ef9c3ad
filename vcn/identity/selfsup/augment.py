"""Face-preserving augmentations of aligned chips: the two views of a positive pair.

Self-distillation learns what the augmentations leave unchanged, so they must
change the picture without changing who is in it (DESIGN.md section 2): a
horizontal flip, a small rotation about the chip centre and a colour-temperature
shift, and optionally a mild brightness change. Crops, strong colour jitter,
blur and greyscale, usual in generic self-supervised learning, are left out:
the chips are already aligned to a template the backbone expects, and skin tone
is part of identity.

Everything works on batches of chips as float tensors, (N, 3, S, S) RGB on the
0..255 scale, on any device, so that augmenting happens where training runs;
:meth:`vcn.identity.backbone.Backbone.preprocess` then normalises for the model. The
random parameters are drawn per chip from a caller's :class:`torch.Generator`,
so a seeded generator gives the same views on every run and device.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def _check_chips(x: torch.Tensor) -> None:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"chips must be a torch.Tensor, got {type(x).__name__}")
    if x.ndim != 4 or x.shape[1] != 3:
        raise ValueError(f"chips must have shape (N, 3, H, W) (RGB), got {tuple(x.shape)}")
    if not x.is_floating_point():
        raise ValueError(f"chips must be floating point on the 0..255 scale, got dtype {x.dtype}")


def _per_chip(value: float | torch.Tensor, x: torch.Tensor, name: str) -> torch.Tensor:
    """``value`` as an (N,) tensor of ``x``'s dtype on ``x``'s device."""
    tensor = torch.as_tensor(value, dtype=x.dtype, device=x.device)
    if tensor.ndim == 0:
        return tensor.expand(len(x))
    if tensor.shape != (len(x),):
        raise ValueError(f"{name} must be a number or one value per chip ({len(x)}), got shape {tuple(tensor.shape)}")
    return tensor


def hflip(x: torch.Tensor) -> torch.Tensor:
    """Mirror chips left to right.

    Args:
        x: (N, 3, H, W) float chips.

    Returns:
        A new tensor, ``x`` mirrored along its width.
    """
    _check_chips(x)
    return x.flip(-1)


def rotate(x: torch.Tensor, degrees: float | torch.Tensor) -> torch.Tensor:
    """Rotate chips about their centre, filling what comes in from outside with black.

    Sampling is bilinear (``grid_sample``, ``align_corners=False``), so 0 degrees
    returns the chips unchanged and 90 degrees equals :func:`torch.rot90`; the
    black fill is what :func:`vcn.faces.align.align_face` puts where a chip reaches
    outside the frame, so rotated chips look like chips the aligner could make.

    Args:
        x: (N, 3, H, W) float chips.
        degrees: One angle, or one per chip as an (N,) tensor. Positive angles
            turn the picture counter-clockwise as displayed (y pointing down).

    Returns:
        The rotated chips, same shape, dtype and device.
    """
    _check_chips(x)
    # Sampling positions need more than a half-precision mantissa (a 150 px chip needs ~1/300).
    work = x if x.dtype in (torch.float32, torch.float64) else x.float()
    angle = torch.deg2rad(_per_chip(degrees, work, "degrees"))
    cos, sin = torch.cos(angle), torch.sin(angle)
    height, width = x.shape[-2:]
    # affine_grid maps each output pixel to where it samples the input, in coordinates
    # normalised to [-1, 1] per axis; the aspect ratio keeps the rotation rigid on non-square chips.
    theta = torch.zeros(len(x), 2, 3, dtype=work.dtype, device=x.device)
    theta[:, 0, 0] = cos
    theta[:, 0, 1] = -sin * (height / width)
    theta[:, 1, 0] = sin * (width / height)
    theta[:, 1, 1] = cos
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    return F.grid_sample(work, grid, mode="bilinear", padding_mode="zeros", align_corners=False).to(x.dtype)


def color_temperature(x: torch.Tensor, factor: float | torch.Tensor) -> torch.Tensor:
    """Warm or cool chips: red scaled by ``1 + factor``, blue by ``1 - factor``, green kept.

    A white-balance change of the kind that differs between shots and scenes
    (tungsten against daylight), to which the learned embedding must not react.

    Args:
        x: (N, 3, H, W) float RGB chips on the 0..255 scale.
        factor: One value, or one per chip as an (N,) tensor, in (-1, 1);
            positive is warmer (redder), negative cooler (bluer).

    Returns:
        The recoloured chips, clamped to 0..255.
    """
    _check_chips(x)
    factor = _per_chip(factor, x, "factor")
    if bool((factor.abs() >= 1).any()):
        raise ValueError("colour-temperature factors must lie in (-1, 1); at +-1 a channel goes black")
    gains = torch.stack([1 + factor, torch.ones_like(factor), 1 - factor], dim=1)
    return (x * gains[:, :, None, None]).clamp(0, 255)


def scale_brightness(x: torch.Tensor, factor: float | torch.Tensor) -> torch.Tensor:
    """Brighten or darken chips: every channel scaled by ``1 + factor``, clamped to 0..255.

    Args:
        x: (N, 3, H, W) float RGB chips on the 0..255 scale.
        factor: One value, or one per chip as an (N,) tensor, greater than -1.

    Returns:
        The rescaled chips, clamped to 0..255.
    """
    _check_chips(x)
    factor = _per_chip(factor, x, "factor")
    if bool((factor <= -1).any()):
        raise ValueError("brightness factors must be greater than -1; at -1 the chip goes black")
    return (x * (1 + factor)[:, None, None, None]).clamp(0, 255)


class FaceAugment:
    """Random face-preserving augmentation of a batch of aligned chips.

    Each chip gets its own draw: mirrored with probability ``flip_p``; rotated by
    an angle uniform in ``[-max_rotation, max_rotation]`` degrees; colour
    temperature shifted by a factor uniform in ``[-temperature, temperature]``
    (:func:`color_temperature`); brightness scaled by a factor uniform in
    ``[-brightness, brightness]`` (:func:`scale_brightness`). Set a range to 0 to
    turn that augmentation off. Call it twice on the same chips for the two
    views of a same-crop pair.

    Tuning: the defaults are the paper's set, kept small enough that a pretrained
    face-ID network still embeds a view within cosine ~0.95 of the original. Much
    larger rotations (> 20 degrees) move the eyes off the alignment template, and
    temperature beyond ~30 % starts to look like a different skin tone; both
    teach invariances that hurt identity. Brightness is off by default (the paper
    does not use it); 0.1-0.2 helps on movies with strong lighting changes.

    Args:
        flip_p: Probability of a horizontal flip, in [0, 1]. Default 0.5.
        max_rotation: Largest rotation in degrees, >= 0. Default 10.
        temperature: Largest colour-temperature factor, in [0, 1). Default 0.15
            (red and blue gains between 0.85 and 1.15, in opposite directions).
        brightness: Largest brightness factor, in [0, 1). Default 0 (off).

    Example:
        >>> augment = FaceAugment()
        >>> generator = torch.Generator().manual_seed(0)
        >>> view_a, view_b = augment(chips, generator), augment(chips, generator)
    """

    def __init__(
        self,
        flip_p: float = 0.5,
        max_rotation: float = 10.0,
        temperature: float = 0.15,
        brightness: float = 0.0,
    ) -> None:
        for name, value, low, high, closed in (
            ("flip_p", flip_p, 0.0, 1.0, True),
            ("max_rotation", max_rotation, 0.0, 180.0, True),
            ("temperature", temperature, 0.0, 1.0, False),
            ("brightness", brightness, 0.0, 1.0, False),
        ):
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
                raise ValueError(f"{name} must be a finite number, got {value!r}")
            if value < low or value > high or (not closed and value == high):
                raise ValueError(f"{name} must lie in [{low}, {high}{']' if closed else ')'}, got {value!r}")
        self.flip_p = float(flip_p)
        self.max_rotation = float(max_rotation)
        self.temperature = float(temperature)
        self.brightness = float(brightness)

    def __repr__(self) -> str:
        return (
            f"FaceAugment(flip_p={self.flip_p}, max_rotation={self.max_rotation}, "
            f"temperature={self.temperature}, brightness={self.brightness})"
        )

    def __call__(self, x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        """One random view of each chip.

        Args:
            x: (N, 3, S, S) float RGB chips on the 0..255 scale, on any device.
            generator: Source of all randomness. The draws are made on the
                generator's device and moved to ``x``'s, so a CPU generator
                seeded alike gives the same views whatever device ``x`` is on.

        Returns:
            The augmented chips: a new tensor of ``x``'s shape, dtype and device,
            on the 0..255 scale. ``x`` is not modified.
        """
        _check_chips(x)
        if not isinstance(generator, torch.Generator):
            raise TypeError(f"generator must be a torch.Generator, got {type(generator).__name__}")
        n = len(x)
        # Draw every parameter, in a fixed order, whether or not its augmentation is on,
        # so that a run's random stream does not depend on the settings.
        draws = torch.rand(4, n, generator=generator, device=generator.device, dtype=torch.float64)
        draws = draws.to(device=x.device)
        flip, angle, warmth, light = draws[0] < self.flip_p, draws[1], draws[2], draws[3]

        out = torch.where(flip[:, None, None, None], x.flip(-1), x)
        if self.max_rotation > 0:
            out = rotate(out, (2 * angle - 1) * self.max_rotation)
        if self.temperature > 0:
            out = color_temperature(out, (2 * warmth - 1) * self.temperature)
        if self.brightness > 0:
            out = scale_brightness(out, (2 * light - 1) * self.brightness)
        return out
