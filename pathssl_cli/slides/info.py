"""`pathssl slides info`: what a set of slides holds, from metadata only, before a long tiling run.

For each slide: format, reader, dimensions and levels with their downsamples, MPP and where it came from (or that
it is missing), objective power, compression, associated images and size on disk. No pixels are decoded.
"""

from __future__ import annotations

import csv
import glob
import io
import json
import re
import time
from pathlib import Path
from typing import Any

from pathssl_cli.slides.readers import DICOM_SUFFIXES, SlideError, metadata_mpp, open_slide, slide_mpp

# Files `slides info` picks up when given a folder (a file named outright is always tried).
SLIDE_SUFFIXES = (
    ".svs", ".tif", ".tiff", ".ndpi", ".scn", ".bif", ".mrxs", ".vms", ".vmu", ".svslide", ".qptiff",
)
VENDOR_KEYS = ("tiffslide.vendor", "openslide.vendor")
POWER_KEYS = ("tiffslide.objective-power", "openslide.objective-power", "dicom.objective-power")


def expand_slide_paths(items: list[str]) -> list[Path]:
    """Files, folders (their slide files and DICOM series folders, recursively) and globs → sorted unique paths.

    A path that does not exist is kept, so that it is listed as unreadable rather than silently dropped.
    """
    found: dict[Path, None] = {}
    for item in items:
        matches = sorted(glob.glob(item, recursive=True)) if re.search(r"[*?\[]", item) else [item]
        for match in matches:
            path = Path(match)
            for slide in _slides_under(path) if path.is_dir() else [path]:
                found.setdefault(slide, None)
    return list(found)


def _slides_under(folder: Path) -> list[Path]:
    if _is_dicom_folder(folder):
        return [folder]
    slides: list[Path] = []
    for child in sorted(folder.iterdir()):
        if child.is_dir():
            slides += _slides_under(child)
        elif child.suffix.lower() in SLIDE_SUFFIXES:
            slides.append(child)
    return slides


def _is_dicom_folder(folder: Path) -> bool:
    return any(p.suffix.lower() in DICOM_SUFFIXES for p in folder.iterdir() if p.is_file())


def _size_on_disk(path: Path) -> int:
    if path.is_dir():
        return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())
    size = path.stat().st_size
    companion = path.with_suffix("")  # MIRAX keeps its pixels in a folder named like the .mrxs file
    if path.suffix.lower() == ".mrxs" and companion.is_dir():
        size += _size_on_disk(companion)
    return size


def _number(value: Any) -> float | None:
    """Readers give the objective power as int (tiffslide) or text (OpenSlide, DICOM): one type for JSON/CSV."""
    try:
        return float(value) if value not in (None, "") else None
    except (TypeError, ValueError):
        return None


def _compression(slide: Any, path: Path) -> str | None:
    tif = getattr(slide, "ts_tifffile", None)
    if tif is None and path.is_file() and path.suffix.lower() in (".tif", ".tiff", ".svs", ".ndpi", ".scn", ".bif"):
        import tifffile

        try:
            with tifffile.TiffFile(path) as handle:
                page: Any = handle.pages[0]
                return str(page.compression.name)
        except Exception:  # not a TIFF after all, or unreadable header: leave compression unknown
            return None
    if tif is not None:
        try:
            series = tif.series[int(slide.properties.get("tiffslide.series-index", 0))]
            return str(series.levels[0].keyframe.compression.name)
        except (AttributeError, IndexError, KeyError, ValueError):
            return None
    props = slide.properties
    if props.get("dicom.transfer-syntax"):
        return str(props["dicom.transfer-syntax"])
    formats = {v for k, v in props.items() if k.endswith("IMAGE_FORMAT")}  # MIRAX Slidedat.ini
    if formats:
        return ",".join(sorted(formats))
    return "JPEG" if path.suffix.lower() in (".vms", ".vmu") else None


def slide_info(path: Path, reader: str = "auto", mpp_override: float | None = None) -> dict[str, Any]:
    """Metadata of one slide; unreadable slides come back with `error` set and the rest empty.

    `mpp` is what tile and segment predict would use (`slide_mpp`: `mpp_override` wins), `mpp_source` the
    metadata key it came from or "override", `metadata_mpp` what the file itself says."""
    started = time.perf_counter()
    row: dict[str, Any] = {"path": str(path), "error": None}
    try:
        slide = open_slide(path, reader)
    except SlideError as exc:
        row["error"] = exc.reason + (f" ({exc.fix})" if exc.fix else "")
        row["seconds"] = round(time.perf_counter() - started, 4)
        return row
    try:
        props = slide.properties
        metadata, key = metadata_mpp(slide)
        try:
            mpp, source = slide_mpp(slide, mpp_override, path)
        except SlideError:
            mpp, source = None, "missing"
        source = key if source == "metadata" else source
        vendor = next((props[k] for k in VENDOR_KEYS if props.get(k)), None)
        tif = getattr(slide, "ts_tifffile", None)
        if vendor is None and tif is not None:
            vendor = "ome-tiff" if tif.is_ome else "generic-tiff"
        row.update(
            format=vendor or slide.reader_name,
            reader=slide.reader_name,
            reader_version=slide.reader_version,
            width=int(slide.dimensions[0]),
            height=int(slide.dimensions[1]),
            levels=[
                {"width": int(w), "height": int(h), "downsample": round(float(ds), 4)}
                for (w, h), ds in zip(slide.level_dimensions, slide.level_downsamples, strict=True)
            ],
            mpp=mpp,
            mpp_source=source,
            metadata_mpp=metadata,
            objective_power=_number(next((props[k] for k in POWER_KEYS if props.get(k)), None)),
            compression=_compression(slide, path),
            associated_images=sorted(slide.associated_images),
            file_size_bytes=_size_on_disk(path),
        )
    except Exception as exc:  # a header that opens but lies: report it like an unreadable slide
        row["error"] = f"{type(exc).__name__}: {(str(exc).splitlines() or [''])[0]}"
    finally:
        slide.close()
    row["seconds"] = round(time.perf_counter() - started, 4)
    return row


