"""Synthetic whole-slide images: pyramidal tiled JPEG TIFFs of `pathssl_cli.synthetic` tissue, with MPP
metadata (or deliberately without it) and the true tissue mask, written with bounded memory.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from pathlib import Path

import cv2
import numpy as np

from pathssl_cli.synthetic import BACKGROUND_RGB, TEXTURES, _pixel_noise, render_tissue


@dataclass
class SlideTruth:
    """What a synthetic slide holds, for tests to compare against.

    ``tissue_mask`` and ``texture_map`` are sampled on a grid of ``mask_downsample`` level-0
    pixels: mask pixel (i, j) describes level-0 pixel centre ((j + 0.5) * d, (i + 0.5) * d).
    ``texture_map`` is 0 on background and 1 + index into ``TEXTURES`` on tissue.
    """

    path: Path
    width: int
    height: int
    mpp: float
    mpp_written: bool
    tile_size: int
    level_downsamples: tuple[int, ...]
    mask_downsample: int
    tissue_mask: np.ndarray = field(repr=False)
    texture_map: np.ndarray = field(repr=False)

    def mask_resized(self, width: int, height: int) -> np.ndarray:
        """The tissue mask resampled (nearest) to ``width`` x ``height`` covering the whole slide."""
        return (
            cv2.resize(self.tissue_mask.astype(np.uint8), (width, height), interpolation=cv2.INTER_NEAREST)
            > 0
        )


def _layout_fields(
    rng: np.random.Generator, mask_h: int, mask_w: int, n_textures: int, tissue_fraction: float
) -> tuple[np.ndarray, np.ndarray]:
    """Smooth random fields: tissue where ``tissue > 0``; the texture is the argmax of ``classes``."""
    big = max(mask_h, mask_w)
    tissue = cv2.GaussianBlur(rng.standard_normal((mask_h, mask_w)).astype(np.float32), (0, 0), big / 10)
    # A white margin like a real glass slide keeps tissue away from the borders.
    yy, xx = np.mgrid[0:mask_h, 0:mask_w].astype(np.float32)
    edge = np.minimum.reduce([yy, xx, mask_h - 1 - yy, mask_w - 1 - xx]) / max(big * 0.06, 1.0)
    tissue = tissue / (tissue.std() + 1e-6) - 2.0 * np.clip(1.0 - edge, 0, 1)
    tissue -= np.quantile(tissue, 1.0 - tissue_fraction)
    classes = np.stack(
        [
            cv2.GaussianBlur(rng.standard_normal((mask_h, mask_w)).astype(np.float32), (0, 0), big / 16)
            for _ in range(n_textures)
        ]
    )
    # Fat lies inside tissue, not at its rim: at a slide's edge it would be indistinguishable from
    # glass for any detector, and real sections are cut through fat-rich tissue rarely at the rim.
    adipose = TEXTURES.index("adipose")
    classes[adipose] = np.where(tissue > 0.6, classes[adipose], -10.0)
    return tissue, classes


def write_synthetic_slide(
    path: str | Path,
    *,
    width: int,
    height: int,
    mpp: float = 0.25,
    tile_size: int = 256,
    n_levels: int = 3,
    seed: int = 0,
    jpeg_quality: int = 90,
    write_mpp: bool = True,
    tissue_fraction: float = 0.45,
    mask_downsample: int = 16,
    compression: str = "jpeg",
) -> SlideTruth:
    """Write a pyramidal, tiled JPEG TIFF of H&E-like tissue on a white background.

    `compression`: "jpeg" (quality `jpeg_quality`) or "jpeg2000" (lossy at the same quality level, as Leica
    and some Aperio scanners write), for tests and benchmarks of both codecs.

    Level k is level 0 area-downsampled by 2**k, stored as a SubIFD of level 0 (the layout of
    OME-TIFF and of libvips/bfconvert pyramids, which tiffslide reads). MPP is stored in the
    resolution tags (pixels per centimetre) unless ``write_mpp`` is False, so tests can make a
    slide without MPP. Memory stays bounded: level 0 is rendered tile by tile in row order and
    the lower levels are streamed through raw temporary files beside ``path``.
    """
    import tifffile  # local: only slide writing needs it

    if compression not in ("jpeg", "jpeg2000"):
        raise ValueError(f"compression must be 'jpeg' or 'jpeg2000', got {compression!r}")
    if tile_size % (2 ** (n_levels - 1)) or tile_size % 16:
        raise ValueError(f"tile_size {tile_size} must be a multiple of 16 and of 2**(n_levels-1)")
    path = Path(path)
    rng = np.random.default_rng(seed)
    mask_h, mask_w = math.ceil(height / mask_downsample), math.ceil(width / mask_downsample)
    tissue_field, class_fields = _layout_fields(rng, mask_h, mask_w, len(TEXTURES), tissue_fraction)
    tissue_mask = tissue_field > 0
    texture_map = np.where(tissue_mask, class_fields.argmax(0) + 1, 0).astype(np.uint8)
    angles = rng.uniform(
        0, 180, len(TEXTURES)
    )  # one fibre direction per texture keeps tiles seamless-looking

    n_rows, n_cols = math.ceil(height / tile_size), math.ceil(width / tile_size)
    padded_w = n_cols * tile_size
    temp_paths = [path.with_name(f".{path.name}.level{k}.raw") for k in range(1, n_levels)]
    offsets = (np.arange(tile_size, dtype=np.float32) + 0.5) / mask_downsample - 0.5

    def render_tile(row: int, col: int) -> np.ndarray:
        y0, x0 = row * tile_size, col * tile_size
        map_x = np.broadcast_to(offsets[None, :] + x0 / mask_downsample, (tile_size, tile_size))
        map_y = np.broadcast_to(offsets[:, None] + y0 / mask_downsample, (tile_size, tile_size))
        map_x, map_y = np.ascontiguousarray(map_x), np.ascontiguousarray(map_y)

        def sample(a: np.ndarray) -> np.ndarray:
            return cv2.remap(a, map_x, map_y, cv2.INTER_LINEAR, borderMode=cv2.BORDER_REPLICATE)

        tissue = sample(tissue_field)
        tile = np.empty((tile_size, tile_size, 3), np.float32)
        tile[:] = BACKGROUND_RGB
        tile += 1.5 * _pixel_noise(rng, tile_size, tile_size, 3)
        if (tissue > -0.05).any():
            labels = np.stack([sample(c) for c in class_fields]).argmax(0)
            # Soft 1-2 px edge: the tissue boundary is not a hard cut in a scan.
            weight = np.clip(tissue / 0.02 + 0.5, 0, 1)
            for k in np.unique(labels[tissue > -0.05]):
                rgb = render_tissue(
                    rng, tile_size, tile_size, TEXTURES[k], mpp, angle=float(angles[k]), stain_jitter=False
                )[0]
                w = (weight * (labels == k))[..., None]
                tile = tile * (1 - w) + rgb.astype(np.float32) * w
        return np.clip(tile, 0, 255).astype(np.uint8)

    def level0_tiles():
        files = [open(p, "wb") for p in temp_paths]
        try:
            for row in range(n_rows):
                bands = [np.zeros((tile_size >> k, padded_w >> k, 3), np.uint8) for k in range(1, n_levels)]
                # A whole row is rendered and the lower levels written before yielding: tifffile
                # stops pulling after the last tile, so work after the final yield would never run.
                row_tiles = [render_tile(row, col) for col in range(n_cols)]
                for col, tile in enumerate(row_tiles):
                    for k, band in enumerate(bands, start=1):
                        t = tile_size >> k
                        band[:, col * t : (col + 1) * t] = cv2.resize(
                            tile, (t, t), interpolation=cv2.INTER_AREA
                        )
                for f, band in zip(files, bands, strict=False):
                    f.write(band.tobytes())
                    f.flush()
                yield from row_tiles
        finally:
            for f in files:
                f.close()

    def level_tiles(k: int, level_h: int, level_w: int):
        band_w = padded_w >> k
        rows_written = n_rows * (tile_size >> k)
        with open(temp_paths[k - 1], "rb") as f:
            for y in range(0, level_h, tile_size):
                count = min(tile_size, rows_written - y)
                band = np.fromfile(f, np.uint8, count * band_w * 3).reshape(count, band_w, 3)
                for x in range(0, level_w, tile_size):
                    tile = np.zeros((tile_size, tile_size, 3), np.uint8)
                    part = band[:, x : x + tile_size]
                    tile[: part.shape[0], : part.shape[1]] = part
                    yield tile

    common = dict(
        dtype=np.uint8,
        tile=(tile_size, tile_size),
        photometric="rgb",
        compression=compression,
        compressionargs={"level": jpeg_quality},
        metadata=None,
    )
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        with tifffile.TiffWriter(tmp, bigtiff=width * height > 2**31) as tw:
            for k in range(n_levels):
                level_h, level_w = height >> k, width >> k
                res = {}
                if write_mpp:
                    ppcm = 1e4 / (mpp * 2**k)
                    res = dict(resolution=(ppcm, ppcm), resolutionunit="CENTIMETER")
                tw.write(
                    level0_tiles() if k == 0 else level_tiles(k, level_h, level_w),
                    shape=(level_h, level_w, 3),
                    subifds=n_levels - 1 if k == 0 else None,
                    subfiletype=1 if k else 0,
                    **res,
                    **common,
                )
        os.replace(tmp, path)
    finally:
        for p in [tmp, *temp_paths]:
            p.unlink(missing_ok=True)
    return SlideTruth(
        path=path,
        width=width,
        height=height,
        mpp=mpp,
        mpp_written=write_mpp,
        tile_size=tile_size,
        level_downsamples=tuple(2**k for k in range(n_levels)),
        mask_downsample=mask_downsample,
        tissue_mask=tissue_mask,
        texture_map=texture_map,
    )
