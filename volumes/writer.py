"""A generated slice as a NIfTI file: the reader's way of showing a slice (volumes/reader.py), undone.

A sample is a 2D image; it was never in a scanner. Written as a volume of one slice, it carries what the training
data tells about such an image: the plane of the training axis (a sagittal run's samples are sagittal slices in
RAS), the training slices' pixel size in mm (each volume's foreground box, resampled to square pixels and fitted
into the image), and the training volumes' intensity range (their clipping percentiles). The affine is RAS with its
origin at the image's centre; its xform codes say "aligned" (2), not "scanner" (1): the position means nothing.
A run trained on 2D images knows neither axis nor spacing: its samples are written as axial slices of 1 mm pixels
with the images' 0-255 range, and the header's description says so.
"""
from __future__ import annotations

import gzip
import statistics
from dataclasses import dataclass

import nibabel as nib
import numpy as np

from runtime.checkpoint import atomic_write
from runtime.errors import BadInputError
from volumes.reader import AXES, Slicing, load, printable, read_volume

ALIGNED = 2          # NIfTI xform code "aligned to another file's or to anatomical truth": not scanner space
GEOMETRY_VOLUMES = 8  # training volumes read to find the pixel size and intensity range (their medians)


@dataclass
class SampleGeometry:
    """Where a run's samples would sit if they were slices of its training volumes."""
    axis: str = "axial"              # the plane: the training axis (volumes), axial for 2D images
    spacing: float = 1.0             # mm per pixel of a sample
    low: float = 0.0                 # the intensity of -1 ...
    high: float = 255.0              # ... and of +1
    known: bool = False              # False: a run on 2D images, so axis and spacing are assumed

    def description(self) -> str:
        """The header's 80-character description."""
        what = (f"{self.axis} plane, {self.spacing:.3g} mm pixels as trained" if self.known
                else "trained on 2D images: plane, 1 mm assumed")
        return f"synthetic slice, no scanner space; {what}"[:80]


def training_geometry(paths: list[str], slicing: Slicing, image_size: int, skip_bad: bool = False) -> SampleGeometry:
    """The geometry of samples of a run trained on the NIfTI volumes `paths` (medians over the first
    GEOMETRY_VOLUMES of them that can be read, with `skip_bad` as the run was trained; else the first unreadable
    one stops it): a slice's foreground box in mm, fitted into image_size pixels, as the reader fits it."""
    spacings, lows, highs = [], [], []
    for path in paths:
        if len(spacings) == GEOMETRY_VOLUMES:
            break
        try:
            volume = read_volume(path, slicing)
        except BadInputError:
            if not skip_bad:
                raise
            continue
        du, dv = np.delete(volume.spacing, AXES[slicing.axis])
        box_u, box_v = (len(range(*s.indices(n))) for s, n in zip(volume.box, volume.voxels.shape[1:]))
        spacings.append(max(box_u * du, box_v * dv) / image_size)
        lows.append(volume.low)
        highs.append(volume.high)
    if not spacings:
        raise BadInputError(f"none of the run's {len(paths)} training volumes can be read now")
    return SampleGeometry(slicing.axis, float(statistics.median(spacings)), float(statistics.median(lows)),
                          float(statistics.median(highs)), known=True)


def slice_volume(image: np.ndarray, geometry: SampleGeometry) -> nib.Nifti1Image:
    """An image (S, S) in [-1, 1], as shown, -> a NIfTI volume of one slice across geometry.axis, RAS, float32 in
    the geometry's intensity range (cal_min and cal_max hold it, so that `read_slice` can undo it)."""
    shown = (np.asarray(image, dtype=np.float32) + 1) / 2
    plane = shown[::-1, ::-1].T                                  # the reader's transpose and flips undone: (U, V)
    voxels = np.expand_dims(plane, AXES[geometry.axis]) * (geometry.high - geometry.low) + geometry.low
    affine = np.diag([geometry.spacing] * 3 + [1.0])
    affine[:3, 3] = -(np.array(voxels.shape) - 1) / 2 * geometry.spacing   # the origin at the image's centre
    img = nib.Nifti1Image(np.ascontiguousarray(voxels, dtype=np.float32), affine)
    img.set_qform(affine, code=ALIGNED)
    img.set_sform(affine, code=ALIGNED)
    img.header.set_xyzt_units("mm")
    img.header["cal_min"], img.header["cal_max"] = geometry.low, geometry.high
    img.header["descrip"] = geometry.description().encode()
    return img


def save_nifti(img: nib.Nifti1Image, path):
    """A NIfTI image as `path` (.nii.gz), written whole (atomic_write); gzip's mtime 0, so the same image gives the
    same bytes."""
    atomic_write(path, lambda f: f.write(gzip.compress(img.to_bytes(), mtime=0)))


def read_slice(path) -> np.ndarray:
    """A file written by `slice_volume` back to the image (S, S) in [-1, 1] it was made from; any other NIfTI file
    (a volume, or a slice without the intensity range cal_min < cal_max that says what -1 and +1 were) is refused:
    its numbers cannot be put on the training images' scale."""
    img = nib.as_closest_canonical(load(path))
    low, high = float(img.header["cal_min"]), float(img.header["cal_max"])
    if len(img.shape) != 3 or min(img.shape) != 1 or not high > low:
        raise BadInputError(f"{printable(path)} ({'x'.join(map(str, img.shape))} voxels, cal_min {low:g}, cal_max "
                            f"{high:g}) is not a slice written by `sample --format nifti`, whose intensity range says "
                            "what -1 and +1 were: give other images as PNG")
    voxels = np.asarray(img.dataobj, dtype=np.float32)
    plane = voxels.squeeze(axis=int(np.argmin(voxels.shape)))   # the one slice's axis
    return ((plane.T[::-1, ::-1] - low) / (high - low)) * 2 - 1
