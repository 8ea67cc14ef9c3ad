from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import vcn.clustering.report as report
from vcn.clustering.report import (
    CONTACT_SHEET,
    EMBEDDING_PLOT,
    REPORT_HTML,
    THUMB_SIDE,
    ClusterReport,
    write_cluster_report,
)

RED, GREEN, YELLOW, BLUE = (220, 20, 20), (20, 200, 20), (230, 220, 10), (20, 20, 230)
PLACEHOLDER = (190, 190, 190)
HOSTILE = "<script>alert('x')</script> & Sons"


def _embeddings(labels: list[int], dim: int = 16, seed: int = 0) -> np.ndarray:
    """Unit vectors around one random centre per label."""
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(max(labels) + 1, dim))
    x = centres[labels] + 0.3 * rng.normal(size=(len(labels), dim))
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def _solid(color: tuple[int, int, int], side: int = 150) -> np.ndarray:
    return np.broadcast_to(np.array(color, dtype=np.uint8), (side, side, 3)).copy()


def _random_report(out: Path, n_clusters: int, per_cluster: int = 4, **kwargs) -> ClusterReport:
    rng = np.random.default_rng(n_clusters)
    labels = [c for c in range(n_clusters) for _ in range(per_cluster)]
    track_ids = list(range(len(labels)))
    return write_cluster_report(
        out,
        title="movie",
        track_ids=track_ids,
        clusters=[f"k{c}" for c in labels],
        thumbnails={t: rng.integers(0, 256, (150, 150, 3), dtype=np.uint8) for t in track_ids},
        embeddings=_embeddings(labels),
        **kwargs,
    )


@pytest.fixture(scope="module")
def movie() -> dict:
    """3 clusters of 10, 7 and 5 tracks plus 4 Unknown, thumbnails one solid colour per cluster."""
    sizes = {"alpha": 10, "beta": 7, "gamma": 5, None: 4}
    colors = {"alpha": RED, "beta": GREEN, "gamma": YELLOW, None: BLUE}
    truth = {"alpha": "Ann", "beta": "Bob", "gamma": "Cy", None: "Ann"}
    clusters = [c for c, n in sizes.items() for _ in range(n)]
    # Interleave the clusters in input order: the report must group them itself.
    order = np.random.default_rng(1).permutation(len(clusters))
    clusters = [clusters[i] for i in order]
    track_ids = [f"t{i:02d}" for i in range(len(clusters))]
    thumbnails = {t: _solid(colors[c]) for t, c in zip(track_ids, clusters)}
    # One gamma track has no thumbnail; one beta track comes as RGBA, one Unknown one at another size.
    del thumbnails[track_ids[clusters.index("gamma")]]
    beta = track_ids[clusters.index("beta")]
    thumbnails[beta] = np.dstack([thumbnails[beta], np.full((150, 150), 255, np.uint8)])
    thumbnails[track_ids[clusters.index(None)]] = _solid(BLUE, side=37)
    codes = {c: i for i, c in enumerate(sizes)}
    return dict(
        title=HOSTILE,
        track_ids=track_ids,
        clusters=clusters,
        thumbnails=thumbnails,
        embeddings=_embeddings([codes[c] for c in clusters]),
        identities=[truth[c] for c in clusters],
    )


@pytest.fixture(scope="module")
def written(movie: dict, tmp_path_factory: pytest.TempPathFactory) -> ClusterReport:
    return write_cluster_report(tmp_path_factory.mktemp("report") / "nested" / "out", **movie)


def _count(image: Image.Image, color: tuple[int, int, int]) -> int:
    pixels = np.asarray(image.convert("RGB"))
    return int((pixels == np.array(color, dtype=np.uint8)).all(axis=2).sum())


def test_writes_three_files_and_describes_them(written: ClusterReport) -> None:
    out = written.html.parent
    assert sorted(p.name for p in out.iterdir()) == sorted([CONTACT_SHEET, EMBEDDING_PLOT, REPORT_HTML])
    assert (written.contact_sheet, written.embedding_plot) == (out / CONTACT_SHEET, out / EMBEDDING_PLOT)
    assert (written.projection, written.n_clusters, written.n_unknown) == ("tsne", 3, 4)
    with Image.open(written.contact_sheet) as sheet:
        # 12 thumbnails side by side, 4 rows (3 clusters + Unknown).
        assert sheet.format == "PNG"
        assert sheet.width >= 12 * THUMB_SIDE
        assert 4 * THUMB_SIDE <= sheet.height <= 4 * 2 * THUMB_SIDE
    with Image.open(written.embedding_plot) as plot:
        assert plot.format == "PNG"
        assert plot.width >= 800 and plot.height >= 400


