"""The per-movie cluster report: a contact sheet, an embedding plot and an HTML page.

It is what a user opens to judge a clustering by eye: one row of face
thumbnails per cluster shows at a glance whether a cluster mixes people, and the
2-D projection shows whether clusters that should be one sit side by side.

The three files are rendered to temporary names in the output folder and only
renamed into place once all three exist, so a failure half-way leaves the
previous report (if any) intact and never a half-written one.
"""

from __future__ import annotations

import html
import logging
import os
import tempfile
from collections import Counter
from collections.abc import Hashable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont, ImageOps

log = logging.getLogger(__name__)

CONTACT_SHEET = "contact_sheet.png"
EMBEDDING_PLOT = "embedding_plot.png"
REPORT_HTML = "report.html"

#: Side of a thumbnail on the contact sheet, in pixels.
THUMB_SIDE = 64
#: Cluster rows drawn on the contact sheet; the rest are counted in a footer.
MAX_ROWS = 200
#: t-SNE is used for this many tracks; below, too few points to embed, above, too slow (~30 s at 3000).
TSNE_MIN_TRACKS = 5
TSNE_MAX_TRACKS = 3000
#: Qualitative colormap cycled over clusters (largest cluster first) and identities.
COLORMAP = "tab20"

_PAD = 4
_LABEL_WIDTH = 260
_ROW_HEIGHT = THUMB_SIDE + 2 * _PAD
_BACKGROUND = (255, 255, 255)
_PLACEHOLDER = (190, 190, 190)
_UNKNOWN_COLOR = (0.8, 0.8, 0.8)


@dataclass(frozen=True)
class ClusterReport:
    """Where the report was written and what it shows.

    Attributes:
        contact_sheet: PNG with one row of thumbnails per cluster.
        embedding_plot: PNG of the 2-D projection of the track embeddings.
        html: Self-contained page linking both PNGs by relative path.
        projection: ``"tsne"``, ``"pca"`` or ``"trivial"`` (fewer than 3 tracks,
            or all embeddings equal).
        n_clusters: Distinct cluster ids, Unknown excluded.
        n_unknown: Tracks without a cluster.
    """

    contact_sheet: Path
    embedding_plot: Path
    html: Path
    projection: str
    n_clusters: int
    n_unknown: int


@dataclass(frozen=True)
class _Group:
    """The tracks of one cluster (``cluster_id`` None: the Unknown tracks)."""

    cluster_id: Hashable | None
    members: np.ndarray  # indices into the track arrays
    majority: str | None
    share: float

    @property
    def name(self) -> str:
        return "Unknown" if self.cluster_id is None else f"cluster {self.cluster_id}"


