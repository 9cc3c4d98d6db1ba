"""The one place that opens a whole-slide image, for every command (tile, segment predict, slides info).

Three readers, each the library that knows its formats best:
- `tiffslide`: SVS, generic/OME-TIFF, NDPI and other TIFF-based formats (a core dependency).
- `openslide`: MIRAX .mrxs, Leica .scn, Ventana .bif, Hamamatsu .vms/.vmu, Philips TIFF, ... (extra `openslide`).
- `dicom`: DICOM-WSI folders or files, through wsidicom (extra `dicom`).

Whatever the reader, the returned object answers the tiffslide/OpenSlide calls the rest of pathssl
uses: `dimensions`, `level_count`, `level_dimensions`, `level_downsamples`, `properties`,
`associated_images`, `read_region(location, level, size, as_array=...)` and `close()`, plus
`reader_name` and `reader_version` (recorded in run.json and the tile store, because readers decode
differently). A tiffslide slide is returned as the `TiffSlide` itself, so the fast tifffile paths keep working;
the OpenSlide and DICOM adapters add `read_level(level, x, y, width, height)`.

Pixels above level 0 are read in that level's own coordinates (`tiling.slide.LevelReader`, for every reader and
command), never through a level-0 `read_region`: tiffslide maps a level-0 location back with
`int(loc / downsample)`, which at a real downsample (2.0003, not 2) lands one level pixel short. Level pixel x
starts at level-0 x * downsample; a level-0 coordinate goes to the level by `level_pixel` (nearest).
Nothing here imports torch.
"""

from __future__ import annotations

import importlib.metadata
from abc import ABC, abstractmethod
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

READERS: tuple[str, ...] = ("tiffslide", "openslide", "dicom")
DICOM_SUFFIXES = (".dcm", ".dicom")
# tiffslide opens these TIFF files but not their layout (Leica .scn places several images on the glass, Ventana
# .bif overlaps its tiles); OpenSlide assembles both, so `auto` tries it first.
OPENSLIDE_FIRST = (".scn", ".bif")

# Property keys holding level-0 µm/px, in the order checked: each reader writes its own.
MPP_KEYS: dict[str, str] = {
    "tiffslide.mpp-x": "tiffslide.mpp-x",
    "openslide.mpp-x": "openslide.mpp-x",
    "dicom.mpp-x": "DICOM PixelSpacing",
}


class SlideError(Exception):
    """A slide cannot be read: a one-line reason and, where known, how to fix it (for errors.csv)."""

    def __init__(self, reason: str, fix: str = "") -> None:
        super().__init__(reason)
        self.reason = reason
        self.fix = fix


class MissingExtra(SlideError):
    """The reader's library is not installed."""


def level_pixel(level0: float, downsample: float) -> int:
    """The level pixel whose corner lies nearest to level-0 coordinate `level0`: the one rule by which every
    reader and command goes from level 0 to a pyramid level (the way back is exact: x * downsample)."""
    return round(level0 / downsample)


def _version(dist: str) -> str:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return "unknown"


def _missing(reader: str, module: str) -> MissingExtra:
    return MissingExtra(
        f"reader '{reader}' needs the Python package {module}, which is not installed",
        f"pip install 'pathssl[{reader}]' (or choose another reader)",
    )


_MODULES = {"tiffslide": "tiffslide", "openslide": "openslide", "dicom": "wsidicom"}


def reader_problem(reader: str) -> str | None:
    """Why `reader` cannot be used here (its extra is not installed), or None; for spec validation."""
    module = _MODULES.get(reader)
    if module is None:
        return None
    import importlib.util

    if importlib.util.find_spec(module) is None:
        return f"reader '{reader}' needs the '{reader}' extra: pip install 'pathssl[{reader}]'"
    return None


def _to_rgb(region: Any) -> np.ndarray:
    array = np.asarray(region)
    if array.ndim == 2:
        array = np.repeat(array[..., None], 3, axis=2)
    return np.ascontiguousarray(array[..., :3])


class _Adapter(ABC):
    """Common surface over a non-tiffslide reader; subclasses fill the level table and `read_level`."""

    reader_name = ""
    reader_version = ""
    dimensions: tuple[int, int]
    level_dimensions: tuple[tuple[int, int], ...]
    level_downsamples: tuple[float, ...]
    properties: dict[str, str]
    tile_size = 512  # virtual tile side for cached region reads (LevelReader)

    @property
    def level_count(self) -> int:
        return len(self.level_dimensions)

    @abstractmethod
    def read_level(self, level: int, x: int, y: int, width: int, height: int) -> np.ndarray:
        """RGB uint8 (height, width, 3) at `level`, `x`, `y` in that level's pixels; outside the image white."""

    def read_region(self, location: tuple[int, int], level: int, size: tuple[int, int], *,
                    as_array: bool = False) -> Any:
        """Like OpenSlide: `location` in level-0 pixels, `size` in pixels of `level`; RGB."""
        ds = self.level_downsamples[level]
        rgb = self.read_level(level, level_pixel(location[0], ds), level_pixel(location[1], ds), size[0], size[1])
        if as_array:
            return rgb
        from PIL import Image

        return Image.fromarray(rgb)

    def __enter__(self) -> _Adapter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        return None


