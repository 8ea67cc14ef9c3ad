"""Batches that shrink when the GPU runs out of memory.

Every heavy stage runs its model over batches sized for a typical GPU. A larger
model, a bigger input or another process on the same card can make one batch
too large; rather than failing a feature-length movie hours in, the batch is
halved and the same work retried, down to one item. Only then does the
out-of-memory error reach the caller.

The smaller size is kept for the rest of the call: memory that did not fit once
will not fit for the next batch either, and every failed attempt costs a
partial forward pass. Results do not depend on the split beyond round-off: the
models run this way treat the items of a batch independently (eval-mode batch
norm, per-image detection) and their outputs are concatenated in input order;
training, whose loss spans the batch, adds up the gradients of the parts
(:func:`vcn.identity.selfsup.trainer.train_round`).

Out-of-memory errors are recognised from torch (:class:`torch.OutOfMemoryError`)
and from ONNX Runtime, whose CUDA provider raises its generic exception types
with the CUDA or allocator message (:func:`is_out_of_memory`).
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Callable, Sequence
from typing import TypeVar

log = logging.getLogger(__name__)

T = TypeVar("T")

#: Lower-case fragments of the messages of out-of-memory errors that arrive without
#: a type of their own: torch's raw CUDA errors ("CUDA error: out of memory"), ONNX
#: Runtime's arena ("Failed to allocate memory for requested buffer") and its CUDA
#: calls ("CUDA failure 2: out of memory", 2 being cudaErrorMemoryAllocation).
OUT_OF_MEMORY_MESSAGES = ("out of memory", "failed to allocate memory", "cuda failure 2")


def is_out_of_memory(error: BaseException) -> bool:
    """Whether ``error`` says the device ran out of memory (so a smaller batch may fit).

    True for :class:`torch.OutOfMemoryError`, and for a ``RuntimeError`` or an
    ONNX Runtime exception whose message holds one of :data:`OUT_OF_MEMORY_MESSAGES`.
    Any other error, a ``ValueError`` mentioning memory included, is a real failure.
    """
    torch = sys.modules.get("torch")  # an error cannot be torch's if torch was never imported
    if torch is not None and isinstance(error, torch.OutOfMemoryError):
        return True
    if not (isinstance(error, RuntimeError) or type(error).__module__.startswith("onnxruntime")):
        return False
    message = str(error).lower()
    return any(fragment in message for fragment in OUT_OF_MEMORY_MESSAGES)


class AdaptiveBatch:
    """A batch size that halves whenever a run with it runs out of device memory.

    One instance spans one piece of work: the size it reaches is kept for every
    later batch of that work (:func:`map_batches` makes one per call; training
    keeps one per round).

    Args:
        size: The batch size to start with, >= 1.
        what: What runs, for the warning (e.g. ``"embedding dlib-resnet"``).

    Raises:
        ValueError: If ``size`` is not a positive int.
    """

    def __init__(self, size: int, what: str) -> None:
        if isinstance(size, bool) or not isinstance(size, int) or size < 1:
            raise ValueError(f"batch size must be a positive int, got {size!r}")
        self.size = size
        self.what = what

    def run(self, attempt: Callable[[int], T]) -> T:
        """``attempt(size)``, retried with half the size after each out-of-memory error.

        ``attempt`` must start afresh on every call (it is called again after a
        failure part of the way through), and do all its work in batches of at
        most ``size`` items.

        Raises:
            The out-of-memory error of a run at size 1, and any other error of
            ``attempt`` at once, untouched.
        """
        while True:
            try:
                return attempt(self.size)
            except Exception as error:
                if self.size == 1 or not is_out_of_memory(error):
                    raise
            # Out of the except block, the failed attempt's frames and tensors are released.
            failed, self.size = self.size, self.size // 2
            _free_cached_memory()
            log.warning("%s: out of device memory at batch size %d; retrying with %d", self.what, failed, self.size)

    def map(self, function: Callable[[Sequence], T], items: Sequence) -> list[T]:
        """``function`` over consecutive slices of ``items`` of at most :attr:`size`, in order.

        A slice that runs out of memory is retried as a smaller slice from the
        same start, so every item is run exactly once by a call that returned.

        Args:
            function: Takes a slice of ``items`` (same type: array, tensor, list).
            items: Anything with ``len`` and slicing.

        Returns:
            The outputs of ``function``, one per slice, in the order of ``items``.
        """
        outputs: list[T] = []
        start = 0

        def attempt(size: int) -> tuple[T, int]:
            stop = min(start + size, len(items))
            return function(items[start:stop]), stop

        while start < len(items):
            output, start = self.run(attempt)
            outputs.append(output)
        return outputs


def map_batches(function: Callable[[Sequence], T], items: Sequence, batch_size: int, what: str) -> list[T]:
    """``function`` over slices of ``items`` of ``batch_size``, halving it on out-of-memory errors.

    See :meth:`AdaptiveBatch.map`; the smaller size holds until this call returns.

    Raises:
        ValueError: If ``batch_size`` is not a positive int.
    """
    return AdaptiveBatch(batch_size, what).map(function, items)


def _free_cached_memory() -> None:
    """Hand torch's cached, unused GPU blocks back, so that the retry can allocate them anew."""
    torch = sys.modules.get("torch")
    if torch is not None and torch.cuda.is_available():
        torch.cuda.empty_cache()
