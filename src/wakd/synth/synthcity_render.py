"""Facade textures and a vectorised 2.5-D ray-caster for the synthetic city.

The world is a street plane (x = easting, y = northing, metres) with vertical facade
segments of given heights. For each image column one ray is cast in the plane against
all facade segments; the nearest hit gives a perpendicular distance ``d`` so that a
world height ``z`` appears at row ``r0 - (z - h_cam) * f / d`` (a pinhole camera with
zero pitch). Viewpoint shifts therefore produce real parallax and scale change.
Textures are stored as a mip-mapped atlas so that distant facades are not aliased
(aliasing would make two views a metre apart look unrelated).

Headings are compass angles in degrees: 0 = north (+y), 90 = east (+x).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

PX_PER_M = 4  # facade texture resolution; a near facade (8 m) at f=64 px is ~8 px/m on screen
MIP_LEVELS = 5
CAMERA_HEIGHT = 2.5  # metres, a car-mounted panorama camera
HORIZON_FRAC = 0.6  # horizon row / image height: a slight upward pitch shows more facade
FOG_DISTANCE = 160.0  # metres; exp(-d / FOG) attenuation towards the haze colour


# ---------------------------------------------------------------------------- facades


@dataclass(frozen=True)
class FacadeStyle:
    """One of a small set of repeating architectural styles (shared by many buildings)."""

    wall: np.ndarray  # [3] albedo in [0, 1]
    trim: np.ndarray  # cornice, bands, pilasters
    window: np.ndarray
    floor_h: float  # metres per storey
    win_w: float
    win_h: float
    bay_w: float  # horizontal spacing of window columns
    floors: tuple[int, int]  # inclusive range of storeys above the ground floor
    shopfront: bool
    bands: bool
    pilasters: bool
    sign_prob: float


def _hsv(h: float, s: float, v: float) -> np.ndarray:
    i = int(h * 6) % 6
    f = h * 6 - int(h * 6)
    p, q, t = v * (1 - s), v * (1 - f * s), v * (1 - (1 - f) * s)
    return np.array([(v, t, p), (q, v, p), (p, v, t), (p, q, v), (t, p, v), (v, p, q)][i])


def make_styles(rng: np.random.Generator, n: int) -> list[FacadeStyle]:
    """``n`` distinct styles with hues spread around the colour wheel."""
    styles = []
    for i in range(n):
        hue = (i / n + rng.uniform(-0.05, 0.05)) % 1.0
        wall = _hsv(hue, rng.uniform(0.2, 0.55), rng.uniform(0.45, 0.85))
        trim = _hsv(
            (hue + rng.uniform(0.3, 0.7)) % 1.0, rng.uniform(0.0, 0.3), rng.uniform(0.3, 0.95)
        )
        window = _hsv(rng.uniform(0.5, 0.7), rng.uniform(0.1, 0.4), rng.uniform(0.12, 0.35))
        floor_h = rng.uniform(3.0, 4.2)
        styles.append(
            FacadeStyle(
                wall=wall,
                trim=trim,
                window=window,
                floor_h=floor_h,
                win_w=rng.uniform(0.9, 2.2),
                win_h=rng.uniform(1.2, 0.7 * floor_h),
                bay_w=rng.uniform(2.5, 4.5),
                floors=(int(rng.integers(1, 4)), int(rng.integers(4, 8))),
                shopfront=bool(rng.random() < 0.5),
                bands=bool(rng.random() < 0.5),
                pilasters=bool(rng.random() < 0.5),
                sign_prob=float(rng.uniform(0.2, 0.7)),
            )
        )
    return styles


def make_facade(
    rng: np.random.Generator, style: FacadeStyle, width_m: float, colour_jitter: float
) -> np.ndarray:
    """Albedo texture [rows, cols, 3] float32 of one building front; row 0 is street level.

    The style fixes the layout; per-building draws (storeys, colour shift, lit windows,
    door position, sign) make each building unique while keeping look-alikes common.
    """
    floors = int(rng.integers(style.floors[0], style.floors[1] + 1))
    ground_h = style.floor_h * 1.15
    height = ground_h + floors * style.floor_h + 0.8
    rows, cols = round(height * PX_PER_M), max(1, round(width_m * PX_PER_M))
    z = ((np.arange(rows) + 0.5) / PX_PER_M)[:, None]
    x = ((np.arange(cols) + 0.5) / PX_PER_M)[None, :]

    wall = np.clip(style.wall * (1 + rng.normal(0, colour_jitter, 3)), 0, 1)
    # Low-frequency weathering so that a wall is not one flat colour.
    k1, k2, ph1, ph2 = rng.uniform(0.2, 0.9), rng.uniform(0.1, 0.5), *rng.uniform(0, 6.3, 2)
    weather = 1 + 0.07 * np.sin(k1 * x + ph1) * np.cos(k2 * z + ph2)
    tex = wall[None, None, :] * weather[..., None]

    n_bays = max(1, int(width_m // style.bay_w))
    bay = width_m / n_bays
    bay_idx = np.minimum((x // bay).astype(int), n_bays - 1)
    in_bay = np.abs((x % bay) - bay / 2)
    storey = ((z - ground_h) // style.floor_h).astype(int)
    in_storey = (z - ground_h) % style.floor_h
    sill = 0.35 * (style.floor_h - style.win_h)
    upper = (storey >= 0) & (storey < floors)
    win = upper & (in_bay < style.win_w / 2) & (in_storey > sill) & (in_storey < sill + style.win_h)
    # Per-window brightness and a few lit (yellow) windows: unique detail per building.
    shade = rng.uniform(0.6, 1.4, (floors + 1, n_bays))
    lit = rng.random((floors + 1, n_bays)) < 0.12
    sidx = np.clip(storey, 0, floors)
    win_col = style.window[None, None, :] * shade[sidx, bay_idx][..., None]
    win_col = np.where(lit[sidx, bay_idx][..., None], np.array([0.95, 0.85, 0.45]), win_col)
    tex = np.where(win[..., None], win_col, tex)

    trim = style.trim[None, None, :]
    if style.bands:
        band = upper & (in_storey < 0.35)
        tex = np.where(band[..., None], trim, tex)
    if style.pilasters:
        pil = (np.minimum(x % bay, bay - x % bay) < 0.25) & (z > ground_h)
        tex = np.where(pil[..., None], trim * 0.9, tex)
    tex = np.where((z > height - 0.8)[..., None], trim * 0.8, tex)  # cornice

    # Ground floor: a glazed shopfront with a sign band, or doors between small windows.
    gf = z < ground_h
    accent = _hsv(rng.random(), rng.uniform(0.5, 1.0), rng.uniform(0.5, 1.0))
    if style.shopfront:
        glass = gf & (z > 0.4) & (z < ground_h - 1.0) & (in_bay < bay / 2 - 0.3)
        sign_band = gf & (z >= ground_h - 0.9) & (z < ground_h - 0.15)
        tex = np.where(glass[..., None], style.window * 1.3, tex)
        tex = np.where(sign_band[..., None], accent, tex)
    else:
        gwin = (
            gf
            & (in_bay < style.win_w / 2)
            & (z > 1.0)
            & (z < 1.0 + min(style.win_h, ground_h - 1.3))
        )
        tex = np.where(gwin[..., None], style.window, tex)
    door_x = rng.uniform(0.8, max(0.9, width_m - 0.8))
    door = gf & (np.abs(x - door_x) < 0.6) & (z < 2.3)
    tex = np.where(door[..., None], accent * 0.45, tex)

    if rng.random() < style.sign_prob and floors >= 1:
        sx, sw = rng.uniform(0, width_m), rng.uniform(0.6, 2.5)
        sz, sh = ground_h + rng.uniform(0.2, 1.5), rng.uniform(0.6, 2.5)
        sign = (np.abs(x - sx) < sw / 2) & (z > sz) & (z < sz + sh)
        col = _hsv(rng.random(), rng.uniform(0.6, 1.0), rng.uniform(0.6, 1.0))
        tex = np.where(sign[..., None], col, tex)
    return np.clip(tex, 0, 1).astype(np.float32)


class FacadeAtlas:
    """All facade textures side by side, mip-mapped, flattened for one-gather lookups."""

    def __init__(self, textures: list[np.ndarray], pad_colour: np.ndarray) -> None:
        align = 2 ** (MIP_LEVELS - 1)
        widths = np.array([t.shape[1] for t in textures])
        slots = -(-widths // align) * align  # each facade starts on a mip-aligned column
        self.offsets = np.concatenate([[0], np.cumsum(slots)[:-1]]).astype(np.int64)
        self.widths = widths.astype(np.int64)
        rows = -(-max(t.shape[0] for t in textures) // align) * align
        # Rows above a roof hold the sky colour so that coarse mip levels blend roofs into sky.
        atlas = np.empty((rows, int(slots.sum()), 3), np.float32)
        atlas[:] = pad_colour
        for tex, off, slot in zip(textures, self.offsets, slots, strict=True):
            atlas[: tex.shape[0], off : off + tex.shape[1]] = tex
            # Repeat the last column into the alignment slack (avoids seams at coarse levels).
            atlas[: tex.shape[0], off + tex.shape[1] : off + slot] = tex[:, -1:]
        levels, self.level_shape, self.level_base = [], [], []
        base = 0
        for level in range(MIP_LEVELS):
            if level:
                h, w = atlas.shape[0] // 2, atlas.shape[1] // 2
                atlas = atlas.reshape(h, 2, w, 2, 3).mean(axis=(1, 3))
            levels.append(np.round(atlas * 255).astype(np.uint8).reshape(-1, 3))
            self.level_shape.append(atlas.shape[:2])
            self.level_base.append(base)
            base += atlas.shape[0] * atlas.shape[1]
        self.flat = np.concatenate(levels)
        self.level_width = np.array([s[1] for s in self.level_shape], np.int64)
        self.level_rows = np.array([s[0] for s in self.level_shape], np.int64)
        self.level_base = np.array(self.level_base, np.int64)


# ---------------------------------------------------------------------------- lighting


@dataclass(frozen=True)
class Lighting:
    """Global illumination of one view."""

    sun_dir: np.ndarray  # [2] unit vector towards the sun (horizontal component)
    ambient: float
    diffuse: float
    light: np.ndarray  # [3] colour of the light
    sky_top: np.ndarray
    sky_horizon: np.ndarray
    haze: np.ndarray

    @staticmethod
    def from_scalar(t: float) -> Lighting:
        """Time-of-day change ``t`` in [-1, 1]; 0 is the database (reference) condition.

        The sun swings by up to 110 degrees, so walls that were lit fall into shade and the
        other way round, while the light dims and turns cool (t < 0) or warm (t > 0).
        """
        t = float(np.clip(t, -1, 1))
        az = math.radians(135.0 + 110.0 * t)
        a = abs(t)
        tint = np.array([1.0, 0.82, 0.62]) if t > 0 else np.array([0.72, 0.82, 1.0])
        light = (1 - a) * np.ones(3) + a * tint
        dim = 1 - 0.35 * a
        return Lighting(
            sun_dir=np.array([math.sin(az), math.cos(az)]),
            ambient=0.62 * dim,
            diffuse=0.55 * (1 - 0.6 * a),
            light=light * dim,
            sky_top=np.array([0.35, 0.55, 0.9]) * light * dim,
            sky_horizon=np.array([0.75, 0.82, 0.92]) * light * dim,
            haze=np.array([0.7, 0.75, 0.82]) * light * dim,
        )


# ---------------------------------------------------------------------------- ray caster


@dataclass
class Facades:
    """Facade segments: start point, direction*length, outward normal, height, texture id."""

    start: np.ndarray  # [S, 2]
    edge: np.ndarray  # [S, 2] start -> end
    normal: np.ndarray  # [S, 2] unit, pointing to the street
    height: np.ndarray  # [S] metres
    atlas: FacadeAtlas

    @property
    def length(self) -> np.ndarray:
        return np.linalg.norm(self.edge, axis=1)


def render_view(
    facades: Facades,
    x: float,
    y: float,
    heading_deg: float,
    size: tuple[int, int],
    fov_deg: float,
    lighting: Lighting,
    max_dist: float = 400.0,
) -> np.ndarray:
    """Render one perspective view; returns float32 [H, W, 3] in [0, 1]."""
    h, w = size
    f = (w / 2) / math.tan(math.radians(fov_deg) / 2)
    alpha = np.arctan((np.arange(w) + 0.5 - w / 2) / f)
    ang = math.radians(heading_deg) + alpha
    ray = np.stack([np.sin(ang), np.cos(ang)], axis=1)  # [W, 2]
    origin = np.array([x, y])

    # Cull segments that face away from the camera or lie beyond the far plane.
    rel = facades.start - origin
    keep = np.einsum("sk,sk->s", facades.normal, -rel) > 0
    mid = rel + facades.edge / 2
    keep &= np.einsum("sk,sk->s", mid, mid) < (max_dist + facades.length / 2) ** 2
    idx = np.nonzero(keep)[0]
    rel, edge = rel[idx], facades.edge[idx]

    # Ray/segment intersection: origin + t*ray = start + s*edge.
    den = ray[:, None, 0] * edge[None, :, 1] - ray[:, None, 1] * edge[None, :, 0]
    with np.errstate(divide="ignore", invalid="ignore"):
        t = (rel[None, :, 0] * edge[None, :, 1] - rel[None, :, 1] * edge[None, :, 0]) / den
        s = (rel[None, :, 0] * ray[:, None, 1] - rel[None, :, 1] * ray[:, None, 0]) / den
    valid = (t > 0.05) & (s >= 0) & (s <= 1)
    t = np.where(valid, t, np.inf)
    j = np.argmin(t, axis=1) if idx.size else np.zeros(w, int)
    cols = np.arange(w)
    t_hit = t[cols, j] if idx.size else np.full(w, np.inf)
    hit = np.isfinite(t_hit)
    seg = idx[j] if idx.size else np.zeros(w, int)
    s_hit = np.where(hit, s[cols, j] if idx.size else 0.0, 0.0)
    t_hit = np.where(hit, t_hit, 1e6)
    depth = t_hit * np.cos(alpha)  # perpendicular distance, as a pinhole camera sees it

    # Mip level from the facade footprint of one pixel (oblique walls shrink horizontally).
    normal = facades.normal[seg]
    cos_inc = np.clip(np.abs(np.einsum("wk,wk->w", ray, normal)), 0.3, 1.0)
    footprint = depth / f * PX_PER_M / np.sqrt(cos_inc)
    level = np.clip(np.round(np.log2(np.maximum(footprint, 1.0))), 0, MIP_LEVELS - 1).astype(int)

    r = np.arange(h) + 0.5
    r0 = h * HORIZON_FRAC
    z = CAMERA_HEIGHT + (r0 - r)[:, None] * (depth / f)[None, :]  # world height per pixel
    wall = hit[None, :] & (z >= 0) & (z < facades.height[seg][None, :])

    atlas = facades.atlas
    scale = 2.0**level
    # Facade i uses texture i of the atlas.
    u_px = np.minimum(s_hit * facades.length[seg] * PX_PER_M, atlas.widths[seg] - 1)
    col = ((atlas.offsets[seg] + u_px) / scale).astype(np.int64)
    row = np.clip((z * PX_PER_M / scale[None, :]).astype(np.int64), 0, atlas.level_rows[level] - 1)
    flat = atlas.level_base[level][None, :] + row * atlas.level_width[level][None, :] + col[None, :]
    albedo = atlas.flat[np.where(wall, flat, 0)].astype(np.float32) / 255.0

    shade = lighting.ambient + lighting.diffuse * np.maximum(normal @ lighting.sun_dir, 0.0)
    wall_rgb = albedo * (shade[None, :, None] * lighting.light[None, None, :])
    fog_w = 1 - np.exp(-t_hit / FOG_DISTANCE)
    wall_rgb = wall_rgb * (1 - fog_w)[None, :, None] + lighting.haze * fog_w[None, :, None]

    # Sky above the horizon, road below: functions of the row only.
    elev = np.clip((r0 - r) / r0, 0, 1)[:, None]
    sky = lighting.sky_horizon * (1 - elev) + lighting.sky_top * elev
    ground_dist = np.where(r > r0, CAMERA_HEIGHT * f / np.maximum(r - r0, 1e-3), 1e6)
    g_fog = (1 - np.exp(-ground_dist / FOG_DISTANCE))[:, None]
    road = (
        np.array([0.36, 0.36, 0.38]) * lighting.light * (lighting.ambient + 0.3 * lighting.diffuse)
    )
    ground = road * (1 - g_fog) + lighting.haze * g_fog
    background = np.where((r > r0)[:, None], ground, sky)  # [H, 3]
    img = np.where(wall[..., None], wall_rgb, background[:, None, :])
    return np.clip(img, 0, 1).astype(np.float32)


# ---------------------------------------------------------------------------- query effects


@dataclass(frozen=True)
class QueryEffects:
    """Strength of the appearance changes between a query and its database views."""

    colour_jitter: float = 0.15  # per-channel gain spread
    gain_jitter: float = 0.25  # global exposure spread
    gamma_jitter: float = 0.25
    noise_sigma: float = 0.03  # Gaussian pixel noise, on [0, 1] intensities
    max_occluders: int = 3  # cars, people, blobs per query


def apply_query_effects(img: np.ndarray, rng: np.random.Generator, fx: QueryEffects) -> np.ndarray:
    """Occluders, camera colour response and sensor noise, in place-independent screen space."""
    h, w, _ = img.shape
    rr = np.arange(h)[:, None] + 0.5
    cc = np.arange(w)[None, :] + 0.5
    r0 = h * HORIZON_FRAC
    for _ in range(int(rng.integers(0, fx.max_occluders + 1))):
        colour = rng.uniform(0.05, 0.95, 3)
        kind = rng.integers(3)
        if kind == 0:  # car: wide box standing on the road, window band on top
            cw, ch = rng.uniform(0.15, 0.45) * w, rng.uniform(0.08, 0.2) * h
            cx, bottom = rng.uniform(0, w), rng.uniform(r0 + 0.05 * h, h + 0.1 * h)
            mask = (np.abs(cc - cx) < cw / 2) & (rr < bottom) & (rr > bottom - ch)
            glass = mask & (rr < bottom - 0.6 * ch)
            img = np.where(mask[..., None], colour, img)
            img = np.where(glass[..., None], colour * 0.35, img)
        elif kind == 1:  # pedestrian: narrow tall box with a head
            pw, ph = rng.uniform(0.03, 0.07) * w, rng.uniform(0.2, 0.45) * h
            px, bottom = rng.uniform(0, w), rng.uniform(r0 + 0.05 * h, h + 0.05 * h)
            body = (np.abs(cc - px) < pw / 2) & (rr < bottom) & (rr > bottom - 0.85 * ph)
            head = (cc - px) ** 2 + (rr - (bottom - 0.92 * ph)) ** 2 < (0.09 * ph) ** 2
            img = np.where((body | head)[..., None], colour, img)
        else:  # blob: foliage, a pole sign, a lens smudge
            ax, ay = rng.uniform(0.04, 0.18) * w, rng.uniform(0.04, 0.18) * h
            bx, by = rng.uniform(0, w), rng.uniform(0, h)
            mask = ((cc - bx) / ax) ** 2 + ((rr - by) / ay) ** 2 < 1
            img = np.where(mask[..., None], colour, img)
    gain = rng.uniform(1 - fx.gain_jitter, 1 + fx.gain_jitter)
    chan = rng.uniform(1 - fx.colour_jitter, 1 + fx.colour_jitter, 3)
    gamma = rng.uniform(1 - fx.gamma_jitter, 1 + fx.gamma_jitter)
    img = np.clip(img * gain * chan, 0, 1) ** gamma
    img = img + rng.normal(0, fx.noise_sigma, img.shape)
    return np.clip(img, 0, 1).astype(np.float32)