def write_cluster_report(
    out_dir: str | os.PathLike,
    *,
    title: str,
    track_ids: Sequence[str | int],
    clusters: Sequence[str | None],
    thumbnails: Mapping[str | int, np.ndarray],
    embeddings: np.ndarray,
    identities: Sequence[str] | None = None,
    max_thumbs_per_cluster: int = 12,
    seed: int = 0,
) -> ClusterReport:
    """Writes the cluster report of one movie into ``out_dir``.

    Args:
        out_dir: Folder of the report, created if missing. Files of an earlier
            report there are replaced only once the new report is complete.
        title: Page title, typically the movie name; any text (it is escaped).
        track_ids: Id of each track, unique.
        clusters: Cluster id of each track; None for a track left Unknown.
        thumbnails: One uint8 face image (H, W, 3) RGB, (H, W, 4) or (H, W) grey
            per track id, any size. A track without one gets a grey placeholder.
            Only those of :func:`contact_sheet_tracks` are looked up.
        embeddings: (N, D) finite L2-normalised track embeddings, row i of track i.
        identities: Ground-truth identity of each track, when known (benchmarks):
            adds the majority identity of each cluster and a plot panel coloured
            by identity.
        max_thumbs_per_cluster: Thumbnails per row, spread from the track
            nearest the cluster mean to the farthest, so a row shows both the
            typical face and the outliers where mistakes hide.
        seed: Random state of t-SNE; the same inputs and seed give the same plot.

    Returns:
        The paths written and what the report shows.

    Raises:
        ValueError: lengths disagree, track ids repeat, embeddings are not a
            finite 2-D array, or a thumbnail is not a uint8 image.
    """
    embeddings = np.asarray(embeddings)
    _validate(track_ids, clusters, embeddings, identities, max_thumbs_per_cluster)
    groups = _groups(clusters, embeddings, identities)
    n_unknown = sum(len(g.members) for g in groups if g.cluster_id is None)
    n_clusters = len(groups) - (n_unknown > 0)

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    staged: dict[Path, Path] = {}  # temporary path -> final path

    def stage(name: str) -> Path:
        fd, tmp = tempfile.mkstemp(dir=out, prefix=f".{name}.", suffix=".tmp")
        os.close(fd)
        os.chmod(tmp, 0o644)  # mkstemp makes it private; the report is meant to be read
        staged[Path(tmp)] = out / name
        return Path(tmp)

    try:
        # Render every file under a temporary name first.
        sheet = _contact_sheet(groups, list(track_ids), thumbnails, max_thumbs_per_cluster, identities is not None)
        sheet.save(stage(CONTACT_SHEET), format="PNG")
        projection = _write_embedding_plot(stage(EMBEDDING_PLOT), groups, embeddings, identities, seed)
        page = _html(title, groups, len(track_ids), n_clusters, n_unknown, identities, projection)
        stage(REPORT_HTML).write_text(page, encoding="utf-8")
        # All three exist: move them into place.
        for tmp, final in staged.items():
            os.replace(tmp, final)
    except BaseException:
        for tmp in staged:
            tmp.unlink(missing_ok=True)
        raise

    log.info("cluster report of %d tracks, %d clusters (%s) written to %s", len(track_ids), n_clusters, projection, out)
    return ClusterReport(
        contact_sheet=out / CONTACT_SHEET,
        embedding_plot=out / EMBEDDING_PLOT,
        html=out / REPORT_HTML,
        projection=projection,
        n_clusters=n_clusters,
        n_unknown=n_unknown,
    )


def contact_sheet_tracks(
    track_ids: Sequence[str | int],
    clusters: Sequence[str | None],
    embeddings: np.ndarray,
    max_thumbs_per_cluster: int = 12,
) -> list[str | int]:
    """The tracks whose thumbnails :func:`write_cluster_report` shows on the contact sheet, in no set order.

    At most ``(MAX_ROWS + 1) x max_thumbs_per_cluster`` of them whatever the
    movie's length, so a caller need only load (and hold) these thumbnails.

    Raises:
        ValueError: As :func:`write_cluster_report`.
    """
    embeddings = np.asarray(embeddings)
    _validate(track_ids, clusters, embeddings, None, max_thumbs_per_cluster)
    rows, _ = _sheet_rows(_groups(clusters, embeddings, None))
    return [track_ids[g.members[k]] for g in rows for k in _spread(len(g.members), max_thumbs_per_cluster)]


def _validate(
    track_ids: Sequence[str | int],
    clusters: Sequence[str | None],
    embeddings: np.ndarray,
    identities: Sequence[str] | None,
    max_thumbs_per_cluster: int,
) -> None:
    n = len(track_ids)
    if embeddings.ndim != 2:
        raise ValueError(f"embeddings must be a 2-D (N, D) array, got shape {embeddings.shape}")
    if not np.issubdtype(embeddings.dtype, np.number):
        raise ValueError(f"embeddings must be numeric, got dtype {embeddings.dtype}")
    if not np.isfinite(embeddings).all():
        raise ValueError("embeddings contain NaN or infinite values")
    if len(clusters) != n or embeddings.shape[0] != n:
        raise ValueError(
            f"one entry per track expected: {n} track ids, {len(clusters)} clusters, {embeddings.shape[0]} embeddings"
        )
    if identities is not None and len(identities) != n:
        raise ValueError(f"one identity per track expected: {n} track ids, {len(identities)} identities")
    if len(set(track_ids)) != n:
        repeated = [t for t, c in Counter(track_ids).items() if c > 1]
        raise ValueError(f"track ids must be unique; repeated: {repeated[:5]}")
    if max_thumbs_per_cluster < 1:
        raise ValueError(f"max_thumbs_per_cluster must be at least 1, got {max_thumbs_per_cluster}")


