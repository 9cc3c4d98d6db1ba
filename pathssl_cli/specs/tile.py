"""`kind = "tile"`: whole-slide images → tiles at chosen fields of view (`pathssl tile`).

```toml
kind = "tile"
[input]
slides = ["slides/*.svs"]     # paths, globs, or CSV files with a `path` and an optional `mpp` column
mpp_override = 0.25           # level-0 µm/px of every slide, over its metadata (unset: the metadata's)
[tiles]
mpp = [0.25, 0.5]             # fields of view in µm/px (about 40x and 20x)
size = 224
min_tissue = 0.5
[output]
dir = "runs/tiles"
[run]
workers = 2
```
"""

from __future__ import annotations

import csv
import glob
import re
from pathlib import Path
from typing import Annotated, Literal

from pydantic import AfterValidator, Field, field_validator

from pathssl_cli.errors import Problem
from pathssl_cli.specs.core import OutputPath, PathPattern, Section, SpecModel

# Nominal objective magnification → µm/px, the convention of Aperio/Leica scanners (40x ≈ 0.25 µm/px).
MAGNIFICATION_MPP: dict[str, float] = {"80x": 0.125, "40x": 0.25, "20x": 0.5, "10x": 1.0, "5x": 2.0}



def _slide_reader_installed(value: str) -> str:
    from pathssl_cli.slides.readers import reader_problem

    problem = reader_problem(value)
    if problem:
        raise ValueError(problem)
    return value


#: A slide library choice, refused at validation when its extra is not installed (tile and segment predict).
SlideReaderName = Annotated[Literal["auto", "tiffslide", "openslide", "dicom"], AfterValidator(_slide_reader_installed)]

class TileInput(Section):
    slides: list[PathPattern] = Field(
        min_length=1,
        description="Slide files, glob patterns (`**` allowed) or CSV files with a `path` column and an "
        "optional "
        "`mpp` column (µm/px, overrides the metadata for that slide). Relative paths are resolved "
        "against the "
        "spec file's folder (CSV paths against the CSV's folder).",
    )
    mpp_override: float | None = Field(
        default=None,
        gt=0,
        description="Level-0 µm/px of every slide, winning over the MPP in its metadata (which can be "
        "wrong: libvips writes 1000 µm/px when given no resolution); recorded as the MPP's source per slide. "
        "A slide CSV's `mpp` column wins over it for its slide. Unset by default: the metadata's MPP is used, "
        "and a slide without one is an error naming it (guessing a resolution silently would tile at the wrong "
        "field of view).",
    )
    reader: SlideReaderName = Field(
        default="auto",
        description="Slide library: 'auto' tries tiffslide, then OpenSlide (extra 'openslide': MIRAX, Leica, "
        "Ventana, Hamamatsu VMS, Philips), then wsidicom (extra 'dicom': DICOM-WSI folders). The reader used "
        "is recorded per slide, because readers may decode pixels slightly differently.",
    )



class TileGrid(Section):
    mpp: list[float | str] = Field(
        default=[0.5],
        min_length=1,
        description="Fields of view in µm/px, e.g. [0.25, 0.5] for about 40x and 20x. The aliases '40x', "
        "'20x', "
        "'10x', '5x' map to 0.25, 0.5, 1, 2 µm/px. Default 0.5 µm/px (20x), the resolution of most "
        "benchmarks.",
    )
    size: int = Field(
        default=224,
        ge=16,
        le=4096,
        description="Output tile side in pixels at the target µm/px; 224 is the backbones' input size.",
    )
    min_tissue: float = Field(
        default=0.5,
        ge=0.0,
        le=1.0,
        description="Smallest fraction of a tile covered by the tissue mask for it to be kept (0-1). 0.5 "
        "keeps "
        "tiles that are mostly tissue while still sampling tissue borders.",
    )
    max_white: float = Field(
        default=0.8,
        ge=0.0,
        le=1.0,
        description="Drop a tile when more than this fraction of its pixels is near-white (all RGB ≥ 220): "
        "glass, fat or tears the coarse mask missed. 1.0 disables the check.",
    )
    max_black: float = Field(
        default=0.3,
        ge=0.0,
        le=1.0,
        description="Drop a tile when more than this fraction of its pixels is near-black (all RGB ≤ "
        "35): pen "
        "marks, folds and scanner padding. 1.0 disables the check.",
    )

    @field_validator("mpp")
    @classmethod
    def _physical_mpp(cls, values: list[float | str]) -> list[float | str]:
        for value in values:
            if isinstance(value, str):
                if value.lower() not in MAGNIFICATION_MPP:
                    raise ValueError(
                        f"unknown magnification {value!r}; use µm/px numbers or one of "
                        f"{', '.join(MAGNIFICATION_MPP)}"
                    )
            elif not 0.05 <= value <= 64:
                raise ValueError(f"µm/px must lie in [0.05, 64], got {value} (0.25 ≈ 40x, 0.5 ≈ 20x)")
        if len(set(_as_mpp(v) for v in values)) != len(values):
            raise ValueError(f"fields of view repeat: {values}")
        return values

    def mpp_values(self) -> list[float]:
        """The fields of view in µm/px, aliases resolved."""
        return [_as_mpp(v) for v in self.mpp]