def test_contact_sheet_rows_are_clusters_largest_first_then_unknown(written: ClusterReport) -> None:
    with Image.open(written.contact_sheet) as sheet:
        stripes = [sheet.crop((0, r * sheet.height // 4, sheet.width, (r + 1) * sheet.height // 4)) for r in range(4)]
    thumb = THUMB_SIDE * THUMB_SIDE
    # Expected thumbnails per row: alpha 10 red, beta 7 green (one was RGBA), gamma 4 yellow + 1 placeholder, 4 blue.
    expected = [{RED: 10}, {GREEN: 7}, {YELLOW: 4, PLACEHOLDER: 1}, {BLUE: 4}]
    for stripe, colors in zip(stripes, expected):
        for color in (RED, GREEN, YELLOW, BLUE, PLACEHOLDER):
            assert _count(stripe, color) // thumb == colors.get(color, 0), (color, colors)


def test_thumbnails_spread_from_nearest_to_farthest_from_cluster_mean(tmp_path: Path) -> None:
    n = 20
    embeddings = _embeddings([0] * n, seed=3)
    # Naive reference: rank by distance to the mean, take 4 evenly spaced ranks.
    rank = np.argsort(np.linalg.norm(embeddings - embeddings.mean(axis=0), axis=1))
    expected = [int(rank[p]) for p in (0, 6, 13, 19)]
    # Each track's thumbnail is a colour that encodes its index.
    thumbnails = {i: _solid((10 * i, 0, 255)) for i in range(n)}
    result = write_cluster_report(
        tmp_path,
        title="t",
        track_ids=list(range(n)),
        clusters=["c"] * n,
        thumbnails=thumbnails,
        embeddings=embeddings,
        max_thumbs_per_cluster=4,
    )
    with Image.open(result.contact_sheet) as sheet:
        line = np.asarray(sheet.convert("RGB"))[sheet.height // 2]
    starts = [i for i, px in enumerate(line) if px[2] == 255 and px[1] == 0 and (i == 0 or (line[i - 1] != px).any())]
    shown = [int(line[i][0]) // 10 for i in starts]
    assert shown == expected


def test_contact_sheet_grows_with_clusters_and_caps_rows(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    heights = {}
    for k in (3, 6):
        with Image.open(_random_report(tmp_path / str(k), k).contact_sheet) as sheet:
            heights[k] = sheet.height
    assert heights[6] > heights[3]
    # Beyond MAX_ROWS the sheet stops growing (a footer counts the rest), the HTML still lists all.
    monkeypatch.setattr(report, "MAX_ROWS", 3)
    capped = _random_report(tmp_path / "capped", 6)
    with Image.open(capped.contact_sheet) as sheet:
        assert heights[3] < sheet.height < heights[6]
    assert capped.n_clusters == 6
    assert all(f"<td>k{c}</td>" in capped.html.read_text() for c in range(6))


def test_html_lists_clusters_escapes_text_and_links_images(written: ClusterReport) -> None:
    page = written.html.read_text(encoding="utf-8")
    assert "<script>" not in page
    assert "&lt;script&gt;alert(&#x27;x&#x27;)&lt;/script&gt; &amp; Sons" in page
    for cluster in ("alpha", "beta", "gamma", "Unknown"):
        assert f"<td>{cluster}</td>" in page
    assert '<img src="contact_sheet.png"' in page and '<img src="embedding_plot.png"' in page
    assert "26 tracks · 3 clusters · 4 Unknown · 3 identities" in page
    assert "<td>Ann</td><td>100%</td>" in page and "tsne" in page


def test_identity_panel_widens_the_plot(movie: dict, written: ClusterReport, tmp_path: Path) -> None:
    without = write_cluster_report(tmp_path, **{**movie, "identities": None})
    with Image.open(without.embedding_plot) as one, Image.open(written.embedding_plot) as two:
        assert two.width > 1.5 * one.width
        assert two.height == one.height
    assert "identities" not in without.html.read_text()


@pytest.mark.parametrize(
    ("n", "projection"), [(0, "trivial"), (1, "trivial"), (2, "trivial"), (3, "pca"), (4, "pca"), (5, "tsne")]
)
def test_projection_depends_on_track_count(n: int, projection: str, tmp_path: Path) -> None:
    result = write_cluster_report(
        tmp_path,
        title="small",
        track_ids=[str(i) for i in range(n)],
        clusters=[None if i == 1 else "a" for i in range(n)],
        thumbnails={},
        embeddings=_embeddings(list(range(n)) or [0], seed=n)[:n],
    )
    assert result.projection == projection
    assert result.n_unknown == int(n >= 2)
    for path in (result.contact_sheet, result.embedding_plot):
        with Image.open(path) as image:
            image.verify()


def test_pca_above_tsne_limit(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(report, "TSNE_MAX_TRACKS", 10)
    assert _random_report(tmp_path, 3, per_cluster=4).projection == "pca"


def test_no_tracks(tmp_path: Path) -> None:
    result = write_cluster_report(
        tmp_path, title="empty", track_ids=[], clusters=[], thumbnails={}, embeddings=np.zeros((0, 128)), identities=[]
    )
    assert (result.n_clusters, result.n_unknown, result.projection) == (0, 0, "trivial")
    with Image.open(result.contact_sheet) as sheet:
        assert sheet.width > 0 and sheet.height > 0
    assert "0 tracks · 0 clusters · 0 Unknown · 0 identities" in result.html.read_text()


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"clusters": ["a", "b"]}, "one entry per track"),
        ({"embeddings": np.zeros(3)}, "2-D"),
        ({"embeddings": np.array([[1.0, 0.0], [np.nan, 0.0], [0.0, 1.0]])}, "NaN"),
        ({"embeddings": np.eye(4)}, "one entry per track"),
        ({"identities": ["x"]}, "one identity per track"),
        ({"track_ids": [1, 2, 1]}, "unique"),
        ({"max_thumbs_per_cluster": 0}, "at least 1"),
        ({"thumbnails": {1: np.zeros((8, 8, 3), dtype=np.float32)}}, "uint8"),
    ],
)
def test_bad_input_is_refused(change: dict, message: str, tmp_path: Path) -> None:
    args = dict(title="t", track_ids=[1, 2, 3], clusters=["a", "a", None], thumbnails={}, embeddings=np.eye(3)[:, :2])
    with pytest.raises(ValueError, match=message):
        write_cluster_report(tmp_path / "out", **{**args, **change})
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())


def test_a_failure_leaves_no_partial_report(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    earlier = _random_report(tmp_path / "kept", 2)
    before = {p.name: p.read_bytes() for p in earlier.html.parent.iterdir()}

    def broken_plot(*args, **kwargs):
        raise RuntimeError("plot failed")

    monkeypatch.setattr(report, "_write_embedding_plot", broken_plot)
    for out in (tmp_path / "kept", tmp_path / "fresh"):
        with pytest.raises(RuntimeError, match="plot failed"):
            _random_report(out, 3)
    # The earlier report is untouched; the fresh folder holds nothing, not even temporary files.
    assert {p.name: p.read_bytes() for p in (tmp_path / "kept").iterdir()} == before
    assert list((tmp_path / "fresh").iterdir()) == []


def test_contact_sheet_needs_only_the_thumbnails_it_shows(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # 5 clusters of 20 tracks and 6 Unknown; at most 2 rows of clusters, 3 thumbnails each.
    monkeypatch.setattr(report, "MAX_ROWS", 2)
    rng = np.random.default_rng(7)
    labels = [c for c in range(5) for _ in range(20)] + [5] * 6
    track_ids = list(range(len(labels)))
    clusters = [None if c == 5 else f"k{c}" for c in labels]
    embeddings = _embeddings(labels)
    thumbnails = {t: rng.integers(0, 256, (150, 150, 3), dtype=np.uint8) for t in track_ids}
    shown = report.contact_sheet_tracks(track_ids, clusters, embeddings, max_thumbs_per_cluster=3)
    assert len(shown) == len(set(shown)) == 9  # 2 clusters and the Unknown row, 3 each
    args = dict(title="movie", track_ids=track_ids, clusters=clusters, embeddings=embeddings, max_thumbs_per_cluster=3)
    full = write_cluster_report(tmp_path / "all", thumbnails=thumbnails, **args)
    only = write_cluster_report(tmp_path / "shown", thumbnails={t: thumbnails[t] for t in shown}, **args)
    with Image.open(full.contact_sheet) as a, Image.open(only.contact_sheet) as b:
        assert np.array_equal(np.asarray(a), np.asarray(b))
