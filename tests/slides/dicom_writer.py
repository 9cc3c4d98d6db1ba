"""Write a small DICOM-WSI pyramid (VL Whole Slide Microscopy Image, TILED_FULL, JPEG baseline) with pydicom.

For tests only: converts pixels read from a real slide into the format hospital archives use, so the DICOM
reader is exercised without a DICOM sample on disk. One file per level, levels halving.
"""

from __future__ import annotations

from pathlib import Path

import cv2
import imagecodecs
import numpy as np

WSM_SOP_CLASS = "1.2.840.10008.5.1.4.1.1.77.1.6"


def write_dicom_wsi(rgb: np.ndarray, mpp: float | None, out_dir: Path, *, tile: int = 256, levels: int = 2,
                    quality: int = 95) -> list[Path]:
    """Write `rgb` (H, W, 3 uint8, level 0 at `mpp` µm/px) as `levels` DICOM files in `out_dir`.

    `mpp=None` leaves out the pixel spacing and imaged size, as some converters do.
    """
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.encaps import encapsulate
    from pydicom.uid import JPEGBaseline8Bit, generate_uid

    out_dir.mkdir(parents=True, exist_ok=True)
    study, series, frame_of_ref = generate_uid(), generate_uid(), generate_uid()
    paths = []
    image = rgb
    for level in range(levels):
        height, width = image.shape[:2]
        spacing_mm = (mpp or 1.0) * 2**level / 1000
        frames = []
        for y in range(0, height, tile):
            for x in range(0, width, tile):
                block = np.full((tile, tile, 3), 255, np.uint8)
                part = image[y : y + tile, x : x + tile]
                block[: part.shape[0], : part.shape[1]] = part
                frames.append(bytes(imagecodecs.jpeg8_encode(block, level=quality)))
        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID = WSM_SOP_CLASS
        meta.MediaStorageSOPInstanceUID = generate_uid()
        meta.TransferSyntaxUID = JPEGBaseline8Bit
        ds = Dataset()
        ds.file_meta = meta
        ds.SOPClassUID = WSM_SOP_CLASS
        ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
        ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.FrameOfReferenceUID = study, series, frame_of_ref
        ds.Modality = "SM"
        ds.ImageType = ["ORIGINAL", "PRIMARY", "VOLUME", "NONE"] if level == 0 else [
            "DERIVED", "PRIMARY", "VOLUME", "RESAMPLED"]
        ds.InstanceNumber = level + 1
        ds.PatientName, ds.PatientID = "test", "test"
        ds.ContainerIdentifier = "test-slide"
        ds.DimensionOrganizationType = "TILED_FULL"
        ds.TotalPixelMatrixColumns, ds.TotalPixelMatrixRows = width, height
        ds.TotalPixelMatrixFocalPlanes = 1
        ds.Rows = ds.Columns = tile
        ds.NumberOfFrames = len(frames)
        ds.SamplesPerPixel = 3
        ds.PhotometricInterpretation = "YBR_FULL_422"
        ds.PlanarConfiguration = 0
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 8, 8, 7, 0
        ds.LossyImageCompression = "01"
        if mpp is not None:
            ds.ImagedVolumeWidth = width * spacing_mm
            ds.ImagedVolumeHeight = height * spacing_mm
        ds.ImagedVolumeDepth = 0.001
        ds.NumberOfOpticalPaths = 1
        optical = Dataset()
        optical.OpticalPathIdentifier = "0"
        ds.OpticalPathSequence = [optical]
        origin = Dataset()
        origin.XOffsetInSlideCoordinateSystem = 0.0
        origin.YOffsetInSlideCoordinateSystem = 0.0
        ds.TotalPixelMatrixOriginSequence = [origin]
        ds.ImageOrientationSlide = [0, -1, 0, -1, 0, 0]
        shared = Dataset()
        if mpp is not None:
            measures = Dataset()
            measures.PixelSpacing = [spacing_mm, spacing_mm]
            measures.SliceThickness = 0.001
            shared.PixelMeasuresSequence = [measures]
        ds.SharedFunctionalGroupsSequence = [shared]
        ds.PixelData = encapsulate(frames)
        ds["PixelData"].VR = "OB"
        path = out_dir / f"level{level}.dcm"
        ds.save_as(path, enforce_file_format=True)
        paths.append(path)
        image = cv2.resize(image, (max(width // 2, 1), max(height // 2, 1)), interpolation=cv2.INTER_AREA)
    return paths


def decoded_frames(path: Path) -> np.ndarray:
    """The level a DICOM file holds, decoded frame by frame with libjpeg-turbo: the exact reference."""
    import pydicom
    from pydicom.encaps import generate_frames

    ds = pydicom.dcmread(path)
    width, height, tile = ds.TotalPixelMatrixColumns, ds.TotalPixelMatrixRows, ds.Columns
    cols = -(-width // tile)
    out = np.zeros((-(-height // tile) * tile, cols * tile, 3), np.uint8)
    for i, frame in enumerate(generate_frames(ds.PixelData, number_of_frames=ds.NumberOfFrames)):
        row, col = divmod(i, cols)
        out[row * tile : (row + 1) * tile, col * tile : (col + 1) * tile] = imagecodecs.jpeg8_decode(frame)
    return out[:height, :width]
