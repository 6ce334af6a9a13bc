"""Procedural synthetic H&E patches for download-free experiments and tests.

Patches are rendered in optical-density space (Beer-Lambert): a hematoxylin concentration map
(nuclei) and an eosin map (stroma fibres, cytoplasm, pale gland lumina) are mixed with per-image
random stain vectors, so colour varies widely *within* each class. The class is carried by
morphology only: nuclear size, shape, density, pleomorphism and arrangement.

Two related 4-class tasks share the same primitives:

* ``source`` (teacher), tissue type, in the spirit of Kather NCT-CRC-HE-100K:
  ``stroma`` (sparse spindle nuclei aligned with wavy collagen fibres), ``lymphocytes`` (dense,
  small, round, very dark nuclei), ``tumor`` (clustered, large, pleomorphic vesicular nuclei with
  nucleoli, no glands), ``normal_gland`` (round lumina lined by one regular ring of small nuclei).
* ``target`` (students), a glandular grading-like task: ``benign`` (intact rings of small uniform
  nuclei), ``grade_1`` (intact but crowded, stratified rings of enlarged nuclei), ``grade_2``
  (broken rings, irregular small lumina, large nuclei, some scattered nuclei), ``grade_3`` (no
  lumina, solid sheets of large pleomorphic nuclei).

Geometry is defined on a 64-pixel reference frame and scaled with ``image_size`` (fixed field of
view). :class:`SiteStyle` simulates scanner/lab effects (stain shift in HED space, blur,
brightness, noise); :func:`site_styles` draws deterministic styles for simulated hospitals.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np
from scipy import ndimage

from moma_core.data.datasets import ArrayImageDataset, largest_remainder
from moma_core.data.transforms import RGB_FROM_HED

__all__ = [
    "MIN_IMAGE_SIZE",
    "SOURCE_CLASSES",
    "TARGET_CLASSES",
    "TASKS",
    "SiteStyle",
    "generate",
    "site_styles",
    "synthetic_dataset",
]

SOURCE_CLASSES: tuple[str, ...] = ("stroma", "lymphocytes", "tumor", "normal_gland")
TARGET_CLASSES: tuple[str, ...] = ("benign", "grade_1", "grade_2", "grade_3")
TASKS: dict[str, tuple[str, ...]] = {"source": SOURCE_CLASSES, "target": TARGET_CLASSES}

MIN_IMAGE_SIZE = 32
_REF = 64.0  # reference frame (pixels) in which layouts are defined
_CHUNK = 128  # images rendered per vectorized batch
_H0, _E0, _D0 = (RGB_FROM_HED[i].astype(np.float32) for i in range(3))


@dataclass(frozen=True)
class SiteStyle:
    """Acquisition style of one simulated site (lab staining + scanner).

    stain_shift: relative change of hematoxylin and eosin amounts (``(1 + s)`` scaling) and a
        DAB-axis tint proportional to tissue density, i.e. a shift in HED optical-density space.
    blur_sigma: Gaussian blur in pixels of the 64-px reference frame (scaled with image size).
    brightness: multiplier on transmitted light.
    noise: std of additive Gaussian sensor noise, in uint8 grey levels.
    """

    stain_shift: tuple[float, float, float] = (0.0, 0.0, 0.0)
    blur_sigma: float = 0.0
    brightness: float = 1.0
    noise: float = 0.0

    def __post_init__(self) -> None:
        shift = tuple(float(x) for x in self.stain_shift)
        if len(shift) != 3:
            raise ValueError(f"stain_shift needs 3 values (H, E, DAB), got {self.stain_shift}")
        if self.blur_sigma < 0 or self.brightness <= 0 or self.noise < 0:
            raise ValueError(f"invalid SiteStyle: {self}")
        object.__setattr__(self, "stain_shift", shift)

    @classmethod
    def identity(cls) -> SiteStyle:
        """The neutral style (no stain shift, blur, brightness change or noise)."""
        return cls()


def site_styles(n_sites: int, seed: int, strength: float = 1.0) -> list[SiteStyle]:
    """Draw ``n_sites`` deterministic site styles; ``strength`` scales all deviations."""
    if n_sites < 0 or strength < 0:
        raise ValueError(f"need n_sites >= 0 and strength >= 0, got {n_sites}, {strength}")
    rng = np.random.default_rng([seed, 7919])
    styles = []
    for _ in range(n_sites):
        shift = rng.uniform(-0.35, 0.35, 3) * np.array([1.0, 1.0, 0.5]) * strength
        styles.append(
            SiteStyle(
                stain_shift=tuple(float(x) for x in shift),
                blur_sigma=float(rng.uniform(0.0, 1.0) * strength),
                brightness=float(1.0 + rng.uniform(-0.12, 0.12) * strength),
                noise=float(rng.uniform(0.0, 4.0) * strength),
            )
        )
    return styles


# --------------------------------------------------------------------------- layouts


@dataclass
class _Layout:
    """Morphology of one patch in reference-frame units.

    nuclei rows: x, y, semi-axis a (long), semi-axis b, angle, darkness, vesicularity.
    lumens rows: x, y, rx, ry, epithelium outer radius (multiple of the lumen radius; 1 for
    unlined spaces such as fat, vessels or tears), clearing (fraction of eosin removed).
    """

    nuclei: np.ndarray
    lumens: np.ndarray = field(default_factory=lambda: np.zeros((0, 6)))
    fibre: float = 0.3
    fibre_angle: float = 0.0


def _nuclei(
    xy: np.ndarray,
    a: np.ndarray,
    b: np.ndarray,
    theta: np.ndarray,
    dark: np.ndarray,
    ves: np.ndarray | float = 0.0,
) -> np.ndarray:
    """Stack nucleus parameters into ``(k, 7)`` rows (see :class:`_Layout`)."""
    out = np.empty((len(xy), 7))
    out[:, :2] = xy
    out[:, 2], out[:, 3], out[:, 4], out[:, 5], out[:, 6] = a, b, theta, dark, ves
    return out


def _uniform_xy(rng: np.random.Generator, k: int, margin: float = 3.0) -> np.ndarray:
    return rng.uniform(-margin, _REF + margin, (k, 2))


def _clustered_xy(rng: np.random.Generator, k: int, n_clusters: int, spread: float) -> np.ndarray:
    centres = rng.uniform(6, _REF - 6, (n_clusters, 2))
    return centres[rng.integers(0, n_clusters, k)] + rng.normal(0, spread, (k, 2))


def _spindles(rng: np.random.Generator, k: int, angle: float, size: float = 1.0) -> np.ndarray:
    """Elongated fibroblast-like nuclei roughly aligned with ``angle``."""
    a = rng.uniform(4.0, 6.5, k) * size
    b = rng.uniform(0.9, 1.4, k)
    theta = angle + rng.normal(0, 0.2, k)
    return _nuclei(_uniform_xy(rng, k), a, b, theta, rng.uniform(0.9, 1.3, k))


def _round(
    rng: np.random.Generator,
    xy: np.ndarray,
    radius: tuple[float, float],
    aspect: float,
    dark: tuple[float, float],
    ves: tuple[float, float] = (0.0, 0.0),
) -> np.ndarray:
    """Roundish nuclei at ``xy`` with random size, aspect ratio up to ``aspect`` and angle."""
    k = len(xy)
    r = rng.uniform(*radius, k)
    asp = rng.uniform(1.0, aspect, k)
    return _nuclei(
        xy,
        r * np.sqrt(asp),
        r / np.sqrt(asp),
        rng.uniform(0, np.pi, k),
        rng.uniform(*dark, k),
        rng.uniform(*ves, k),
    )


def _place_glands(
    rng: np.random.Generator, count: int, radius: tuple[float, float], wall: float
) -> list[tuple[float, float, float]]:
    """Non-overlapping gland centres and lumen radii (rejection sampling)."""
    glands: list[tuple[float, float, float]] = []
    for _ in range(40 * count):
        if len(glands) == count:
            break
        r = rng.uniform(*radius)
        x, y = rng.uniform(r * 0.3, _REF - r * 0.3, 2)
        if all(math.hypot(x - gx, y - gy) > r + gr + 2 * wall + 1 for gx, gy, gr in glands):
            glands.append((x, y, r))
    return glands


@dataclass(frozen=True)
class _Ring:
    """How the nuclei lining a gland look (reference-frame units)."""

    a: tuple[float, float]
    b: tuple[float, float]
    spacing: float
    offset: float = 3.0
    jitter: float = 0.3
    angle_noise: float = 0.15
    keep: float = 1.0  # fraction of the circumference that keeps its lining
    layers: int = 1
    dark: tuple[float, float] = (0.9, 1.2)
    ves: tuple[float, float] = (0.0, 0.0)


def _ring_nuclei(
    rng: np.random.Generator, x: float, y: float, rx: float, ry: float, ring: _Ring
) -> np.ndarray:
    """Nuclei lining one gland, radially oriented, optionally stratified or broken into arcs."""
    rows = []
    start = rng.uniform(0, 2 * np.pi)
    for layer in range(ring.layers):
        extra = ring.offset + layer * 2.2
        k = max(int(np.pi * (rx + ry + 2 * extra) / ring.spacing), 4)
        phi = start + layer * np.pi / k + np.arange(k) * 2 * np.pi / k + rng.normal(0, 0.05, k)
        keep = ((phi - start) % (2 * np.pi)) < 2 * np.pi * ring.keep
        phi = phi[keep]
        rad = extra + rng.normal(0, ring.jitter, len(phi))
        xy = np.stack([x + (rx + rad) * np.cos(phi), y + (ry + rad) * np.sin(phi)], axis=1)
        theta = phi + rng.normal(0, ring.angle_noise, len(phi))
        rows.append(
            _nuclei(
                xy,
                rng.uniform(*ring.a, len(phi)),
                rng.uniform(*ring.b, len(phi)),
                theta,
                rng.uniform(*ring.dark, len(phi)),
                rng.uniform(*ring.ves, len(phi)),
            )
        )
    return np.concatenate(rows)


def _glandular(
    rng: np.random.Generator,
    count: int,
    radius: tuple[float, float],
    ring: _Ring,
    squash: float = 1.0,
) -> tuple[np.ndarray, np.ndarray]:
    """Glands (lumina + lining nuclei); ``squash`` < 1 makes lumina irregular/elliptic."""
    nuclei, lumens = [], []
    wall = ring.offset + 2.2 * ring.layers + 2
    for x, y, r in _place_glands(rng, count, radius, wall):
        ry = r * rng.uniform(squash, 1.0)
        nuclei.append(_ring_nuclei(rng, x, y, r, ry, ring))
        epi = (ry + ring.offset + 2.2 * (ring.layers - 1) + 2.0) / ry
        lumens.append([x, y, r, ry, epi, rng.uniform(0.7, 0.95)])
    return np.concatenate(nuclei), np.asarray(lumens, dtype=float).reshape(-1, 6)


def _lymphocyte_nuclei(rng: np.random.Generator, k: int) -> np.ndarray:
    """Small, round, dark nuclei scattered uniformly."""
    return _round(rng, _uniform_xy(rng, k), (1.6, 2.2), 1.15, (1.1, 1.6))


def _pale_spaces(rng: np.random.Generator, max_count: int) -> np.ndarray:
    """Unlined empty spaces (fat, vessels, tears): lumen-like without a ring of nuclei."""
    k = int(rng.integers(0, max_count + 1))
    xy = rng.uniform(0, _REF, (k, 2))
    r = rng.uniform(3.5, 9.0, k)
    cols = [
        xy[:, 0],
        xy[:, 1],
        r,
        r * rng.uniform(0.6, 1.0, k),
        np.ones(k),
        rng.uniform(0.7, 0.95, k),
    ]
    return np.stack(cols, axis=1).reshape(-1, 6)


def _outside(points: np.ndarray, spaces: np.ndarray, margin: np.ndarray | float) -> np.ndarray:
    """Mask of points lying outside every elliptic space inflated by ``margin`` (per point)."""
    if len(spaces) == 0:
        return np.ones(len(points), bool)
    margin = np.broadcast_to(np.asarray(margin, dtype=float), (len(points),))[:, None]
    dx = (points[:, None, 0] - spaces[None, :, 0]) / (spaces[None, :, 2] + margin)
    dy = (points[:, None, 1] - spaces[None, :, 1]) / (spaces[None, :, 3] + margin)
    return (dx**2 + dy**2 >= 1).all(axis=1)


def _tissue(
    rng: np.random.Generator,
    nuclei: list[np.ndarray],
    fibre: tuple[float, float],
    lymphs: tuple[int, int] = (0, 8),
    lumens: np.ndarray | None = None,
    spaces: int = 3,
    angle: float | None = None,
) -> _Layout:
    """Assemble a layout: class nuclei + a sprinkle of lymphocytes + lumina / pale spaces.

    Pale spaces never overlap gland lumina and push out the nuclei they would cover.
    """
    lumens = np.zeros((0, 6)) if lumens is None else lumens
    lymph = _lymphocyte_nuclei(rng, int(rng.integers(*lymphs)))
    nuc = np.concatenate([*nuclei, lymph[_outside(lymph[:, :2], lumens, lymph[:, 2])]])
    extra = _pale_spaces(rng, spaces)
    glands = lumens.copy()
    glands[:, 2:4] *= glands[:, 4:5]  # whole gland, epithelium included
    extra = extra[_outside(extra[:, :2], glands, margin=float(extra[:, 2].max(initial=0)))]
    nuc = nuc[_outside(nuc[:, :2], extra, margin=nuc[:, 2] * 0.8)]
    angle = rng.uniform(0, np.pi) if angle is None else angle
    return _Layout(nuc, np.concatenate([lumens, extra]), rng.uniform(*fibre), angle)


def _stroma(rng: np.random.Generator) -> _Layout:
    angle = rng.uniform(0, np.pi)
    spindles = _spindles(rng, int(rng.integers(14, 36)), angle)
    return _tissue(rng, [spindles], (0.6, 1.0), angle=angle)


def _lymphocytes(rng: np.random.Generator) -> _Layout:
    return _tissue(rng, [], (0.0, 0.4), lymphs=(30, 85))


def _tumor(rng: np.random.Generator) -> _Layout:
    k = int(rng.integers(10, 28))
    xy = _clustered_xy(rng, k, int(rng.integers(1, 4)), rng.uniform(8, 16))
    nuclei = _round(rng, xy, (3.5, 5.5), 1.8, (0.8, 1.4), (0.3, 0.7))
    return _tissue(rng, [nuclei], (0.0, 0.4))


def _gland_layout(
    rng: np.random.Generator,
    count: tuple[int, int],
    radius: tuple[float, float],
    ring: _Ring,
    squash: float = 1.0,
    scattered: tuple[int, int] = (0, 1),
    spindles: tuple[int, int] = (2, 12),
) -> _Layout:
    """Glands + interstitial spindle nuclei (+ optional scattered atypical nuclei)."""
    glands, lumens = _glandular(rng, int(rng.integers(*count)), radius, ring, squash)
    angle = rng.uniform(0, np.pi)
    interstitial = _spindles(rng, int(rng.integers(*spindles)), angle, size=0.7)
    xy = _uniform_xy(rng, int(rng.integers(*scattered)))
    atypical = _round(rng, xy, (ring.a[0] * 0.8, ring.a[1]), 1.6, ring.dark, ring.ves)
    stromal = np.concatenate([interstitial, atypical])
    stromal = stromal[_outside(stromal[:, :2], lumens, stromal[:, 2] * 0.5)]
    return _tissue(rng, [glands, stromal], (0.1, 0.5), lumens=lumens, spaces=1, angle=angle)


_NORMAL_RING = _Ring(a=(2.2, 2.8), b=(1.3, 1.7), spacing=4.2)


def _regular_glands(rng: np.random.Generator) -> _Layout:
    """Normal mucosa: ``normal_gland`` in the source task, ``benign`` in the target task."""
    return _gland_layout(rng, (1, 4), (5.0, 9.5), _NORMAL_RING)


def _grade_1(rng: np.random.Generator) -> _Layout:
    ring = _Ring(
        a=(3.0, 3.8),
        b=(1.9, 2.6),
        spacing=3.8,
        jitter=1.0,
        angle_noise=0.35,
        layers=2,
        dark=(0.9, 1.4),
    )
    return _gland_layout(rng, (1, 3), (4.0, 8.0), ring)


def _grade_2(rng: np.random.Generator) -> _Layout:
    ring = _Ring(
        a=(3.5, 4.8),
        b=(2.2, 3.2),
        spacing=4.5,
        jitter=1.2,
        angle_noise=0.8,
        keep=rng.uniform(0.4, 0.65),
        dark=(0.8, 1.5),
        ves=(0.1, 0.5),
    )
    return _gland_layout(rng, (1, 3), (3.0, 6.0), ring, squash=0.5, scattered=(4, 14))


def _grade_3(rng: np.random.Generator) -> _Layout:
    k = int(rng.integers(12, 30))
    xy = _clustered_xy(rng, k, int(rng.integers(2, 5)), rng.uniform(10, 20))
    nuclei = _round(rng, xy, (3.8, 6.0), 1.9, (0.8, 1.7), (0.3, 0.7))
    return _tissue(rng, [nuclei], (0.0, 0.3))


_BUILDERS: dict[str, tuple[Callable[[np.random.Generator], _Layout], ...]] = {
    "source": (_stroma, _lymphocytes, _tumor, _regular_glands),
    "target": (_regular_glands, _grade_1, _grade_2, _grade_3),
}


# --------------------------------------------------------------------------- colour


@dataclass(frozen=True)
class _Palette:
    """Per-image stain colours and amounts, drawn independently of the class."""

    h_vec: np.ndarray
    e_vec: np.ndarray
    h_amount: float
    e_amount: float
    background: np.ndarray
    light: float


def _unit(v: np.ndarray) -> np.ndarray:
    v = np.abs(v) + 1e-3
    return (v / np.linalg.norm(v)).astype(np.float32)


def _palette(rng: np.random.Generator) -> _Palette:
    return _Palette(
        h_vec=_unit(_H0 + rng.normal(0, 0.12, 3)),
        e_vec=_unit(_E0 + rng.normal(0, 0.12, 3)),
        h_amount=float(rng.uniform(0.6, 1.6)),
        e_amount=float(rng.uniform(0.15, 0.7)),
        background=rng.uniform(0.0, 0.08, 3).astype(np.float32),
        light=float(rng.uniform(0.88, 1.05)),
    )


# --------------------------------------------------------------------------- rendering


def _smooth_noise(
    rng: np.random.Generator, shape: tuple[int, int, int], sigma: float
) -> np.ndarray:
    """Unit-variance Gaussian-filtered white noise over a batch of (H, W) maps."""
    noise = rng.standard_normal(shape, dtype=np.float32)
    noise = ndimage.gaussian_filter(noise, sigma=(0, sigma, sigma), truncate=3.0)
    return noise / (noise.std(axis=(1, 2), keepdims=True) + 1e-6)


def _splat(nuc: np.ndarray, img: np.ndarray, half: int, size: int) -> tuple[np.ndarray, ...]:
    """Flat pixel indices and intensities of nuclei drawn in (2*half+1)^2 local windows."""
    x, y, a, b, theta, dark, ves = (nuc[:, i, None, None] for i in range(7))
    off = np.arange(-half, half + 1, dtype=np.float32)
    px = np.floor(x) + off[None, None, :]
    py = np.floor(y) + off[None, :, None]
    dx, dy = px + 0.5 - x, py + 0.5 - y
    cos, sin = np.cos(theta), np.sin(theta)
    r2 = ((dx * cos + dy * sin) / a) ** 2 + ((dy * cos - dx * sin) / b) ** 2
    r = np.sqrt(r2)
    inside = np.clip((1.0 - r) * np.sqrt(a * b) + 0.5, 0.0, 1.0)
    profile = inside * (1.0 - ves * np.clip(1.0 - r2, 0, 1)) + ves * np.exp(-25.0 * r2)
    weight = profile * dark
    valid = (px >= 0) & (px < size) & (py >= 0) & (py < size) & (weight > 1e-3)
    flat = (img[:, None, None] * size + py.astype(np.int64)) * size + px.astype(np.int64)
    return flat[valid], weight[valid]


def _nuclear_map(layouts: Sequence[_Layout], size: int) -> np.ndarray:
    """Sum of anti-aliased elliptical nucleus profiles (vesicular ones with a nucleolus)."""
    scale = np.array([size / _REF] * 4 + [1.0] * 3, np.float32)
    nuc = np.concatenate([lay.nuclei for lay in layouts]).astype(np.float32) * scale
    img = np.repeat(np.arange(len(layouts)), [len(lay.nuclei) for lay in layouts])
    halves = np.ceil(nuc[:, 2]).astype(int) + 1
    buckets = np.minimum(np.ceil(halves / 2).astype(int) * 2, max(int(halves.max(initial=1)), 2))
    flats, weights = [np.zeros(0, np.int64)], [np.zeros(0, np.float32)]
    for half in np.unique(buckets):
        sel = buckets == half
        flat, weight = _splat(nuc[sel], img[sel], int(half), size)
        flats.append(flat)
        weights.append(weight)
    total = len(layouts) * size * size
    out = np.bincount(np.concatenate(flats), np.concatenate(weights), minlength=total)
    return np.minimum(out.reshape(len(layouts), size, size), 1.5).astype(np.float32)


def _lumen_maps(layouts: Sequence[_Layout], size: int) -> tuple[np.ndarray, np.ndarray]:
    """Soft masks of gland lumina and of the epithelial (cytoplasm) band around them."""
    shape = (len(layouts), size, size)
    lumen, epi = np.zeros(shape, np.float32), np.zeros(shape, np.float32)
    grid = (np.arange(size, dtype=np.float32) + 0.5) * (_REF / size)
    for i, lay in enumerate(layouts):
        for x, y, rx, ry, ratio, clear in lay.lumens:
            d = np.sqrt(((grid[None, :] - x) / rx) ** 2 + ((grid[:, None] - y) / ry) ** 2)
            edge = min(rx, ry) * size / _REF
            lumen[i] = np.maximum(lumen[i], clear * np.clip((1 - d) * edge + 0.5, 0, 1))
            epi[i] = np.maximum(epi[i], np.clip((ratio - d) * edge + 0.5, 0, 1))
    return lumen, np.clip(epi - lumen, 0, 1)


def _fibres(layouts: Sequence[_Layout], size: int, warp: np.ndarray) -> np.ndarray:
    """Wavy collagen-like stripes, oriented per image, modulated by a warp field."""
    grid = (np.arange(size, dtype=np.float32) + 0.5) * (_REF / size)
    ang = np.array([lay.fibre_angle for lay in layouts], np.float32)[:, None, None]
    along = grid[None, None, :] * np.sin(ang) - grid[None, :, None] * np.cos(ang)
    stripes = 0.5 + 0.5 * np.sin(along * (2 * np.pi / 5.0) + 2.5 * warp)
    return stripes**2


def _stain_maps(
    layouts: Sequence[_Layout], size: int, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray]:
    """Hematoxylin and eosin concentration maps (before per-image stain amounts)."""
    shape = (len(layouts), size, size)
    scale = size / _REF
    texture = _smooth_noise(rng, shape, 0.7 * scale)  # chromatin in nuclei, grain in stroma
    warp = _smooth_noise(rng, shape, 6.0 * scale)
    fibre = np.array([lay.fibre for lay in layouts], np.float32)[:, None, None]
    lumen, epi = _lumen_maps(layouts, size)
    hema = _nuclear_map(layouts, size) * (1 + 0.3 * texture) + 0.12 * epi + 0.03
    eosin = (1 - 0.5 * fibre + 1.1 * fibre * _fibres(layouts, size, warp)) * (1 + 0.12 * texture)
    eosin = eosin * (1 - lumen) * (1 - 0.2 * epi)
    return np.clip(hema, 0, None) * (1 - lumen), np.clip(eosin, 0, None)


def _compose(
    hema: np.ndarray, eosin: np.ndarray, palettes: Sequence[_Palette], style: SiteStyle
) -> np.ndarray:
    """Beer-Lambert mixing of stain maps with per-image palettes and the site's stain shift."""

    def stack(attr: str) -> np.ndarray:
        return np.stack([np.asarray(getattr(p, attr), np.float32) for p in palettes])

    sh, se, sd = style.stain_shift
    h = hema * stack("h_amount")[:, None, None] * (1 + sh)
    e = eosin * stack("e_amount")[:, None, None] * (1 + se)
    d = sd * 0.5 * (h + e)
    od = (
        h[..., None] * stack("h_vec")[:, None, None, :]
        + e[..., None] * stack("e_vec")[:, None, None, :]
        + d[..., None] * _D0
        + stack("background")[:, None, None, :]
    )
    light = stack("light")[:, None, None, None] * style.brightness
    return 255.0 * light * np.exp(-od)


