"""A deterministic synthetic city in the NetVLAD ``.mat`` layout, and a renderer of fresh views.

Streets form an irregular grid lined by building facades drawn from a few repeating
styles (look-alike places exist, so hard negatives matter) with per-building details
(so places remain distinguishable). The database holds panoramas every few metres along
the streets, cut into several headings; queries stand a few metres off, look in a
jittered direction and differ by lighting, camera response, noise and occluders. The
train / val / test splits are disjoint bands of the city (west to east), as in
Pittsburgh.

Written tree (the contract with :mod:`wakd.data.datasets`)::

    <out>/synthcity/raw/synthcity_{train,val,test}.mat
    <out>/synthcity/raw/images/000/000123_yaw2.jpg     (database)
    <out>/synthcity/raw/queries/000/000045_q.jpg       (queries)
    <out>/synthcity/raw/synthcity_manifest.json        (preset, seed, counts)

Usage: ``python -m wakd.synth.synthcity --out datasets/data --preset demo --seed 0``.
"""

from __future__ import annotations

import argparse
import dataclasses
import itertools
import json
import os
import shutil
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from wakd.atomic import atomic_write_json
from wakd.data.netvlad_mat import DbStruct, save_dbstruct
from wakd.synth.synthcity_render import (
    PX_PER_M,
    FacadeAtlas,
    Facades,
    Lighting,
    QueryEffects,
    apply_query_effects,
    make_facade,
    make_styles,
    render_view,
)

SPLITS = ("train", "val", "test")
MANIFEST = "synthcity_manifest.json"
GENERATOR_VERSION = 2  # bump when the output of a given preset + seed changes
JPEG_QUALITY = 90


@dataclass(frozen=True)
class CityConfig:
    """Size of the city and the difficulty knobs of its queries."""

    blocks_x: int  # blocks between the westmost and eastmost street
    blocks_y: int
    block_pitch: tuple[float, float] = (45.0, 75.0)  # street-to-street distance range (m)
    street_half_width: float = 8.0  # centre line to facade (m)
    building_width: tuple[float, float] = (7.0, 18.0)
    place_spacing: float = 10.0  # database panoramas along a street (m)
    headings: int = 4  # database views per place, evenly spaced
    heading_offset_deg: float = 45.0  # first view relative to the street axis
    image_size: tuple[int, int] = (96, 128)  # (H, W)
    fov_deg: float = 90.0  # 4 views x 90 degrees cover the panorama
    n_styles: int = 6  # repeating facade styles: fewer means more look-alike places
    colour_jitter: float = 0.12  # per-building wall colour shift within a style
    split_fractions: tuple[float, float, float] = (0.5, 0.25, 0.25)  # west-to-east bands
    queries: tuple[int, int, int] = (500, 200, 200)  # per split
    query_offset: float = 8.0  # max distance to the database place the query was drawn from (m)
    query_lateral: float = 3.0  # max offset across the street (m); keeps queries on the road
    # Calibrated on 'demo' test (2 seeds, 300 queries): heading jitter 25 deg, lighting 0.8
    # and up to 4 occluders left raw pixels at R@1 0.11-0.14, barely 4x chance; these
    # values give ~0.20 (chance 0.03), the prototype's regime (docs/design.md, synthetic city).
    query_heading_jitter_deg: float = 15.0  # around one of the database headings
    lighting_strength: float = 0.6  # queries draw a time-of-day change in [-s, s]
    effects: QueryEffects = field(default_factory=QueryEffects)


PRESETS: dict[str, CityConfig] = {
    # Seconds to generate: for tests and smoke runs of the whole pipeline.
    "tiny": CityConfig(
        blocks_x=4,
        blocks_y=2,
        place_spacing=15.0,
        image_size=(64, 86),
        queries=(80, 50, 50),
    ),
    # The bundled demo: ~3.4k database images; 228 test places keep chance R@1 near 3 %.
    "demo": CityConfig(blocks_x=12, blocks_y=6, queries=(1000, 300, 300)),
    # The demo city with 600 test queries (train and val identical: each split draws its own
    # queries): paired comparisons of Recall@1 whose standard error is under 2 points.
    "bench": CityConfig(blocks_x=12, blocks_y=6, queries=(1000, 300, 600)),
}


def _config_dict(cfg: CityConfig) -> dict:
    return json.loads(json.dumps(dataclasses.asdict(cfg)))


