"""Reading nuclei instance maps: generic files, CoNSeP `.mat` labels and PanNuke `masks.npy` folds.

Every reader checks what it reads and raises `SpecError` naming the file when the content is not an instance
map (wrong shape, values that are not whole numbers, missing keys), so `pathssl segment score` exits with code
2 and a message instead of a traceback.

Generic layout: one map per file, `.npy` (H, W) or (H, W, 2) = instance + type, `.png` / `.tif` / `.tiff`
single-channel integer images (16/32-bit for more than 255 nuclei), or a `.mat` with ``inst_map`` (and
optionally ``type_map``). A HoVer-Net-style `.npy` of (H, W, 5) = RGB + instance + type is also accepted.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from pathssl_cli.errors import SpecError

MAP_SUFFIXES: tuple[str, ...] = (".npy", ".png", ".tif", ".tiff", ".mat")
# CoNSeP's 7 original types merged into 4, as HoVer-Net does: 3+4 -> epithelial, 5+6+7 -> spindle-shaped.
CONSEP_MERGE: dict[int, int] = {0: 0, 1: 1, 2: 2, 3: 3, 4: 3, 5: 4, 6: 4, 7: 4}


@dataclass
class ConsepLabel:
    """One CoNSeP label file. `inst_type[k]` and `inst_centroid[k]` (x, y) describe instance id k + 1."""

    inst_map: np.ndarray  # (H, W) int32
    type_map: np.ndarray  # (H, W) int32
    inst_type: np.ndarray  # (N,) int32
    inst_centroid: np.ndarray  # (N, 2) float64, x, y


def as_integer_map(array: np.ndarray, where: str, *, ndim: int = 2) -> np.ndarray:
    """Check that `array` holds whole numbers with `ndim` dimensions and return it as int32."""
    array = np.asarray(array)
    if array.ndim != ndim:
        raise SpecError(f"expected a {ndim}-D integer map, got shape {array.shape}", where=where)
    if array.dtype == bool:
        return array.astype(np.int32)
    if np.issubdtype(array.dtype, np.floating):
        if not np.all(np.isfinite(array)) or not np.array_equal(array, np.round(array)):
            raise SpecError(
                "instance map holds non-integer values (a probability or an image?); save integer ids "
                "with 0 = background",
                where=where,
            )
    elif not np.issubdtype(array.dtype, np.integer):
        raise SpecError(f"instance map has dtype {array.dtype}; expected integer ids", where=where)
    if array.size and array.min() < 0:
        raise SpecError("instance map holds negative ids; use 0 for background and positive ids", where=where)
    if array.size and array.max() > np.iinfo(np.int32).max:
        raise SpecError("instance ids exceed the int32 range", where=where)
    return array.astype(np.int32)


def _load_mat(path: Path) -> dict:
    import scipy.io as sio

    try:
        return sio.loadmat(str(path))
    except Exception as exc:  # scipy raises several types for corrupt or non-MATLAB files
        raise SpecError(f"cannot read as a MATLAB .mat file ({exc})", where=str(path)) from exc


def read_consep_label(path: str | Path, *, merge_types: bool = False) -> ConsepLabel:
    """Read a CoNSeP `Labels/<name>.mat`. With `merge_types`, map the 7 official types to 4 (`CONSEP_MERGE`).

    Tiles already in 4 classes must not be merged again (their 3 and 4 would collapse); the caller decides.
    """
    path = Path(path)
    mat = _load_mat(path)
    if "inst_map" not in mat:
        raise SpecError("no 'inst_map' in this .mat; expected a CoNSeP label file", where=str(path))
    inst = as_integer_map(mat["inst_map"], str(path))
    type_map = (
        as_integer_map(mat["type_map"], f"{path}: type_map") if "type_map" in mat else np.zeros_like(inst)
    )
    inst_type = np.asarray(mat.get("inst_type", np.zeros((0, 1)))).reshape(-1).astype(np.int32)
    centroid = np.asarray(mat.get("inst_centroid", np.zeros((0, 2))), dtype=np.float64).reshape(-1, 2)
    if merge_types:
        lookup = np.array([CONSEP_MERGE.get(i, i) for i in range(max(8, int(type_map.max(initial=0)) + 1))])
        type_map = lookup[type_map].astype(np.int32)
        inst_type = lookup[inst_type].astype(np.int32) if inst_type.size else inst_type
    return ConsepLabel(inst, type_map, inst_type, centroid)


def _read_image(path: Path) -> np.ndarray:
    if path.suffix.lower() in (".tif", ".tiff"):
        import tifffile

        try:
            return tifffile.imread(str(path))
        except Exception as exc:
            raise SpecError(f"cannot read as TIFF ({exc})", where=str(path)) from exc
    import cv2

    image = cv2.imread(str(path), cv2.IMREAD_UNCHANGED)
    if image is None:
        raise SpecError("cannot read as an image", where=str(path))
    return image


def read_instance_map(path: str | Path) -> tuple[np.ndarray, np.ndarray | None]:
    """Read one generic instance map file: returns (inst (H, W) int32, type map (H, W) int32 or None)."""
    path = Path(path)
    where = str(path)
    suffix = path.suffix.lower()
    if not path.is_file():
        raise SpecError("file not found", where=where)
    if suffix == ".mat":
        label = read_consep_label(path)
        return label.inst_map, label.type_map
    if suffix == ".npy":
        try:
            array = np.load(path, allow_pickle=False)
        except Exception as exc:
            raise SpecError(f"cannot read as a .npy array ({exc})", where=where) from exc
        if array.ndim == 3 and array.shape[2] == 2:
            return as_integer_map(array[..., 0], where), as_integer_map(array[..., 1], where)
        if array.ndim == 3 and array.shape[2] == 5:  # HoVer-Net training patch: RGB + inst + type
            return as_integer_map(array[..., 3], where), as_integer_map(array[..., 4], where)
        return as_integer_map(array, where), None
    if suffix in (".png", ".tif", ".tiff"):
        image = _read_image(path)
        if image.ndim == 3 and image.shape[2] > 1:
            raise SpecError(
                f"instance map image has {image.shape[2]} channels; save a single-channel 16- or 32-bit "
                "image of integer ids (a colour overlay cannot be scored)",
                where=where,
            )
        return as_integer_map(image.reshape(image.shape[:2]), where), None
    raise SpecError(f"unsupported file type {suffix!r}; use one of {', '.join(MAP_SUFFIXES)}", where=where)


def read_pannuke_masks(path: str | Path) -> np.ndarray:
    """Memory-map a PanNuke `masks.npy` (N, H, W, 6); values are checked image by image when scored."""
    path = Path(path)
    try:
        masks = np.load(path, mmap_mode="r", allow_pickle=False)
    except Exception as exc:
        raise SpecError(f"cannot read as a .npy array ({exc})", where=str(path)) from exc
    if masks.ndim != 4 or masks.shape[3] < 5:
        raise SpecError(f"expected PanNuke masks of shape (N, H, W, 6), got {masks.shape}", where=str(path))
    return masks


def read_pannuke_types(path: str | Path, n_images: int) -> list[str]:
    """Read a PanNuke `types.npy` (tissue name per image) and check its length against the masks."""
    path = Path(path)
    try:
        types = np.load(path, allow_pickle=False)
    except Exception as exc:
        raise SpecError(f"cannot read as a .npy array of tissue names ({exc})", where=str(path)) from exc
    if types.shape != (n_images,):
        raise SpecError(f"has {types.shape} entries, the masks have {n_images} images", where=str(path))
    return [str(t) for t in types]


def pannuke_instance_map(masks: np.ndarray, where: str = "") -> tuple[np.ndarray, np.ndarray]:
    """One PanNuke image (H, W, 6) -> (instance map (H, W) int32 ids 1..N, type map (H, W) int32 1..5).

    Ids come from `binarize` (channels in order, later channels win overlaps); types are channel index + 1.
    """
    from pathssl_cli.segment.metrics_pannuke import binarize

    channels = np.stack([as_integer_map(masks[..., c], where) for c in range(5)], axis=-1)
    inst = binarize(channels)
    type_map = np.zeros(inst.shape, dtype=np.int32)
    for c in range(5):
        type_map[channels[..., c] > 0] = c + 1
    return inst, type_map