CSV_COLUMNS = (
    "path", "format", "reader", "reader_version", "width", "height", "levels", "mpp", "mpp_source", "metadata_mpp",
    "objective_power", "compression", "associated_images", "file_size_bytes", "error",
)


def _csv(rows: list[dict[str, Any]]) -> str:
    out = io.StringIO()
    writer = csv.DictWriter(out, CSV_COLUMNS, extrasaction="ignore", lineterminator="\n")
    writer.writeheader()
    for row in rows:
        flat = dict(row)
        if row.get("levels") is not None:
            flat["levels"] = ";".join(f"{lv['width']}x{lv['height']}@{lv['downsample']:g}" for lv in row["levels"])
        if row.get("associated_images") is not None:
            flat["associated_images"] = ";".join(row["associated_images"])
        writer.writerow(flat)
    return out.getvalue()


def _text(rows: list[dict[str, Any]]) -> str:
    lines = []
    for row in rows:
        lines.append(row["path"])
        if row["error"]:
            lines.append(f"  UNREADABLE: {row['error']}")
            continue
        mpp = (f"{row['mpp']:.4g} µm/px (from {row['mpp_source']})" if row["mpp"] is not None
               else "MISSING (tile needs input.mpp_override or an mpp column)")
        if row["mpp_source"] == "override":
            said = row["metadata_mpp"]
            mpp += f"; the metadata says {said:.4g}" if said is not None else "; none in the metadata"
        levels = ", ".join(f"{lv['width']}x{lv['height']} (/{lv['downsample']:g})" for lv in row["levels"])
        objective = f"{row['objective_power']:g}x" if row["objective_power"] else "unknown"
        lines += [
            f"  format {row['format']}, read by {row['reader']} {row['reader_version']}",
            f"  levels {len(row['levels'])}: {levels}",
            f"  mpp {mpp}; objective {objective}",
            f"  compression {row['compression'] or 'unknown'}; "
            f"associated images: {', '.join(row['associated_images']) or 'none'}; "
            f"{row['file_size_bytes'] / 2**20:.1f} MiB",
        ]
    return "\n".join(lines)


def run_slides_info(items: list[str], *, reader: str = "auto", fmt: str = "text",
                    mpp_override: float | None = None) -> tuple[str, list[dict[str, Any]]]:
    """Inspect every slide `items` names; returns (the output in `fmt`: text | json | csv, the rows)."""
    rows = [slide_info(path, reader, mpp_override) for path in expand_slide_paths(items)]
    if fmt == "json":
        return json.dumps(rows, indent=2), rows
    if fmt == "csv":
        return _csv(rows), rows
    failed = sum(row["error"] is not None for row in rows)
    summary = f"{len(rows)} slide(s), {failed} unreadable" if rows else "no slides found"
    return (_text(rows) + "\n" if rows else "") + summary, rows


def write_slides_info(items: list[str], *, reader: str, as_json: bool, out_csv: Path | None,
                      mpp_override: float | None = None) -> list[dict[str, Any]]:
    """The `slides info` command: print text or JSON, optionally write CSV; WorkFailed (exit 1) if any failed."""
    import click

    from pathssl_cli.errors import WorkFailed
    from pathssl_cli.fileio import atomic_write

    if out_csv is not None and str(out_csv) == "-":
        text, rows = run_slides_info(items, reader=reader, fmt="csv", mpp_override=mpp_override)
        click.echo(text, nl=False)
    else:
        text, rows = run_slides_info(items, reader=reader, fmt="json" if as_json else "text",
                                     mpp_override=mpp_override)
        click.echo(text)
        if out_csv is not None:
            atomic_write(out_csv, _csv(rows))
    failed = [row for row in rows if row["error"] is not None]
    if not rows:
        raise WorkFailed(f"no slides found in {items}")
    if failed:
        raise WorkFailed(f"{len(failed)} of {len(rows)} slide(s) unreadable, e.g. {failed[0]['path']}: "
                         f"{failed[0]['error']}")
    return rows