@dataclass(frozen=True)
class StreetSegment:
    """A straight piece of street centre line; ``axis_deg`` is its compass direction."""

    start: np.ndarray  # [2]
    axis_deg: float
    length: float

    def point(self, along: np.ndarray) -> np.ndarray:
        a = np.radians(self.axis_deg)
        return self.start[None, :] + np.asarray(along)[:, None] * np.array([np.sin(a), np.cos(a)])


def _axis_vectors(axis_deg: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    a = np.radians(axis_deg)
    along = np.stack([np.sin(a), np.cos(a)], axis=-1)
    across = np.stack([np.cos(a), -np.sin(a)], axis=-1)
    return along, across


class City:
    """The street layout, facades and splits built from ``(config, seed)``; renders views."""

    def __init__(self, config: CityConfig | str = "demo", seed: int = 0) -> None:
        self.config = PRESETS[config] if isinstance(config, str) else config
        self.seed = int(seed)
        cfg = self.config
        rng = np.random.default_rng(np.random.SeedSequence([self.seed, 1]))
        # Street centre lines; an outer ring of blocks closes the views at the city edge.
        self.xs = np.concatenate([[0.0], np.cumsum(rng.uniform(*cfg.block_pitch, cfg.blocks_x))])
        self.ys = np.concatenate([[0.0], np.cumsum(rng.uniform(*cfg.block_pitch, cfg.blocks_y))])
        self.facades = self._build_facades(rng)
        self.segments = self._street_segments()
        edges = np.cumsum([0.0, *cfg.split_fractions]) / sum(cfg.split_fractions)
        self.split_x = self.xs[0] + edges * (self.xs[-1] - self.xs[0])

    # -- layout -----------------------------------------------------------------------

    def _build_facades(self, rng: np.random.Generator) -> Facades:
        cfg = self.config
        hw, outer = cfg.street_half_width, 40.0
        gx = np.concatenate([[self.xs[0] - hw - outer], self.xs, [self.xs[-1] + hw + outer]])
        gy = np.concatenate([[self.ys[0] - hw - outer], self.ys, [self.ys[-1] + hw + outer]])
        styles = make_styles(rng, cfg.n_styles)
        starts, edges, normals, heights, textures = [], [], [], [], []
        for i in range(len(gx) - 1):
            for j in range(len(gy) - 1):
                x0, x1 = gx[i] + hw * (i > 0), gx[i + 1] - hw * (i < len(gx) - 2)
                y0, y1 = gy[j] + hw * (j > 0), gy[j + 1] - hw * (j < len(gy) - 2)
                # Counter-clockwise perimeter: textures read left to right from the street.
                corners = [(x0, y0), (x1, y0), (x1, y1), (x0, y1), (x0, y0)]
                for a, b in itertools.pairwise(corners):
                    a, b = np.array(a), np.array(b)
                    side = b - a
                    length = float(np.linalg.norm(side))
                    unit = side / length
                    normal = np.array([unit[1], -unit[0]])  # right of a CCW edge = outward
                    for u0, u1 in self._split_side(rng, length):
                        style = styles[int(rng.integers(len(styles)))]
                        tex = make_facade(rng, style, u1 - u0, cfg.colour_jitter)
                        starts.append(a + unit * u0)
                        edges.append(unit * (u1 - u0))
                        normals.append(normal)
                        heights.append(tex.shape[0] / PX_PER_M)
                        textures.append(tex)
        sky = Lighting.from_scalar(0.0).sky_horizon
        return Facades(
            start=np.array(starts),
            edge=np.array(edges),
            normal=np.array(normals),
            height=np.array(heights),
            atlas=FacadeAtlas(textures, pad_colour=sky),
        )

    def _split_side(self, rng: np.random.Generator, length: float) -> list[tuple[float, float]]:
        lo, hi = self.config.building_width
        cuts = [0.0]
        while length - cuts[-1] > hi:
            cuts.append(cuts[-1] + rng.uniform(lo, hi))
        if length - cuts[-1] < lo and len(cuts) > 1:
            cuts.pop()  # a sliver at the corner joins its neighbour
        cuts.append(length)
        return list(itertools.pairwise(cuts))

    def _street_segments(self) -> list[StreetSegment]:
        # North-south streets run through the crossings; east-west ones stop at the
        # crossing squares, so that no place or cell is claimed by two streets.
        hw = self.config.street_half_width
        segs = [
            StreetSegment(np.array([x, self.ys[0]]), 0.0, float(self.ys[-1] - self.ys[0]))
            for x in self.xs
        ]
        for y in self.ys:
            for xa, xb in zip(self.xs[:-1], self.xs[1:], strict=True):
                segs.append(StreetSegment(np.array([xa + hw, y]), 90.0, float(xb - xa - 2 * hw)))
        return segs

    def _split_mask(self, xy: np.ndarray, split: str) -> np.ndarray:
        k = SPLITS.index(split)
        lo, hi = self.split_x[k], self.split_x[k + 1]
        last = k == len(SPLITS) - 1
        return (xy[:, 0] >= lo) & ((xy[:, 0] <= hi) if last else (xy[:, 0] < hi))

    def _street_pieces(self, spacing: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Every street cut into pieces of about ``spacing`` metres: centres, axes, half lengths."""
        centres, axes, halves = [], [], []
        for seg in self.segments:
            n = max(1, round(seg.length / spacing))
            piece = seg.length / n
            centres.append(seg.point((np.arange(n) + 0.5) * piece))
            axes.append(np.full(n, seg.axis_deg))
            halves.append(np.full(n, piece / 2))
        return np.concatenate(centres), np.concatenate(axes), np.concatenate(halves)

    def places(self, split: str) -> tuple[np.ndarray, np.ndarray]:
        """Database panorama positions [P, 2] and street axes [P] (degrees) of a split."""
        xy, axis, _ = self._street_pieces(self.config.place_spacing)
        m = self._split_mask(xy, split)
        return xy[m], axis[m]

    def cells(self, split: str = "train", cell_size: float = 10.0) -> tuple[np.ndarray, ...]:
        """Streets of a split cut into ~``cell_size`` m cells (class ``i`` = row ``i``).

        Returns centres [C, 2], street axes [C] (degrees) and half lengths [C] (metres).
        """
        xy, axis, half = self._street_pieces(cell_size)
        m = self._split_mask(xy, split)
        return xy[m], axis[m], half[m]

    def train_cells(self, cell_size: float = 10.0) -> tuple[np.ndarray, ...]:
        """The training streets cut into place-classification cells; see :meth:`cells`."""
        return self.cells("train", cell_size)

    def view_headings(self, axis_deg: float) -> np.ndarray:
        """The database headings of a place on a street with the given axis."""
        cfg = self.config
        return (
            axis_deg + cfg.heading_offset_deg + 360.0 * np.arange(cfg.headings) / cfg.headings
        ) % 360

    # -- rendering ----------------------------------------------------------------------

    def render(
        self,
        x: float,
        y: float,
        heading_deg: float,
        *,
        size: tuple[int, int] | None = None,
        fov_deg: float | None = None,
        lighting: float | None = None,
        rng: np.random.Generator | None = None,
        query_like: bool = False,
    ) -> np.ndarray:
        """Render the view from ``(x, y)`` looking at compass ``heading_deg``: uint8 [H, W, 3].

        ``lighting`` is a time-of-day change in [-1, 1] (0 = database condition); ``None``
        means 0 for database-like views and a random draw for query-like ones.
        ``query_like`` adds the query appearance changes (occluders, camera colour
        response, noise) drawn from ``rng``.
        """
        cfg = self.config
        if query_like and rng is None:
            rng = np.random.default_rng()
        if lighting is None:
            s = cfg.lighting_strength
            lighting = float(rng.uniform(-s, s)) if query_like else 0.0
        img = render_view(
            self.facades,
            x,
            y,
            heading_deg,
            size=size or cfg.image_size,
            fov_deg=fov_deg or cfg.fov_deg,
            lighting=Lighting.from_scalar(lighting),
        )
        if query_like:
            img = apply_query_effects(img, rng, cfg.effects)
        return np.round(img * 255).astype(np.uint8)

    def sample_query_pose(
        self,
        rng: np.random.Generator,
        centre: np.ndarray,
        axis_deg: float,
        along_half: float,
        heading_index: int | None = None,
    ) -> tuple[float, float, float]:
        """A query-like pose near ``centre``: shifted along (up to ``along_half``) and across
        the street, looking along one of the database headings (``heading_index``, random
        when None) plus jitter."""
        cfg = self.config
        (along,), (across,) = _axis_vectors(np.array([axis_deg]))
        pos = (
            centre
            + along * rng.uniform(-along_half, along_half)
            + across * rng.uniform(-cfg.query_lateral, cfg.query_lateral)
        )
        headings = self.view_headings(axis_deg)
        heading = headings[heading_index] if heading_index is not None else rng.choice(headings)
        heading += rng.uniform(-cfg.query_heading_jitter_deg, cfg.query_heading_jitter_deg)
        return float(pos[0]), float(pos[1]), float(heading % 360)

    def _clip_to_streets(self, xy: np.ndarray) -> np.ndarray:
        m = self.config.street_half_width - 1.0
        return np.stack(
            [
                np.clip(xy[0], self.xs[0] - m, self.xs[-1] + m),
                np.clip(xy[1], self.ys[0] - m, self.ys[-1] + m),
            ]
        )

    def query_poses(self, split: str, n: int, rng: np.random.Generator) -> np.ndarray:
        """``n`` query poses [n, 3] (x, y, heading) each within ``query_offset`` m of a place."""
        cfg = self.config
        xy, axis = self.places(split)
        poses = np.empty((n, 3))
        for i in range(n):
            p = int(rng.integers(len(xy)))
            # Rejection keeps the shift within the radius while drawing it along and across.
            while True:
                x, y, h = self.sample_query_pose(rng, xy[p], axis[p], cfg.query_offset)
                q = self._clip_to_streets(np.array([x, y]))
                if np.linalg.norm(q - xy[p]) <= cfg.query_offset:
                    break
            poses[i] = (q[0], q[1], h)
        return poses


# ---------------------------------------------------------------------------- files


def _write_jpeg(img: np.ndarray, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(img).save(path, quality=JPEG_QUALITY)


def _manifest(preset: str, seed: int, counts: dict[str, dict[str, int]]) -> dict:
    return {
        "generator": "wakd.synth.synthcity",
        "version": GENERATOR_VERSION,
        "preset": preset,
        "seed": seed,
        "config": _config_dict(PRESETS[preset]),
        "counts": counts,
    }


def read_manifest(root: str | os.PathLike) -> dict | None:
    """The manifest of a generated city root, or ``None`` when absent or unreadable."""
    try:
        return json.loads((Path(root) / MANIFEST).read_text())
    except (OSError, ValueError):
        return None


def _is_current(root: Path, preset: str, seed: int) -> bool:
    man = read_manifest(root)
    if man is None or not all((root / f"synthcity_{s}.mat").is_file() for s in SPLITS):
        return False
    expected = _manifest(preset, seed, man.get("counts", {}))
    return man == expected


def generate_city(
    out_dir: str | os.PathLike, preset: str = "demo", seed: int = 0, progress: bool = True
) -> Path:
    """Write the city under ``out_dir/synthcity/raw`` (skipped when already up to date).

    Images are written first, each split's ``.mat`` last (atomically): a ``.mat`` marks a
    complete split. Returns the dataset root.
    """
    from tqdm.auto import tqdm

    if preset not in PRESETS:
        raise ValueError(f"unknown synthcity preset '{preset}' (choose from {sorted(PRESETS)})")
    root = Path(out_dir) / "synthcity" / "raw"
    if _is_current(root, preset, seed):
        return root
    root.mkdir(parents=True, exist_ok=True)
    if read_manifest(root) is not None:
        # A city of another preset or seed: drop its images so no stale files remain.
        (root / MANIFEST).unlink()
        for sub in ("images", "queries"):
            shutil.rmtree(root / sub, ignore_errors=True)
    city = City(preset, seed)
    cfg = city.config
    counts: dict[str, dict[str, int]] = {}
    # Splits share the image folders (as in Pittsburgh): file numbers run on across splits.
    first_place = first_query = 0
    for k, split in enumerate(SPLITS):
        xy, axis = city.places(split)
        rng = np.random.default_rng(np.random.SeedSequence([seed, 2, k]))
        q_poses = city.query_poses(split, cfg.queries[k], rng)
        total = len(xy) * cfg.headings + len(q_poses)
        bar = tqdm(total=total, desc=f"synthcity {split}", disable=not progress, leave=False)
        db_fns, db_utm = [], []
        for p, (pos, ax) in enumerate(zip(xy, axis, strict=True), start=first_place):
            for v, heading in enumerate(city.view_headings(ax)):
                fn = f"{p // 1000:03d}/{p:06d}_yaw{v}.jpg"
                _write_jpeg(city.render(pos[0], pos[1], heading), root / "images" / fn)
                db_fns.append(fn)
                db_utm.append(pos)
                bar.update()
        q_fns = []
        for i, (x, y, heading) in enumerate(q_poses, start=first_query):
            fn = f"{i // 1000:03d}/{i:06d}_q.jpg"
            img = city.render(x, y, heading, rng=rng, query_like=True)
            _write_jpeg(img, root / "queries" / fn)
            q_fns.append(fn)
            bar.update()
        bar.close()
        db = DbStruct(
            split=split,
            db_image_fns=db_fns,
            db_utm=np.array(db_utm, dtype=np.float64),
            q_image_fns=q_fns,
            q_utm=np.ascontiguousarray(q_poses[:, :2]),
        )
        save_dbstruct(db, root / f"synthcity_{split}.mat")
        counts[split] = {"db": db.num_db, "queries": db.num_queries}
        first_place, first_query = first_place + len(xy), first_query + len(q_poses)
    atomic_write_json(root / MANIFEST, _manifest(preset, seed, counts))
    return root


def city_from_root(root: str | os.PathLike) -> City:
    """Rebuild the :class:`City` that generated a dataset root (from its manifest)."""
    man = read_manifest(root)
    if man is None:
        raise FileNotFoundError(
            f"{Path(root) / MANIFEST} not found: not a generated synthcity root"
        )
    return City(man["preset"], man["seed"])


# ---------------------------------------------------------------------------- pretraining


class RenderedPlaces(torch.utils.data.IterableDataset):
    """Endless freshly rendered views of street cells, labelled by cell and heading.

    Each sample is a query-like view (position anywhere in the cell and across the street,
    heading jittered around one database heading, random lighting, occluders, noise):
    ``(image float32 [3, H, W] in [0, 1], class_id)``. Images are not normalised.
    A class is one (cell, heading) pair, as CosPlace groups by position and orientation:
    views of one cell facing opposite ways share nothing a network could learn from.
    """

    def __init__(
        self,
        city_or_root: City | str | os.PathLike,
        split: str = "train",
        size: tuple[int, int] | None = None,
        cell_size: float = 10.0,
        seed: int = 0,
        views: int = 1,
    ) -> None:
        super().__init__()
        self.city = city_or_root if isinstance(city_or_root, City) else city_from_root(city_or_root)
        self.views = views  # > 1: several fresh views of one place per sample, [views, 3, H, W]
        self.size = tuple(size) if size is not None else self.city.config.image_size
        self.centres, self.axes, self.halves = self.city.cells(split, cell_size)
        self.num_headings = len(self.city.view_headings(0.0))
        self.seed = int(seed)
        self._epoch = 0

    @property
    def num_classes(self) -> int:
        return len(self.centres) * self.num_headings

    def sample(self, rng: np.random.Generator) -> tuple[torch.Tensor, int]:
        """One labelled view (or ``views`` views of one place) drawn with ``rng``."""
        label = int(rng.integers(self.num_classes))
        c, heading = divmod(label, self.num_headings)
        images = []
        for _ in range(self.views):
            x, y, h = self.city.sample_query_pose(rng, self.centres[c], self.axes[c], self.halves[c], heading)
            img = self.city.render(x, y, h, size=self.size, rng=rng, query_like=True)
            images.append(torch.from_numpy(img).permute(2, 0, 1).float().div_(255.0))
        return (images[0] if self.views == 1 else torch.stack(images)), label

    def __iter__(self) -> Iterator[tuple[torch.Tensor, int]]:
        info = torch.utils.data.get_worker_info()
        worker = info.id if info is not None else 0
        # Distinct streams per worker and per pass, reproducible from the seed.
        rng = np.random.default_rng(np.random.SeedSequence([self.seed, 3, worker, self._epoch]))
        self._epoch += 1
        while True:
            yield self.sample(rng)


# ---------------------------------------------------------------------------- CLI


def main(argv: Sequence[str] | None = None) -> None:
    """Command line entry point: ``python -m wakd.synth.synthcity --out DIR``."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", required=True, help="output folder (gets synthcity/raw/...)")
    parser.add_argument("--preset", default="demo", choices=sorted(PRESETS))
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    args = parser.parse_args(argv)
    t0 = time.perf_counter()
    root = generate_city(args.out, args.preset, args.seed, progress=not args.quiet)
    counts = read_manifest(root)["counts"]
    summary = ", ".join(f"{s}: {c['db']} db / {c['queries']} q" for s, c in counts.items())
    print(
        f"synthcity ({args.preset}, seed {args.seed}) at {root} [{summary}] in {time.perf_counter() - t0:.1f} s"
    )


if __name__ == "__main__":
    main()
