"""Converted weights cached as safetensors: a released model file is converted once, then loaded fast.

Released face-ID weights come in formats torch cannot load (dlib's ``.dat``, an
int8 ONNX export); converting them takes about a second and is the same every
time, so the result is kept as ``<version>.safetensors``. The file records the
source file's sha256 and a layout tag, so weights converted from another file,
or laid out for an older module, are never loaded; a truncated or foreign file
is rebuilt rather than fatal. It is written under a temporary name and moved
into place, so concurrent processes never read half a file.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

from torch import nn

log = logging.getLogger(__name__)

Module = TypeVar("Module", bound=nn.Module)


def load_cached_weights(model: nn.Module, path: Path, digest: str, layout: str) -> bool:
    """Fills ``model`` from a cache file written by :func:`write_cached_weights`.

    Args:
        model: The module to fill (strictly: every key must match).
        path: The cache file.
        digest: sha256 of the source file the weights must have come from.
        layout: The tag of the module's current state-dict layout.

    Returns:
        False, with a warning, when there is no usable file: absent, converted
        from another source, of another layout, or unreadable.
    """
    if not path.is_file():
        return False
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as cache:
            metadata = cache.metadata() or {}
            if metadata.get("format") != layout or metadata.get("source_sha256") != digest:
                log.warning("%s was written from another model file or format; rebuilding it", path)
                return False
            state = {key: cache.get_tensor(key) for key in cache.keys()}
        model.load_state_dict(state, strict=True)
    except Exception as error:  # a truncated or foreign file: rebuild rather than fail
        log.warning("cannot use cached weights %s (%s); rebuilding them", path, error)
        return False
    return True


def write_cached_weights(model: nn.Module, path: Path, digest: str, layout: str, version: str) -> None:
    """Writes ``model``'s weights to ``path`` atomically, for :func:`load_cached_weights`.

    Args:
        model: The converted module.
        path: The cache file; its folder is created.
        digest: sha256 of the source file they were converted from.
        layout: The tag of the module's state-dict layout.
        version: The model version, recorded in the file's metadata.
    """
    from safetensors.torch import save_file

    path.parent.mkdir(parents=True, exist_ok=True)
    state = {key: value.detach().contiguous() for key, value in model.state_dict().items()}
    partial = path.with_name(f"{path.name}.partial-{os.getpid()}")
    try:
        save_file(state, str(partial), metadata={"format": layout, "source_sha256": digest, "version": version})
        os.replace(partial, path)
    finally:
        partial.unlink(missing_ok=True)


def load_converted(
    model: Module,
    source: Path,
    digest: str,
    version: str,
    layout: str,
    convert: Callable[[Module], None],
    cache_dir: str | os.PathLike[str] | None = None,
) -> Module:
    """``model`` with the weights of a released file: from the cache, else converted (``convert``) and cached.

    Args:
        model: A freshly built module of the right architecture.
        source: The released file (for the log).
        digest: Its sha256.
        version: The model version, also the cache file's name.
        layout: The tag of the module's state-dict layout.
        convert: Fills ``model`` from ``source`` (only called when the cache cannot serve).
        cache_dir: Where the cache lives; default :func:`vcn.identity.checkpoints.model_cache_dir`.

    Returns:
        ``model`` filled, with ``version`` set, in eval mode.
    """
    if cache_dir is None:
        from vcn.identity.checkpoints import model_cache_dir

        cache_dir = model_cache_dir()
    cache_path = Path(cache_dir) / f"{version}.safetensors"
    if not load_cached_weights(model, cache_path, digest, layout):
        convert(model)
        write_cached_weights(model, cache_path, digest, layout, version)
        log.info("converted %s to %s", source, cache_path)
    model.version = version
    return model.eval()
