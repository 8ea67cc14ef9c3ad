"""Validation of the image batches every face detector takes."""

from __future__ import annotations

from typing import Sequence

import numpy as np


def as_image_batch(images: Sequence[np.ndarray]) -> np.ndarray:
    """Checks a batch of images and stacks it into one array.

    Args:
        images: uint8 RGB images of shape (H, W, 3), all of one size: a list, or
            an array of shape (N, H, W, 3).

    Returns:
        (N, H, W, 3) uint8; (0, 0, 0, 3) for an empty batch.

    Raises:
        ValueError: If a single image is passed instead of a batch, or an image
            is not a uint8 (H, W, 3) array with H, W > 0, or sizes differ.
    """
    if isinstance(images, np.ndarray):
        if images.ndim == 3:
            raise ValueError(
                f"got a single image of shape {images.shape}; pass a list of images "
                "or an array of shape (N, H, W, 3)"
            )
        if images.ndim != 4:
            raise ValueError(f"an image batch array must be (N, H, W, 3), got shape {images.shape}")
    images = list(images)
    if not images:
        return np.zeros((0, 0, 0, 3), np.uint8)
    for i, image in enumerate(images):
        if not isinstance(image, np.ndarray):
            raise ValueError(f"image {i} is a {type(image).__name__}, expected a numpy array")
        if image.dtype != np.uint8:
            raise ValueError(f"image {i} has dtype {image.dtype}, expected uint8 RGB")
        if image.ndim != 3 or image.shape[2] != 3:
            raise ValueError(f"image {i} has shape {image.shape}, expected (H, W, 3) RGB")
        if image.shape[0] == 0 or image.shape[1] == 0:
            raise ValueError(f"image {i} is empty: shape {image.shape}")
        if image.shape != images[0].shape:
            raise ValueError(
                f"all images of a batch must have one size: image 0 is {images[0].shape}, "
                f"image {i} is {image.shape}"
            )
    return np.stack(images)