def _groups(
    clusters: Sequence[str | None], embeddings: np.ndarray, identities: Sequence[str] | None
) -> list[_Group]:
    """Clusters largest first (ties by id), then the Unknown tracks; members nearest the mean first."""
    by_cluster: dict[Hashable | None, list[int]] = {}
    for i, c in enumerate(clusters):
        by_cluster.setdefault(c, []).append(i)
    order = sorted((c for c in by_cluster if c is not None), key=lambda c: (-len(by_cluster[c]), str(c)))
    if None in by_cluster:
        order.append(None)

    groups = []
    for c in order:
        members = np.asarray(by_cluster[c], dtype=np.int64)
        x = embeddings[members].astype(np.float64)
        distance = np.linalg.norm(x - x.mean(axis=0), axis=1)
        members = members[np.argsort(distance, kind="stable")]
        majority, share = None, 0.0
        if identities is not None:
            majority, count = Counter(identities[i] for i in members).most_common(1)[0]
            share = count / len(members)
        groups.append(_Group(c, members, majority, share))
    return groups


def _sheet_rows(groups: list[_Group]) -> tuple[list[_Group], list[_Group]]:
    """The groups with a row on the contact sheet (MAX_ROWS clusters, then Unknown) and the clusters left out."""
    known = [g for g in groups if g.cluster_id is not None]
    return known[:MAX_ROWS] + [g for g in groups if g.cluster_id is None], known[MAX_ROWS:]


def _spread(n: int, k: int) -> np.ndarray:
    """k positions spread evenly over 0..n-1, both ends included."""
    if n <= k:
        return np.arange(n)
    return np.round(np.linspace(0, n - 1, k)).astype(np.int64)


def _color(rank: int) -> tuple[float, float, float]:
    """Colour of the cluster (or identity) of this rank, cycling the qualitative colormap."""
    from matplotlib import colormaps

    cmap = colormaps[COLORMAP]
    return tuple(cmap(rank % cmap.N)[:3])


def _colormap_size() -> int:
    from matplotlib import colormaps

    return colormaps[COLORMAP].N


def _font(size: int) -> ImageFont.ImageFont | ImageFont.FreeTypeFont:
    return ImageFont.load_default(size=size)


def _fit(draw: ImageDraw.ImageDraw, text: str, font, width: int) -> str:
    """The text, cut with an ellipsis to fit ``width`` pixels."""
    if draw.textlength(text, font=font) <= width:
        return text
    while text and draw.textlength(text + "…", font=font) > width:
        text = text[:-1]
    return text + "…"


def _thumbnail(image: np.ndarray | None) -> Image.Image:
    """A THUMB_SIDE square RGB thumbnail, centre-cropped; grey when the track has no image."""
    if image is None:
        return Image.new("RGB", (THUMB_SIDE, THUMB_SIDE), _PLACEHOLDER)
    array = np.asarray(image)
    if array.dtype != np.uint8 or array.ndim not in (2, 3) or (array.ndim == 3 and array.shape[2] not in (3, 4)):
        raise ValueError(
            f"a thumbnail must be a uint8 (H, W), (H, W, 3) or (H, W, 4) image, got {array.dtype} {array.shape}"
        )
    if array.size == 0:
        raise ValueError(f"a thumbnail is empty: shape {array.shape}")
    picture = Image.fromarray(array).convert("RGB")
    return ImageOps.fit(picture, (THUMB_SIDE, THUMB_SIDE), method=Image.Resampling.BILINEAR)


