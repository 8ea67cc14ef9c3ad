"""Dissimilarities between face crops that the clustering can use, in bilinear form.

The clustering compares sets of crops (a track, a cluster of tracks) by the mean
dissimilarity over all their crop pairs. Both dissimilarities the method uses are
bilinear in per-crop factors:

- cosine: ``d(a, b) = 1 - x_a . x_b`` for unit-length embeddings ``x``;
- the self-distillation loss of the finetuned model:
  ``L(a -> b) = -p_a . log q_b`` with ``p`` the teacher's target distribution and
  ``q`` the student's, symmetrised.

So every dissimilarity here is written as

    d(a, b) = offset + (u_a . v_b + u_b . v_a) / 2

for per-crop factors ``u`` and ``v``, and the mean over all pairs between two sets
of crops is the same expression on the sets' mean factors: a cluster of any size is
summarised by two mean vectors, and all cluster-to-cluster dissimilarities of a
movie come from one matrix product. A new similarity (the loss metric of the
finetuned model) plugs in by providing its factors.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import numpy as np


@dataclass(frozen=True)
class Factors:
    """Per-crop factors of a bilinear dissimilarity.

    Attributes:
        u: (N, K) left factors.
        v: (N, K) right factors.
        offset: The constant term.
    """

    u: np.ndarray
    v: np.ndarray
    offset: float

    def __post_init__(self) -> None:
        if self.u.ndim != 2 or self.u.shape != self.v.shape:
            raise ValueError(f"factors must be two (N, K) arrays of one shape, got {self.u.shape} and {self.v.shape}")
        if not (np.isfinite(self.u).all() and np.isfinite(self.v).all()):
            raise ValueError("factors must be finite")

    def __len__(self) -> int:
        return len(self.u)

    def between(self, a: np.ndarray, b: np.ndarray) -> np.ndarray:
        """(len(a), len(b)) dissimilarities between crops ``a`` and crops ``b`` (index arrays)."""
        forward = self.u[a] @ self.v[b].T
        backward = self.v[a] @ self.u[b].T
        return self.offset + 0.5 * (forward + backward)


class Dissimilarity(Protocol):
    """Turns per-crop model outputs into bilinear factors (see the module docstring).

    Attributes:
        name: What the clustering records.
        group_cut: Whether the negative cut's stricter cut for two clusters of several tracks each
            applies (:data:`vcn.clustering.linkage.GROUP_QUANTILE`).
    """

    name: str
    group_cut: bool

    def factors(self, outputs: np.ndarray) -> Factors:
        """Per-crop factors of (N, ...) model outputs."""
        ...

    def representative(self, mean_u: np.ndarray, mean_v: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Factors of the point that stands for a set of crops, from the set's mean factors.

        The mean factors give the mean dissimilarity over all pairs, which still
        holds the spread inside each set; a representative (for cosine: the
        re-normalised mean direction) compares the sets' centres instead.
        """
        ...

    def paper_form(self) -> Dissimilarity:
        """The dissimilarity the paper's adaptive thresholds compare sets by
        (:func:`vcn.clustering.parameter_free.cluster_tracks`): the method's own form of this one."""
        ...


class CosineDissimilarity:
    """``1 - cos(a, b)`` between embeddings: 0 for the same direction, 2 for opposite."""

    name = "cosine"
    #: Measured on nine saved SFace embedding sets (benchmarks/results/group_cut.md): better or the same on each.
    group_cut = True

    def factors(self, outputs: np.ndarray) -> Factors:
        """Factors of L2-normalised ``outputs`` ((N, D) embeddings, normalised here)."""
        x = np.asarray(outputs, dtype=np.float64)
        if x.ndim != 2:
            raise ValueError(f"embeddings must be a (N, D) array, got shape {x.shape}")
        x = x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)
        return Factors(u=x, v=-x, offset=1.0)

    def representative(self, mean_u: np.ndarray, mean_v: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """The set's mean direction, unit length (its centroid on the sphere)."""
        direction = mean_u / np.maximum(np.linalg.norm(mean_u, axis=1, keepdims=True), 1e-12)
        return direction, -direction

    def paper_form(self) -> CosineDissimilarity:
        """This one: the adaptive thresholds compare centroids by cosine too."""
        return self
