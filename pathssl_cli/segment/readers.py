"""Readers for `segment predict`: an image file in memory, or a whole-slide region read on demand through the
one slide opener (`pathssl_cli.slides.open_slide`: tiffslide, OpenSlide or DICOM), behind one small interface
(`height`, `width`, `read(top, left, h, w)` with reflect padding)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from pathssl_cli.errors import SpecError, WorkFailed
from pathssl_cli.segment.datasets import IMAGE_SUFFIXES, read_image
from pathssl_cli.segment.patches import pad_to


class ImageReader:
    """An RGB array in memory (image files are tile-sized to slide-crop-sized); `ImageReader.open(path)`."""

    def __init__(self, image: np.ndarray) -> None:
        self.image = image
        self.height, self.width = image.shape[:2]

    @classmethod
    def open(cls, path: Path) -> ImageReader:
        return cls(read_image(path))

    def close(self) -> None:
        """Nothing to release: the image lives in memory (the same interface as `SlideReader.close`)."""

    def read(self, top: int, left: int, height: int, width: int) -> np.ndarray:
        return pad_to(self.image, top, left, height, width, reflect=True)


class SlideReader:
    """Level-0 windows of a slide region through the slide's reader; only the requested window is decoded."""

    def __init__(self, path: Path, region: tuple[int, int, int, int] | None, reader: str = "auto") -> None:
        from pathssl_cli.slides.readers import SlideError, open_slide

        try:
            self.slide = open_slide(path, reader)
        except SlideError as exc:
            raise WorkFailed(f"{path}: {exc.reason}" + (f" ({exc.fix})" if exc.fix else "")) from None
        self.reader = f"{self.slide.reader_name} {self.slide.reader_version}"
        full_w, full_h = self.slide.dimensions
        x, y, w, h = region if region is not None else (0, 0, full_w, full_h)
        if x < 0 or y < 0 or w <= 0 or h <= 0 or x + w > full_w or y + h > full_h:
            raise SpecError(
                f"predict.region {region} lies outside the slide ({full_w}x{full_h} at level 0)",
                where=str(path),
            )
        self.x0, self.y0, self.width, self.height = x, y, w, h

    def close(self) -> None:
        self.slide.close()

    def read(self, top: int, left: int, height: int, width: int) -> np.ndarray:
        t, l_ = max(top, 0), max(left, 0)
        b, r = min(top + height, self.height), min(left + width, self.width)
        crop = np.asarray(
            self.slide.read_region((self.x0 + l_, self.y0 + t), 0, (r - l_, b - t), as_array=True)
        )
        crop = crop[..., :3]
        # Pad the way ImageReader does, relative to the region, so both readers give the same patches.
        return (
            pad_to(crop, top - t, left - l_, height, width, reflect=True)
            if (t, l_, b, r) != (top, left, top + height, left + width)
            else crop
        )


def open_reader(
    path: Path, region: tuple[int, int, int, int] | None, slide_reader: str = "auto"
) -> ImageReader | SlideReader:
    """PNG/JPEG and small flat TIFFs are read whole; slides and pyramidal or large TIFFs window by window."""
    suffix = path.suffix.lower()
    if path.is_dir():  # a DICOM-WSI series folder
        return SlideReader(path, region, slide_reader)
    if suffix in (".png", ".jpg", ".jpeg") or (
        suffix in IMAGE_SUFFIXES and path.stat().st_size < 64 * 2**20 and not _is_pyramid(path)
    ):
        reader = ImageReader.open(path)
        if region is None:
            return reader
        x, y, w, h = region
        if x < 0 or y < 0 or w <= 0 or h <= 0 or x + w > reader.width or y + h > reader.height:
            raise SpecError(
                f"predict.region {region} lies outside the image ({reader.width}x{reader.height})",
                where=str(path),
            )
        return ImageReader(reader.image[y : y + h, x : x + w])
    return SlideReader(path, region, slide_reader)


def _is_pyramid(path: Path) -> bool:
    import tifffile

    try:
        with tifffile.TiffFile(path) as tif:
            return len(tif.series[0].levels) > 1 or bool(getattr(tif.pages[0], "is_tiled", False))
    except Exception:
        return False


# ------------------------------------------------------------------------------------------------ inference
