"""Synthetic H&E-like tissue, nuclei and whole-slide images with known truth.

Used by the demo and by every area's tests, so it must be fast (a 96 px tile renders in about a
millisecond) and realistic enough that a tiny CNN trained with SSL can tell the textures apart:
each texture differs in nucleus density, size, shape and colour and in its stroma pattern.

Colours follow H&E: haematoxylin stains nuclei dark blue-purple, eosin stains cytoplasm and
collagen pink, fat and background stay white. Sizes are given in micrometres and converted with
``mpp`` (µm per pixel), so the same texture rendered at 0.25 and 0.5 µm/px looks like the same
tissue at 40x and 20x.

Nucleus types follow the PanNuke scheme (1 neoplastic, 2 inflammatory, 3 connective, 4 dead,
5 epithelial) and are tied to the texture, e.g. lymphocytes are inflammatory and tumour
nuclei neoplastic.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np

TEXTURES: tuple[str, ...] = ("tumour", "stroma", "lymphocytes", "adipose", "mucus", "necrosis")
NUCLEUS_TYPES: tuple[str, ...] = ("neoplastic", "inflammatory", "connective", "dead", "epithelial")
BACKGROUND_RGB = (242, 241, 244)


@dataclass(frozen=True)
class _Style:
    """How one texture looks. Sizes in µm, densities in nuclei per 1000 µm², colours RGB 0-255."""

    pattern: str  # "sheet" | "fibres" | "lymph" | "fat" | "mucus" | "debris"
    base_rgb: tuple[int, int, int]
    alt_rgb: tuple[int, int, int]  # second colour the pattern mixes towards
    density: float
    semi_axes_um: tuple[float, float, float, float]  # major min/max, minor min/max
    nucleus_rgb: tuple[int, int, int]
    nucleus_alpha: float
    vesicular: bool  # pale centre with a dark rim and a nucleolus (tumour cells)
    type_probs: tuple[float, float, float, float, float]  # over NUCLEUS_TYPES


_STYLES: dict[str, _Style] = {
    # Dense sheets of large, pleomorphic, vesicular nuclei on purple-pink cytoplasm.
    "tumour": _Style(
        "sheet",
        (205, 140, 190),
        (180, 115, 175),
        13.0,
        (3.5, 7.0, 2.8, 5.0),
        (95, 50, 140),
        0.85,
        True,
        (0.9, 0.1, 0.0, 0.0, 0.0),
    ),
    # Pink collagen fibres with sparse thin spindle nuclei aligned to the fibres.
    "stroma": _Style(
        "fibres",
        (232, 150, 190),
        (248, 215, 232),
        1.6,
        (5.0, 8.0, 1.2, 2.0),
        (110, 55, 135),
        0.85,
        False,
        (0.0, 0.1, 0.9, 0.0, 0.0),
    ),
    # Packed small round very dark nuclei with little cytoplasm.
    "lymphocytes": _Style(
        "lymph",
        (215, 175, 210),
        (200, 160, 205),
        22.0,
        (2.6, 3.4, 2.4, 3.2),
        (55, 30, 105),
        0.95,
        False,
        (0.0, 1.0, 0.0, 0.0, 0.0),
    ),
    # Large empty fat cells separated by thin pink membranes, a few flattened nuclei.
    "adipose": _Style(
        "fat",
        (246, 245, 247),
        (215, 130, 175),
        0.25,
        (4.0, 6.0, 1.0, 1.6),
        (110, 60, 140),
        0.8,
        False,
        (0.0, 0.0, 1.0, 0.0, 0.0),
    ),
    # Pale blue-lilac wispy mucin with a few floating epithelial nuclei.
    "mucus": _Style(
        "mucus",
        (222, 205, 234),
        (165, 150, 205),
        0.35,
        (3.0, 4.5, 2.5, 3.5),
        (100, 70, 150),
        0.7,
        False,
        (0.0, 0.1, 0.0, 0.0, 0.9),
    ),
    # Mottled eosinophilic debris full of small dark nuclear fragments.
    "necrosis": _Style(
        "debris",
        (215, 145, 185),
        (190, 120, 170),
        14.0,
        (0.8, 1.8, 0.6, 1.4),
        (70, 35, 110),
        0.9,
        False,
        (0.0, 0.05, 0.0, 0.95, 0.0),
    ),
}
assert tuple(_STYLES) == TEXTURES


_NOISE_BANK: np.ndarray | None = None


def _pixel_noise(rng: np.random.Generator, height: int, width: int, channels: int) -> np.ndarray:
    """Standard-normal pixel noise, cut at a random offset from a cached bank.

    Drawing fresh normals costs more than the rest of a tile; sensor-like noise needs no
    independence between tiles.
    """
    global _NOISE_BANK
    bank_side = 512
    if height > bank_side or width > bank_side:
        return rng.standard_normal((height, width, channels), dtype=np.float32)
    if _NOISE_BANK is None:
        _NOISE_BANK = np.random.default_rng(20230601).standard_normal(
            (bank_side, bank_side, 3), dtype=np.float32
        )
    y, x = rng.integers(0, bank_side - height + 1), rng.integers(0, bank_side - width + 1)
    c = rng.integers(0, 4 - channels)
    return _NOISE_BANK[y : y + height, x : x + width, c : c + channels]


def _smooth_noise(rng: np.random.Generator, height: int, width: int, feature_px: float) -> np.ndarray:
    """Zero-mean noise with features of about ``feature_px`` pixels, roughly in [-1, 1]."""
    feature_px = max(feature_px, 1.0)
    gh, gw = int(height / feature_px) + 3, int(width / feature_px) + 3
    coarse = rng.standard_normal((gh, gw)).astype(np.float32)
    fine = cv2.resize(coarse, (int(gw * feature_px), int(gh * feature_px)), interpolation=cv2.INTER_CUBIC)
    return np.clip(fine[:height, :width] * 0.6, -1.0, 1.0)


def _mix(base: tuple[int, int, int], alt: tuple[int, int, int], weight: np.ndarray) -> np.ndarray:
    """Per-pixel blend of two RGB colours; ``weight`` 0 gives ``base``, 1 gives ``alt``."""
    b = np.asarray(base, np.float32)
    a = np.asarray(alt, np.float32)
    return b + (a - b) * weight[..., None]


def _fibre_field(rng: np.random.Generator, height: int, width: int, scale: float, angle: float) -> np.ndarray:
    """Collagen bundles: noise stretched along ``angle`` (degrees), in [0, 1]."""
    if scale > 2.0:  # fibres are smooth: build them at 0.5 µm/px and upsample (saves ~4x at 40x)
        small = _fibre_field(rng, max(int(height * 2 / scale), 1), max(int(width * 2 / scale), 1), 2.0, angle)
        return cv2.resize(small, (width, height), interpolation=cv2.INTER_LINEAR)
    side = math.ceil(math.hypot(height, width)) + 2
    noise = rng.standard_normal((side, side), dtype=np.float32)
    noise = cv2.GaussianBlur(noise, (0, 0), sigmaX=max(6.0 * scale, 1.0), sigmaY=max(0.7 * scale, 0.5))
    rot = cv2.getRotationMatrix2D((side / 2, side / 2), angle, 1.0)
    rot[:, 2] -= [(side - width) / 2, (side - height) / 2]
    noise = cv2.warpAffine(noise, rot, (width, height), flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_REFLECT)
    noise /= noise.std() + 1e-6
    return 1.0 / (1.0 + np.exp(-2.5 * noise))


def _fat_membranes(rng: np.random.Generator, height: int, width: int, scale: float) -> np.ndarray:
    """Voronoi cell borders of fat cells about 60 µm across, 1 = membrane, as float32."""
    if scale > 1.0:  # the distance transform dominates: build at 1 µm/px and upsample
        small = _fat_membranes(rng, max(int(height / scale), 1), max(int(width / scale), 1), 1.0)
        return cv2.resize(small, (width, height), interpolation=cv2.INTER_LINEAR)
    cell_px = 60.0 * scale
    margin = int(cell_px / 2)
    ch, cw = height + 2 * margin, width + 2 * margin
    n_cells = max(int(ch * cw / cell_px**2 * 1.3), 2)
    canvas = np.full((ch, cw), 255, np.uint8)
    canvas[rng.integers(0, ch, n_cells), rng.integers(0, cw, n_cells)] = 0
    _, labels = cv2.distanceTransformWithLabels(canvas, cv2.DIST_L2, 5, labelType=cv2.DIST_LABEL_PIXEL)
    edge = np.zeros((ch, cw), np.uint8)
    edge[:, 1:] |= (labels[:, 1:] != labels[:, :-1]).astype(np.uint8)
    edge[1:, :] |= (labels[1:, :] != labels[:-1, :]).astype(np.uint8)
    thick = max(round(1.5 * scale), 1)
    edge = cv2.dilate(edge, np.ones((thick, thick), np.uint8))
    edge = cv2.GaussianBlur(edge.astype(np.float32), (0, 0), 0.6)
    return np.clip(edge[margin : margin + height, margin : margin + width] * 1.2, 0, 1)


def _stroma_and_cytoplasm(
    rng: np.random.Generator, height: int, width: int, style: _Style, scale: float, angle: float
) -> np.ndarray:
    """The texture's non-nuclear background as float32 RGB in 0-255."""
    if style.pattern == "fibres":
        weight = _fibre_field(rng, height, width, scale, angle)
    elif style.pattern == "fat":
        weight = _fat_membranes(rng, height, width, scale)
    elif style.pattern == "mucus":
        # Iso-lines of a smooth field look like wispy strands of mucin.
        field_ = _smooth_noise(rng, height, width, 25.0 * scale)
        weight = 0.15 + 0.75 * np.exp(-((field_ / 0.12) ** 2))
    elif style.pattern == "debris":
        weight = 0.5 + 0.5 * _smooth_noise(rng, height, width, 3.0 * scale)
    else:  # sheet, lymph: gently varying cytoplasm
        weight = 0.5 + 0.5 * _smooth_noise(rng, height, width, 15.0 * scale)
    return _mix(style.base_rgb, style.alt_rgb, weight.astype(np.float32))