class OpenSlideAdapter(_Adapter):
    """OpenSlide, with transparent (unscanned) pixels composited onto the slide's background colour."""

    reader_name = "openslide"

    def __init__(self, path: Path) -> None:
        try:
            import openslide
        except (ImportError, OSError):  # OSError: openslide-python found no OpenSlide C library (openslide-bin)
            raise _missing("openslide", "openslide-python (and openslide-bin)") from None
        self._slide = openslide.OpenSlide(str(path))
        self.reader_version = f"{_version('openslide-python')} (libopenslide {openslide.__library_version__})"
        self.properties = dict(self._slide.properties)
        width, height = self._slide.dimensions
        self.dimensions = (int(width), int(height))
        self.level_dimensions = tuple((int(w), int(h)) for w, h in self._slide.level_dimensions)
        self.level_downsamples = tuple(float(d) for d in self._slide.level_downsamples)
        self.associated_images = self._slide.associated_images
        colour = self.properties.get("openslide.background-color") or "FFFFFF"
        self._background = np.array([int(colour[i : i + 2], 16) for i in (0, 2, 4)], np.float32)
        tile = self.properties.get("openslide.level[0].tile-width")
        self.tile_size = max(int(tile), 256) if tile and tile.isdigit() and int(tile) > 0 else 512

    def read_level(self, level: int, x: int, y: int, width: int, height: int) -> np.ndarray:
        ds = self.level_downsamples[level]
        # OpenSlide takes level-0 coordinates and paints the level at x0 / downsample. Its downsamples are averages
        # of the width and height ratios (2.0003, not 2), so above level 0 the position is off by up to 0.5/ds px
        # and OpenSlide resamples: about 1.5 grey levels mean difference from an exact read (tests/slides).
        rgba = np.asarray(self._slide.read_region((round(x * ds), round(y * ds)), level, (width, height)))
        alpha = rgba[..., 3:4]
        if alpha.min() == 255:
            return np.ascontiguousarray(rgba[..., :3])
        # openslide-python returns un-premultiplied RGBA: composite onto the background like OpenSlide's viewers.
        a = alpha.astype(np.float32) / 255
        out = rgba[..., :3].astype(np.float32) * a + self._background * (1 - a)
        return np.clip(np.rint(out), 0, 255).astype(np.uint8)

    def close(self) -> None:
        self._slide.close()


class DicomAdapter(_Adapter):
    """A DICOM-WSI pyramid through wsidicom; levels are the pyramid's levels, finest first."""

    reader_name = "dicom"

    def __init__(self, path: Path) -> None:
        try:
            from wsidicom import WsiDicom
        except ImportError:
            raise _missing("dicom", "wsidicom") from None
        source: Any = path
        if path.is_file():  # one file of the series: open the files of the same series beside it
            source = sorted(p for p in path.parent.iterdir() if p.suffix.lower() in DICOM_SUFFIXES) or [path]
        try:
            self._wsi = WsiDicom.open(source)
        except Exception as exc:
            if type(exc).__name__ == "WsiDicomNoResolutionError":
                raise SlideError(
                    "DICOM-WSI series without pixel spacing (PixelSpacing or ImagedVolumeWidth), which wsidicom "
                    "needs to build its pyramid",
                    "re-export the series with its pixel spacing (input.mpp_override cannot help: wsidicom "
                    "refuses to open it)",
                ) from None
            raise
        self.reader_version = _version("wsidicom")
        self._levels = list(self._wsi.levels)
        base = self._levels[0]
        self.dimensions = (int(base.size.width), int(base.size.height))
        self.level_dimensions = tuple((int(lv.size.width), int(lv.size.height)) for lv in self._levels)
        self.level_downsamples = tuple(self.dimensions[0] / w for w, _ in self.level_dimensions)
        self.tile_size = max(int(base.tile_size.width), 256)
        self.properties = {"dicom.level-count": str(len(self._levels))}
        spacing = base.pixel_spacing  # mm/px
        if spacing is not None and spacing.width > 0:
            self.properties["dicom.mpp-x"] = str(spacing.width * 1000)
            self.properties["dicom.mpp-y"] = str(spacing.height * 1000)
        self.associated_images = _DicomAssociated(self._wsi)
        try:  # metadata for `slides info`; a dataset lacking them still reads
            self.properties["dicom.transfer-syntax"] = str(base.default_instance.image_data.transfer_syntax.name)
            power = base.default_instance.dataset.get("OpticalPathSequence", [{}])[0].get("ObjectiveLensPower")
            if power:
                self.properties["dicom.objective-power"] = str(power)
        except (AttributeError, IndexError, KeyError, TypeError):
            pass

    def read_level(self, level: int, x: int, y: int, width: int, height: int) -> np.ndarray:
        w, h = self.level_dimensions[level]
        out = np.full((height, width, 3), 255, np.uint8)
        x0, y0, x1, y1 = max(x, 0), max(y, 0), min(x + width, w), min(y + height, h)
        if x1 > x0 and y1 > y0:  # wsidicom refuses regions outside the image: read the part inside
            region = self._wsi.read_region((x0, y0), self._levels[level].level, (x1 - x0, y1 - y0))
            out[y0 - y : y1 - y, x0 - x : x1 - x] = _to_rgb(region)
        return out

    def close(self) -> None:
        self._wsi.close()