def _contact_sheet(
    groups: list[_Group],
    track_ids: list[str | int],
    thumbnails: Mapping[str | int, np.ndarray],
    max_thumbs: int,
    with_identities: bool,
) -> Image.Image:
    """One row per cluster (at most MAX_ROWS, largest first), the Unknown row last, a footer for the rest."""
    font, small = _font(13), _font(11)
    width = _LABEL_WIDTH + max_thumbs * (THUMB_SIDE + _PAD) + _PAD
    if not groups:
        sheet = Image.new("RGB", (max(width, 300), 2 * _ROW_HEIGHT), _BACKGROUND)
        ImageDraw.Draw(sheet).text((2 * _PAD, _ROW_HEIGHT - 8), "no tracks", fill=(0, 0, 0), font=font)
        return sheet

    rows, hidden = _sheet_rows(groups)
    height = len(rows) * _ROW_HEIGHT + (_ROW_HEIGHT // 2 if hidden else 0)
    sheet = Image.new("RGB", (width, height), _BACKGROUND)
    draw = ImageDraw.Draw(sheet)
    text_width = _LABEL_WIDTH - 4 * _PAD - 10

    for r, group in enumerate(rows):
        top = r * _ROW_HEIGHT
        if r % 2:
            draw.rectangle((0, top, width, top + _ROW_HEIGHT - 1), fill=(246, 246, 246))
        # A swatch of the group's colour in the embedding plot, then the label.
        rgb = _UNKNOWN_COLOR if group.cluster_id is None else _color(r)
        draw.rectangle((_PAD, top + _PAD + 2, _PAD + 10, top + _PAD + 12), fill=tuple(int(255 * v) for v in rgb))
        tracks = "track" if len(group.members) == 1 else "tracks"
        label = f"{group.name} · {len(group.members)} {tracks}"
        draw.text((3 * _PAD + 10, top + _PAD), _fit(draw, label, font, text_width), fill=(0, 0, 0), font=font)
        if with_identities:
            identity = f"{group.majority} {100 * group.share:.0f}%"
            identity = _fit(draw, identity, small, text_width)
            draw.text((3 * _PAD + 10, top + _PAD + 20), identity, fill=(70, 70, 70), font=small)
        # Thumbnails spread from the track nearest the cluster mean to the farthest.
        for k, position in enumerate(_spread(len(group.members), max_thumbs)):
            track_id = track_ids[group.members[position]]
            sheet.paste(_thumbnail(thumbnails.get(track_id)), (_LABEL_WIDTH + k * (THUMB_SIDE + _PAD), top + _PAD))

    if hidden:
        n_tracks = sum(len(g.members) for g in hidden)
        footer = f"and {len(hidden)} more clusters ({n_tracks} tracks), not shown"
        draw.text((_PAD, len(rows) * _ROW_HEIGHT + _PAD), footer, fill=(0, 0, 0), font=font)
    return sheet


def _project(embeddings: np.ndarray, seed: int) -> tuple[np.ndarray, str]:
    """(N, 2) coordinates of the tracks and the name of the projection used."""
    n = embeddings.shape[0]
    x = embeddings.astype(np.float64)
    if n < 3 or np.ptp(x, axis=0).max(initial=0.0) == 0.0:
        # Nothing to project: points on a line, in input order.
        return np.column_stack([np.arange(n, dtype=np.float64) - (n - 1) / 2, np.zeros(n)]), "trivial"
    if TSNE_MIN_TRACKS <= n <= TSNE_MAX_TRACKS:
        from sklearn.manifold import TSNE
        from threadpoolctl import threadpool_limits

        # One OpenMP thread: a Barnes-Hut step of a few thousand points is too
        # short to share, and spinning threads on busy cores made it 5x slower.
        with threadpool_limits(limits=1, user_api="openmp"):
            tsne = TSNE(n_components=2, perplexity=min(30.0, (n - 1) / 3), init="pca", random_state=seed)
            return tsne.fit_transform(x), "tsne"
    # PCA by SVD of the centred embeddings; a 1-D embedding gets a zero second axis.
    centred = x - x.mean(axis=0)
    _, _, vt = np.linalg.svd(centred, full_matrices=False)
    coords = centred @ vt[:2].T
    if coords.shape[1] < 2:
        coords = np.column_stack([coords, np.zeros(n)])
    return coords, "pca"


def _write_embedding_plot(
    path: Path, groups: list[_Group], embeddings: np.ndarray, identities: Sequence[str] | None, seed: int
) -> str:
    """Scatter of the projected tracks coloured by cluster (and by identity); returns the projection name."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.lines import Line2D

    coords, projection = _project(embeddings, seed)
    n = embeddings.shape[0]
    known = [g for g in groups if g.cluster_id is not None]

    def dot(label: str, color) -> Line2D:
        return Line2D([], [], linestyle="", marker="o", color=color, label=label)

    # Panel: title, colour per track, Unknown mask (grey crosses), legend handles, number of colours.
    cluster_colors = np.zeros((n, 3))
    unknown = np.zeros(n, dtype=bool)
    for group in groups:
        if group.cluster_id is None:
            unknown[group.members] = True
    for rank, group in enumerate(known):
        cluster_colors[group.members] = _color(rank)
    handles = [dot(g.name, _color(r)) for r, g in enumerate(known)]
    if unknown.any():
        handles.append(Line2D([], [], linestyle="", marker="x", color=_UNKNOWN_COLOR, label="Unknown"))
    panels = [(f"{len(known)} clusters", cluster_colors, unknown, handles, len(known))]
    if identities is not None:
        names = [name for name, _ in Counter(identities).most_common()]
        rank_of = {name: r for r, name in enumerate(names)}
        identity_colors = np.array([_color(rank_of[i]) for i in identities]).reshape(n, 3)
        handles = [dot(str(name), _color(r)) for r, name in enumerate(names)]
        panels.append((f"{len(names)} true identities", identity_colors, np.zeros(n, dtype=bool), handles, len(names)))

    fig = Figure(figsize=(6.5 * len(panels), 6), dpi=100, layout="constrained")
    FigureCanvasAgg(fig)
    for k, (name, colors, is_unknown, handles, n_colors) in enumerate(panels):
        ax = fig.add_subplot(1, len(panels), k + 1)
        ax.scatter(*coords[~is_unknown].T, c=colors[~is_unknown], s=14, linewidths=0)
        if is_unknown.any():
            ax.scatter(*coords[is_unknown].T, c=[_UNKNOWN_COLOR], marker="x", s=14, linewidths=0.8)
        ax.set_title(name if n else "no tracks")
        ax.set_xticks([])
        ax.set_yticks([])
        if 0 < n_colors <= _colormap_size():  # beyond, colours repeat and a legend would mislead
            ax.legend(handles=handles, fontsize=7, loc="upper left", bbox_to_anchor=(1, 1), frameon=False)
    fig.suptitle(f"{projection} projection of {n} track embeddings", fontsize=10)
    fig.savefig(path, format="png")
    return projection


def _html(
    title: str,
    groups: list[_Group],
    n_tracks: int,
    n_clusters: int,
    n_unknown: int,
    identities: Sequence[str] | None,
    projection: str,
) -> str:
    e = html.escape
    summary = [f"{n_tracks} tracks", f"{n_clusters} clusters", f"{n_unknown} Unknown"]
    if identities is not None:
        summary.append(f"{len(set(identities))} identities")
    columns = ["cluster", "tracks"] + (["majority identity", "share"] if identities is not None else [])
    header = "<tr>" + "".join(f"<th>{c}</th>" for c in columns) + "</tr>"
    rows = []
    for group in groups:
        cells = [e(str(group.cluster_id) if group.cluster_id is not None else "Unknown"), str(len(group.members))]
        if identities is not None:
            cells += [e(str(group.majority)), f"{100 * group.share:.0f}%"]
        rows.append("<tr>" + "".join(f"<td>{c}</td>" for c in cells) + "</tr>")
    return f"""<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
<title>{e(title)}</title>
<style>
body {{ font-family: sans-serif; margin: 2em; color: #222; }}
img {{ max-width: 100%; border: 1px solid #ddd; }}
table {{ border-collapse: collapse; }}
td, th {{ border: 1px solid #ccc; padding: 2px 8px; text-align: left; }}
</style>
</head>
<body>
<h1>{e(title)}</h1>
<p>{e(" · ".join(summary))}</p>
<h2>Contact sheet</h2>
<img src="{CONTACT_SHEET}" alt="one row of thumbnails per cluster">
<h2>Embeddings ({e(projection)})</h2>
<img src="{EMBEDDING_PLOT}" alt="2-D projection of the track embeddings">
<h2>Clusters</h2>
<table>
{header}
{chr(10).join(rows)}
</table>
</body>
</html>
"""
