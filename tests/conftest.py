from __future__ import annotations

from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
HAMILTON = REPO / "tests" / "data" / "hamilton_clip.mp4"
SHARED = REPO.parent / "shared"

#: Hard cuts of the Hamilton clip (first frame of each new shot), checked by eye.
HAMILTON_CUTS = (20, 82, 211)


@pytest.fixture(scope="session")
def hamilton() -> Path:
    return HAMILTON


def processed_hamilton(tmp_path_factory, backbone: str | None = None):
    """Yields a fresh project data folder in which `vcn process` has processed the Hamilton clip once.

    For module-scoped ``home`` fixtures: the environment points at the folder only while it is built.
    ``backbone`` is registered first (``vcn model register --name``), as a user who keeps another base
    model than a new install's does; None processes with the default.
    """
    from vcn_assets.cli import main

    home = tmp_path_factory.mktemp("vcn_home")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("VCN_HOME", str(home))
        mp.delenv("DAGSTER_HOME", raising=False)
        if backbone is not None:
            assert main(["model", "register", "--name", backbone]) == 0
        assert main(["process", str(HAMILTON), "--movie-id", "hamilton"]) == 0
        yield home


@pytest.fixture
def env(home, monkeypatch):
    """Points the environment at the module's ``home`` (a data folder from :func:`processed_hamilton`)."""
    monkeypatch.setenv("VCN_HOME", str(home))
    monkeypatch.setenv("DAGSTER_HOME", str(home / "dagster"))
    return home


def hamilton_artifact(home: Path, name: str) -> Path:
    """The path of one of the Hamilton movie's artifacts in a data folder from :func:`processed_hamilton`."""
    return home / "artifacts" / "movies" / "hamilton" / name


def shared_path(*parts: str) -> Path:
    """A path under ../shared, skipping the test clearly when shared/ is absent."""
    path = SHARED.joinpath(*parts)
    if not path.exists():
        pytest.skip(f"needs {path} (the project's shared/ folder beside the repository), which is absent here")
    return path


@pytest.fixture(scope="session")
def backbone():
    """The dlib ResNet face-ID backbone (ported to torch) on the CPU, loaded once per session.

    Tests must not change its weights in place (the trainer deep-copies it).
    """
    import vcn

    return vcn.load_backbone("dlib-resnet", device="cpu")