class _DicomAssociated(dict):
    """Names of the label/overview/thumbnail images, read only when asked for."""

    def __init__(self, wsi: Any) -> None:
        super().__init__()
        self._wsi = wsi
        for name, group in (("label", wsi.labels), ("macro", wsi.overviews)):
            if group:
                self[name] = None

    def __getitem__(self, name: str) -> Any:
        if name == "label":
            return self._wsi.read_label()
        if name == "macro":
            return self._wsi.read_overview()
        raise KeyError(name)


def _open_tiffslide(path: Path) -> Any:
    import tiffslide

    slide: Any = tiffslide.TiffSlide(path)
    _ = slide.level_dimensions
    slide.reader_name = "tiffslide"
    slide.reader_version = _version("tiffslide")
    return slide


_OPENERS: dict[str, Callable[[Path], Any]] = {
    "tiffslide": _open_tiffslide,
    "openslide": OpenSlideAdapter,
    "dicom": DicomAdapter,
}


def auto_order(path: Path) -> tuple[str, ...]:
    """Readers `auto` tries, in order: DICOM first for a folder or .dcm file; OpenSlide first for the TIFF-based
    formats whose layout only it assembles; else tiffslide first (the core dependency, and the fast tile path)."""
    suffix = path.suffix.lower()
    if path.is_dir() or suffix in DICOM_SUFFIXES:
        return ("dicom", "openslide")
    if suffix in OPENSLIDE_FIRST:
        return ("openslide", "tiffslide", "dicom")
    return READERS


def open_slide(path: str | Path, reader: str = "auto") -> Any:
    """Open a slide with `reader` (or the first of `auto_order` that can), as a one-line `SlideError` on failure.

    The result carries `reader_name` and `reader_version`.
    """
    path = Path(path)
    if reader != "auto" and reader not in _OPENERS:
        raise SlideError(f"unknown slide reader {reader!r}", f"use one of auto, {', '.join(READERS)}")
    if not path.exists():
        raise SlideError(f"file not found: {path}", "fix the path or remove the slide from the input")
    order = auto_order(path) if reader == "auto" else (reader,)
    reasons: list[str] = []
    missing: list[str] = []
    for name in order:
        try:
            slide = _OPENERS[name](path)
        except MissingExtra:
            if reader != "auto":
                raise
            missing.append(name)
            reasons.append(f"{name}: not installed")
            continue
        except Exception as exc:  # each library raises its own types for files it does not read
            why = exc.reason if isinstance(exc, SlideError) else (
                f"{type(exc).__name__}: {(str(exc).splitlines() or [''])[0]}")
            if reader != "auto" and isinstance(exc, SlideError):
                raise
            if reader != "auto":
                raise SlideError(
                    f"cannot open with reader '{name}' ({why})",
                    "check that the file is complete and a format this reader knows, or use reader = 'auto'",
                ) from None
            reasons.append(f"{name}: {why}")
            continue
        return slide
    fix = "check that the file is complete and a whole-slide format"
    if missing:
        fix += "; " + " and ".join(f"pip install 'pathssl[{m}]'" for m in missing) + " to try more readers"
    raise SlideError(f"cannot open as a slide ({'; '.join(reasons)})", fix)


def metadata_mpp(slide: Any) -> tuple[float | None, str]:
    """(level-0 µm/px from the slide's own metadata, where it came from), or (None, "missing")."""
    properties = slide.properties
    for key, source in MPP_KEYS.items():
        raw = properties.get(key)
        try:
            value = float(raw) if raw not in (None, "") else 0.0
        except ValueError:
            continue
        if value > 0:
            return value, source
    return None, "missing"


def slide_mpp(slide: Any, override: float | None, path: Path) -> tuple[float, str]:
    """(µm/px of level 0, where it came from): the one MPP rule of tile, segment predict and slides info.

    An explicit override wins ("override"): metadata can be wrong (libvips writes 1 px/mm, i.e. 1000 µm/px, when
    it was given no resolution). Else the slide's metadata ("metadata"); neither is a SlideError.
    """
    if override is not None:
        return float(override), "override"
    mpp, _source = metadata_mpp(slide)
    if mpp is not None:
        return mpp, "metadata"
    raise SlideError(
        f"{path.name} has no MPP (µm/px) in its metadata",
        "set input.mpp_override, or give the slide's µm/px in an `mpp` column of a slide CSV",
    )


def slide_readers(requested: str, used: list[str]) -> dict[str, Any]:
    """For run.json: the reader asked for and how many slides each "<library> <version>" decoded."""
    counts: dict[str, int] = {}
    for name in used:
        if name:
            counts[name] = counts.get(name, 0) + 1
    return {"requested": requested, "used": counts}