def _render(
    layouts: Sequence[_Layout],
    palettes: Sequence[_Palette],
    size: int,
    style: SiteStyle,
    rng: np.random.Generator,
) -> np.ndarray:
    hema, eosin = _stain_maps(layouts, size, rng)
    rgb = _compose(hema, eosin, palettes, style)
    if style.blur_sigma > 0:
        sigma = style.blur_sigma * size / _REF
        rgb = ndimage.gaussian_filter(rgb, sigma=(0, sigma, sigma, 0), truncate=3.0)
    if style.noise > 0:
        rgb = rgb + rng.normal(0, style.noise, rgb.shape).astype(np.float32)
    return np.clip(np.rint(rgb), 0, 255).astype(np.uint8)


# --------------------------------------------------------------------------- public API


def _labels(
    n: int, n_classes: int, class_probs: Sequence[float] | None, rng: np.random.Generator
) -> np.ndarray:
    """Exact class proportions (largest remainder), shuffled."""
    if class_probs is None:
        probs = np.full(n_classes, 1.0 / n_classes)
    else:
        probs = np.asarray(class_probs, dtype=float)
        if probs.shape != (n_classes,) or (probs < 0).any() or probs.sum() <= 0:
            raise ValueError(
                f"class_probs must be {n_classes} non-negative numbers with a "
                f"positive sum, got {list(class_probs)}"
            )
        probs = probs / probs.sum()
    counts = largest_remainder(n, probs)
    return rng.permutation(np.repeat(np.arange(n_classes), counts)).astype(np.int64)