def _as_mpp(value: float | str) -> float:
    return MAGNIFICATION_MPP[value.lower()] if isinstance(value, str) else float(value)


class TileOutput(Section):
    dir: OutputPath = Field(
        description="Tile store folder: shards/, parts/ and slides/ (the Parquet index), qc/, errors.csv, "
        "summary.json. Several runs or array tasks may fill one store at the same time."
    )
    jpeg_quality: int = Field(
        default=90,
        ge=50,
        le=100,
        description="JPEG quality of the written tiles; 90 keeps artefacts below what stain "
        "augmentation changes, at about a third of the size of quality 100.",
    )
    tiles_per_shard: int = Field(
        default=2000,
        ge=1,
        description="Most tiles in one tar shard; about 50-100 MB at 224 px, a good size "
        "for streaming from disk or object storage.",
    )
    qc_thumbnails: bool = Field(
        default=True, description="Write qc/<slide>.png: thumbnail, tissue mask, tile grid."
    )


class TileRun(Section):
    workers: int = Field(default=2, ge=1, description="Worker processes, one slide each at a time.")
    allow_failures: bool = Field(
        default=False,
        description="Exit 0 even when some slides failed (they are still listed in errors.csv). Off by "
        "default so "
        "that a pipeline notices unreadable slides.",
    )


class TileSpec(SpecModel):
    kind: Literal["tile"] = Field(description="Spec kind: 'tile'.")
    input: TileInput = Field(description="Which slides to tile.")
    tiles: TileGrid = Field(default_factory=TileGrid, description="Fields of view, tile size and filters.")
    output: TileOutput = Field(description="Where and how to write the tile store.")
    run: TileRun = Field(default_factory=TileRun, description="Parallelism and failure policy.")

    def check_inputs(self) -> list[Problem]:
        # A path without glob characters names one file: like model.weights, it must exist (a typo there
        # would otherwise surface only as a failed slide in errors.csv after the run). Paths listed inside a
        # CSV stay per-slide errors, so that one lost file does not stop a run over thousands.
        missing = [
            Problem(f"{self.source_file or 'spec'}: input.slides[{i}]",
                    f"file not found: {item}. Fix the path, or use a glob pattern or a CSV list for slides "
                    "that may be absent.")
            for i, item in enumerate(self.input.slides) if not _GLOB.search(item) and not Path(item).exists()
        ]
        if missing:
            return missing
        try:
            slides = resolve_slides(self)
        except (ValueError, OSError) as exc:
            return [Problem(f"{self.source_file or 'spec'}: input.slides", str(exc))]
        if not slides:
            return [
                Problem(
                    f"{self.source_file or 'spec'}: input.slides",
                    f"no slide matched {self.input.slides}. Check the paths or glob patterns.",
                )
            ]
        return []


_GLOB = re.compile(r"[*?\[]")  # what makes an input.slides entry a pattern rather than one file


def _read_slide_csv(path: Path) -> list[tuple[Path, float | None]]:
    with path.open(newline="") as fh:
        reader = csv.DictReader(fh)
        if reader.fieldnames is None or "path" not in reader.fieldnames:
            raise ValueError(f"{path}: a slide CSV needs a 'path' column (found {reader.fieldnames})")
        found = []
        for line, row in enumerate(reader, start=2):
            raw_mpp = (row.get("mpp") or "").strip()
            try:
                mpp = float(raw_mpp) if raw_mpp else None
            except ValueError:
                raise ValueError(f"{path}: line {line}: mpp {raw_mpp!r} is not a number") from None
            if mpp is not None and mpp <= 0:
                raise ValueError(f"{path}: line {line}: mpp must be > 0, got {mpp}")
            slide = Path(row["path"].strip()).expanduser()
            found.append((slide if slide.is_absolute() else path.parent / slide, mpp))
        return found


def resolve_slides(spec: TileSpec) -> list[tuple[Path, float | None]]:
    """(slide path, per-slide mpp or None), sorted and de-duplicated, from paths, globs and CSV files.

    Missing paths listed in a CSV are kept: they are reported per slide in errors.csv, not as a spec error,
    so one lost file does not stop a run over thousands (a missing path in the spec itself is a spec error).
    """
    return resolve_slide_items(spec.input.slides)


def resolve_slide_items(items: list[str]) -> list[tuple[Path, float | None]]:
    """`resolve_slides` for any list of paths, globs and CSV files (also `pretrain`'s `data.slides`)."""
    found: dict[Path, float | None] = {}
    for item in items:
        if item.lower().endswith(".csv") and not re.search(r"[*?\[]", item):
            for path, mpp in _read_slide_csv(Path(item)):
                found[path.resolve()] = mpp
        elif re.search(r"[*?\[]", item):
            for match in glob.glob(item, recursive=True):
                if Path(match).is_file():
                    found.setdefault(Path(match).resolve(), None)
        else:
            found.setdefault(Path(item).resolve(), None)
    return sorted(found.items())