def _place_nuclei(
    rng: np.random.Generator, style: _Style, height: int, width: int, scale: float, angle: float
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Draw non-overlapping elliptical nuclei.

    Returns (inst_map int32, type_map uint8, haematoxylin opacity float32). Centres may lie
    just outside the image so that nuclei are cut by the border as in real tiles.
    """
    inst = np.zeros((height, width), np.int32)
    types = np.zeros((height, width), np.uint8)
    alpha = np.zeros((height, width), np.float32)
    major_lo, major_hi, minor_lo, minor_hi = (v * scale for v in style.semi_axes_um)
    margin = math.ceil(major_hi)
    area_um2 = (height + 2 * margin) * (width + 2 * margin) / scale**2
    n = rng.poisson(style.density * area_um2 / 1000.0)
    if n == 0:
        return inst, types, alpha
    cy = rng.uniform(-margin, height + margin, n)
    cx = rng.uniform(-margin, width + margin, n)
    major = rng.uniform(major_lo, major_hi, n)
    minor = np.minimum(rng.uniform(minor_lo, minor_hi, n), major)
    if style.pattern == "fibres":  # spindle nuclei follow the collagen
        theta = np.deg2rad(-angle + rng.normal(0, 8, n))
    else:
        theta = rng.uniform(0, np.pi, n)
    kinds = rng.choice(len(NUCLEUS_TYPES), size=n, p=style.type_probs) + 1
    shade = rng.uniform(0.85, 1.1, n)
    # Paint all ellipses with OpenCV (C speed), last first, so that earlier nuclei lie on top.
    paint = np.zeros((height, width), np.int32)
    sub = 16  # OpenCV's fixed-point shift of 4 bits: sub-pixel centres and axes
    for i in range(n - 1, -1, -1):
        cv2.ellipse(
            paint,
            (round((cx[i] - 0.5) * sub), round((cy[i] - 0.5) * sub)),
            (round(major[i] * sub), round(minor[i] * sub)),
            math.degrees(theta[i]),
            0,
            360,
            int(i + 1),
            -1,
            cv2.LINE_8,
            4,
        )
    visible = np.bincount(paint.ravel(), minlength=n + 1)[1:]
    inside = (cx - major >= 0) & (cx + major <= width) & (cy - major >= 0) & (cy + major <= height)
    # A nucleus mostly hidden behind earlier ones is dropped: cells cannot overlap much.
    keep = (visible >= 3) & ~(inside & (visible < 0.8 * np.pi * major * minor))
    relabel = np.zeros(n + 1, np.int32)
    relabel[1:][keep] = np.arange(1, int(keep.sum()) + 1, dtype=np.int32)
    inst = relabel[paint]
    kind_of = np.zeros(n + 1, np.uint8)
    kind_of[1:] = np.where(keep, kinds, 0)
    types = kind_of[paint]
    ys, xs = np.nonzero(inst)
    idx = paint[ys, xs] - 1
    dx, dy = xs + 0.5 - cx[idx], ys + 0.5 - cy[idx]
    c, s = np.cos(theta[idx]), np.sin(theta[idx])
    rho2 = ((dx * c + dy * s) / major[idx]) ** 2 + ((-dx * s + dy * c) / minor[idx]) ** 2
    if style.vesicular:  # pale chromatin centre with a dark rim and a nucleolus
        a = np.where(rho2 < 0.06, 1.0, style.nucleus_alpha * (0.55 + 0.45 * np.minimum(rho2, 1.0)))
    else:
        a = np.full(len(idx), style.nucleus_alpha)
    alpha[ys, xs] = np.clip(a * shade[idx], 0, 1)
    return inst, types, alpha


def render_tissue(
    rng: np.random.Generator,
    height: int,
    width: int,
    texture: str,
    mpp: float = 0.5,
    *,
    angle: float | None = None,
    stain_jitter: bool = True,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Render one field of H&E-like tissue.

    Args:
        rng: source of randomness (the result depends only on its state).
        height, width: output size in pixels.
        texture: one of ``TEXTURES``.
        mpp: resolution in µm per pixel; nuclei keep their physical size.
        angle: fibre direction in degrees for stroma (random when None).
        stain_jitter: vary stain intensity by a few percent per call (off for slides, where
            it would show tile seams).

    Returns:
        rgb uint8 (H, W, 3); inst_map int32 (H, W) with 0 = background and nuclei 1..N, no
        overlaps; type_map uint8 (H, W) with 0 = background and 1..5 indexing ``NUCLEUS_TYPES``.
    """
    if texture not in _STYLES:
        raise ValueError(f"unknown texture {texture!r}; choose one of {', '.join(TEXTURES)}")
    style = _STYLES[texture]
    scale = 1.0 / mpp
    angle = float(rng.uniform(0, 180)) if angle is None else angle
    base = _stroma_and_cytoplasm(rng, height, width, style, scale, angle)
    inst, types, alpha = _place_nuclei(rng, style, height, width, scale, angle)
    # Chromatin is granular; a slight blur of alpha gives anti-aliased nuclear borders.
    alpha *= 1.0 + 0.12 * _pixel_noise(rng, height, width, 1)[..., 0]
    alpha = cv2.GaussianBlur(alpha, (0, 0), 0.5)
    alpha = np.clip(alpha, 0.0, 1.0)[..., None]
    rgb = base * (1 - alpha) + np.asarray(style.nucleus_rgb, np.float32) * alpha
    # Stain intensity varies a little between fields, as between slides and scanners.
    if stain_jitter:
        rgb *= rng.uniform(0.96, 1.04, 3).astype(np.float32)
    rgb += 2.0 * _pixel_noise(rng, height, width, 3)
    return np.clip(rgb, 0, 255).astype(np.uint8), inst, types


def labelled_tiles(n_per_class: int, size: int, seed: int, mpp: float = 0.5) -> tuple[np.ndarray, np.ndarray]:
    """``n_per_class`` tiles of every texture, in class-major order.

    Returns images uint8 (N, size, size, 3) and labels int64 (N,) indexing ``TEXTURES``.
    """
    rng = np.random.default_rng(seed)
    images = np.empty((n_per_class * len(TEXTURES), size, size, 3), np.uint8)
    labels = np.repeat(np.arange(len(TEXTURES), dtype=np.int64), n_per_class)
    for i, label in enumerate(labels):
        images[i] = render_tissue(rng, size, size, TEXTURES[label], mpp)[0]
    return images, labels


def write_image_folder(
    root: str | Path,
    n_per_class: int,
    size: int,
    seed: int,
    splits: tuple[str, ...] = ("train", "val", "test"),
    *,
    image_format: str = "png",
    mpp: float = 0.5,
) -> Path:
    """Write ``root/<split>/<texture>/<texture>_<i>.<png|jpg>`` (torchvision ImageFolder layout).

    Each split draws from its own seed so that splits never share an image.
    """
    if image_format not in ("png", "jpg"):
        raise ValueError(f"image_format must be 'png' or 'jpg', got {image_format!r}")
    root = Path(root)
    for split_index, split in enumerate(splits):
        images, labels = labelled_tiles(n_per_class, size, seed * 1000 + split_index, mpp)
        for i, (image, label) in enumerate(zip(images, labels, strict=False)):
            folder = root / split / TEXTURES[label]
            folder.mkdir(parents=True, exist_ok=True)
            cv2.imwrite(
                str(folder / f"{TEXTURES[label]}_{i % n_per_class:05d}.{image_format}"), image[..., ::-1]
            )
    return root