def _task_index(task: str) -> int:
    if task not in TASKS:
        raise ValueError(f"unknown task {task!r}; valid tasks: {sorted(TASKS)}")
    return list(TASKS).index(task)


def generate(
    task: str,
    n: int,
    seed: int,
    image_size: int = 64,
    style: SiteStyle | None = None,
    class_probs: Sequence[float] | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Generate ``n`` synthetic H&E patches for ``task`` ("source" or "target").

    Returns ``(images, labels)``: uint8 ``(n, image_size, image_size, 3)`` and int64 ``(n,)``
    indexing ``TASKS[task]``. Deterministic in all arguments; classes are balanced unless
    ``class_probs`` (one weight per class) asks for a skew.
    """
    task_id = _task_index(task)
    if image_size < MIN_IMAGE_SIZE:
        raise ValueError(f"image_size must be >= {MIN_IMAGE_SIZE}, got {image_size}")
    if n < 0 or seed < 0:
        raise ValueError(f"n and seed must be >= 0, got n={n}, seed={seed}")
    style = style or SiteStyle.identity()
    rng = np.random.default_rng([seed, task_id])
    labels = _labels(n, len(TASKS[task]), class_probs, rng)
    builders = _BUILDERS[task]
    layouts = [builders[c](rng) for c in labels]
    palettes = [_palette(rng) for _ in range(n)]
    images = np.empty((n, image_size, image_size, 3), np.uint8)
    for start in range(0, n, _CHUNK):
        stop = min(start + _CHUNK, n)
        chunk_rng = np.random.default_rng([seed, task_id, start])
        images[start:stop] = _render(
            layouts[start:stop], palettes[start:stop], image_size, style, chunk_rng
        )
    return images, labels


def synthetic_dataset(
    task: str,
    n: int,
    seed: int,
    image_size: int = 64,
    style: SiteStyle | None = None,
    class_probs: Sequence[float] | None = None,
    transform: Callable | None = None,
) -> ArrayImageDataset:
    """:func:`generate` wrapped in an :class:`~moma_core.data.datasets.ArrayImageDataset`."""
    images, labels = generate(task, n, seed, image_size, style, class_probs)
    return ArrayImageDataset(images, labels, list(TASKS[task]), transform=transform)
