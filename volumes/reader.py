"""Reading one NIfTI volume (`.nii`, `.nii.gz`) into uint8 slices, for dataset.py's folders and caches.

Each volume is reoriented to RAS, clipped to intensity percentiles (non-finite voxels, such as the NaN outside
the brain of a z-scored volume, are missing and become black), cut along an axis (`Slicing`), each slice cropped
to the volume's in-plane foreground box, resampled to square pixels, padded to a square and resized. Slices
are shown as a radiologist reads them: axial with anterior at the top, coronal and sagittal with superior at
the top; the patient's right on the image's left (axial, coronal) and anterior on the left (sagittal).

Reading a volume takes at most READ_BYTES_PER_VOXEL bytes a voxel at its peak (measured with tracemalloc and
the peak RSS); `volumes_at_once` keeps the volumes decoded together within VOLUME_MEMORY_BUDGET.
"""
from __future__ import annotations

import argparse
import math
import os
import zlib
from dataclasses import dataclass
from typing import NamedTuple

import nibabel as nib
import numpy as np
import torch
import torch.nn.functional as F

from runtime.errors import BadInputError

VOLUME_SUFFIXES = (".nii", ".nii.gz")
UNREADABLE = (OSError, EOFError, ValueError, OverflowError, zlib.error, nib.filebasedimages.ImageFileError,
              nib.spatialimages.HeaderDataError, nib.orientations.OrientationError)  # what a corrupt file raises
AXES = {"sagittal": 0, "coronal": 1, "axial": 2}   # the RAS axis each kind of slice is cut across
FOREGROUND_LEVEL = 0.1    # a voxel is foreground above 10% of its volume's clipped intensity range
FOREGROUND_KEEP = 0.25    # default slices: first to last with >= 25% of the fullest slice's foreground
CROP_LEVEL = 0.02         # the foreground box: rows and columns with > 2% of the fullest one's foreground voxels
CROP_MARGIN = 0.05        # ... widened by 5% of its size on each side
CROP_MARGIN_VOXELS = 2    # ... and by at least 2 voxels
VOLUME_MEMORY_BUDGET = 4 * 2 ** 30   # bytes the volumes decoded at once may take together at their peak
READ_BYTES_PER_VOXEL = 10  # read_volume_slices' peak: float32 voxels 4, finite mask 1, the percentiles' copy 4, and 1 to spare


def printable(path) -> str:
    """A path as text that can be printed, even when its name is not valid UTF-8 (shown as \\x.. escapes)."""
    return os.fsencode(path).decode("utf-8", "backslashreplace")


def dangling(path) -> str:
    """What to say of a path that is a link to a file that is not there (a DataLad or git-annex tree whose content
    was never fetched); "" for any other path."""
    if os.path.islink(path) and not os.path.exists(path):
        return " (a link to a file that is not there: fetch the data, e.g. `datalad get`)"
    return ""


def is_volume(path) -> bool:
    return os.fsdecode(path).lower().endswith(VOLUME_SUFFIXES)


def load(path) -> nib.spatialimages.SpatialImage:
    """nib.load, also of a file named `x.Nii` or `x.Nii.gz`: nibabel looks for those as `x.nii`, which a file system
    that tells case apart does not have. Such a file is read as NIfTI-2 where its header says so (540 bytes), else 1."""
    path = os.fsdecode(path)
    stem = path[:-3] if path.lower().endswith(".gz") else path
    if stem.endswith((".nii", ".NII")) or not stem.lower().endswith(".nii"):
        return nib.load(path)
    with nib.openers.ImageOpener(path) as f:
        size = f.read(4)
    nifti2 = int.from_bytes(size, "little") == 540 or int.from_bytes(size, "big") == 540
    holder = nib.FileHolder(path)
    return (nib.Nifti2Image if nifti2 else nib.Nifti1Image).from_file_map({"image": holder, "header": holder})


@dataclass
class Slicing:
    """How NIfTI volumes become 2D slices (image folders ignore it).
    slices: None = the central slices with foreground (FOREGROUND_KEEP); a float in (0, 1] = that central
    fraction of the axis; an int >= 1 = that many central slices. volume_index: the volume of a 4D file.
    crop_foreground: crop every slice of a volume to the volume's in-plane foreground box before padding."""
    axis: str = "axial"
    slices: float | int | None = None
    volume_index: int | None = None
    percentiles: tuple[float, float] = (0.5, 99.5)
    crop_foreground: bool = True

    def __post_init__(self):
        self.percentiles = tuple(float(p) for p in self.percentiles)  # a list after a JSON round trip
        low, high = self.percentiles
        if self.axis not in AXES:
            raise BadInputError(f"--axis must be one of {', '.join(AXES)}, not {self.axis!r}")
        if self.slices is not None and (isinstance(self.slices, bool) or self.slices <= 0
                                        or (isinstance(self.slices, float) and self.slices > 1)):
            raise BadInputError(f"--slices must be a fraction in (0, 1] or a count >= 1, not {self.slices}")
        if not 0 <= low < high <= 100:
            raise BadInputError(f"--intensity-percentiles must be 0 <= LOW < HIGH <= 100, not {low},{high}")


def slice_count_or_fraction(text: str) -> float | int:
    """--slices: '20' -> 20 slices, '0.6' -> the central 60% of them."""
    value = float(text) if any(c in text for c in ".eE") else int(text)
    if value <= 0 or (isinstance(value, float) and value > 1):
        raise argparse.ArgumentTypeError(f"expected a fraction in (0, 1] or a count >= 1, got {text!r}")
    return value


def percentile_pair(text: str) -> tuple[float, float]:
    """--intensity-percentiles: '0.5,99.5' -> (0.5, 99.5)."""
    try:
        low, high = (float(v) for v in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected LOW,HIGH percentiles, got {text!r}") from None
    return low, high


def _volume_index(shape: tuple, volume_index: int | None, name: str) -> tuple:
    """The index of the one 3D volume to read from an array of `shape`. Trailing singleton dimensions beyond the
    third are dropped: (x, y, z, 1, 1) is a 3D volume, (x, y, z, n) holds n volumes (--volume-index picks one),
    and anything with more dimensions left ((x, y, z, 1, 3): vectors) is refused."""
    dims = list(shape)
    while len(dims) > 3 and dims[-1] == 1:
        dims.pop()
    if len(shape) < 3:  # a volume of one slice, (x, y, 1), is read: see load_voxels
        raise BadInputError(f"{name} is a 2D image {tuple(shape)}, not a volume")
    if len(dims) > 4:
        raise BadInputError(f"{name} has {len(dims)} dimensions {tuple(shape)}; only 3D and 4D volumes are read")
    count = dims[3] if len(dims) == 4 else 1
    if count > 1 and volume_index is None:
        raise BadInputError(f"{name} is 4D ({count} volumes): pick one with --volume-index N")
    index = volume_index or 0
    if not 0 <= index < count:
        raise BadInputError(f"{name} has {count} volume{'s' * (count > 1)}, so no --volume-index {index}")
    return (slice(None),) * 3 + tuple(index if k == 3 else 0 for k in range(3, len(shape)))


def load_voxels(path: str, volume_index: int | None, axis: int) -> tuple[np.ndarray, np.ndarray]:
    """(voxels (N, U, V) float32 in RAS order with RAS axis `axis` first, C-contiguous; voxel spacing in mm along
    x, y, z). The stored integers are scaled by the header's slope and intercept in float32, where nibabel would
    scale them in float64 (twice the memory), and reoriented as views before the one float32 copy."""
    img = load(path)
    proxy = img.dataobj
    if proxy.dtype.fields is not None:   # RGB24 and the like: a colour map (DTI's FA in colour), not intensities
        raise BadInputError(f"{printable(path)} stores {proxy.dtype.names} per voxel, a colour image, not a grey-level "
                            "volume")
    if proxy.dtype.kind == "c":   # complex: an MR signal before its magnitude was taken
        raise BadInputError(f"{printable(path)} stores complex numbers ({proxy.dtype}), not a grey-level volume: take "
                            "their magnitude first")
    index = _volume_index(img.shape, volume_index, printable(path))
    unscaled = nib.arrayproxy.ArrayProxy(proxy.file_like, (proxy.shape, proxy.dtype, proxy.offset), order=proxy.order)
    raw = unscaled[index]                                               # the stored numbers of one volume only
    ornt = nib.io_orientation(img.affine)                              # stored axes -> closest RAS axes
    raw = np.moveaxis(nib.apply_orientation(raw, ornt), axis, 0)        # views: (N, U, V), U, V in RAS order
    if min(raw.shape[1:]) == 1:  # one slice (a sample written by volumes/writer.py) is read across its own plane only
        raise BadInputError(f"{printable(path)} is a 2D image {tuple(img.shape)} in another plane than the "
                            f"{('sagittal', 'coronal', 'axial')[axis]} one, not a volume")
    voxels = raw.astype(np.float32, order="C")
    del raw
    if proxy.slope != 1:
        voxels *= np.float32(proxy.slope)
    if proxy.inter != 0:
        voxels += np.float32(proxy.inter)
    affine = img.affine @ nib.orientations.inv_ornt_aff(ornt, img.shape[:3])  # the RAS-ordered voxels' affine
    return voxels, np.sqrt((affine[:3, :3] ** 2).sum(0))


def slice_span(foreground: np.ndarray, slices) -> range:
    """The slices along the cut axis that `slices` (see Slicing) chooses, from the foreground voxels of each slice;
    empty when nothing is foreground."""
    n = len(foreground)
    if slices is None:
        if foreground.max() == 0:
            return range(0)
        keep = np.flatnonzero(foreground >= FOREGROUND_KEEP * foreground.max())
        return range(int(keep[0]), int(keep[-1]) + 1)
    count = min(n, slices) if isinstance(slices, int) else max(1, round(slices * n))
    return range((n - count) // 2, (n - count) // 2 + count)


def foreground_box(per_u: np.ndarray, per_v: np.ndarray) -> tuple[slice, slice]:
    """The in-plane (U, V) bounding box of a volume's foreground, from its count of foreground voxels at each U and
    at each V (the mask projected on each in-plane axis): the range above CROP_LEVEL of the peak, so that a few
    stray voxels do not widen it, plus a margin of CROP_MARGIN of the box (at least CROP_MARGIN_VOXELS) each side."""
    box = []
    for profile in (per_u, per_v):
        keep = np.flatnonzero(profile > CROP_LEVEL * profile.max())
        start, stop = int(keep[0]), int(keep[-1]) + 1
        margin = max(CROP_MARGIN_VOXELS, round(CROP_MARGIN * (stop - start)))
        box.append(slice(max(0, start - margin), min(len(profile), stop + margin)))
    return box[0], box[1]


class Volume(NamedTuple):
    """A volume read once, before its slices are resized (see read_volume)."""
    voxels: np.ndarray          # (N, U, V) float32, the cut axis first, non-finite voxels set to `low`
    spacing: np.ndarray         # mm per voxel along x, y, z
    span: range                 # the chosen slices along N
    box: tuple[slice, slice]    # the in-plane crop (U, V): the foreground's box, or everything
    low: float                  # the intensity percentiles, clipped to black and white
    high: float


def read_volume(path, slicing: Slicing) -> Volume:
    """A NIfTI volume read once (see Volume); an unreadable or empty volume's BadInputError names it.

    Non-finite voxels (NaN outside the brain of a z-scored volume) are missing: the percentiles are taken over
    the others, and the missing ones get the low end, black."""
    name = printable(path)
    try:
        voxels, spacing = load_voxels(os.fsdecode(path), slicing.volume_index, AXES[slicing.axis])
    except UNREADABLE as e:
        message = (str(e).splitlines() or [type(e).__name__])[0]
        raise BadInputError(f"cannot read volume {name}: {message}{dangling(path)}") from None
    finite = np.isfinite(voxels)
    missing = not finite.all()
    present = voxels[finite] if missing else voxels                    # a copy only where voxels are missing
    if not present.size:
        raise BadInputError(f"volume {name} has no foreground (no finite intensities)")
    # np.percentile partitions a copy of its input, unless told that the input is a copy already; python floats
    # keep the arithmetic below in float32
    low, high = (float(p) for p in np.percentile(present, slicing.percentiles, overwrite_input=missing))
    del present
    if missing:
        voxels[~finite] = low
    del finite
    foreground = voxels > low + FOREGROUND_LEVEL * (high - low)        # (N, U, V)
    per_slice, per_u, per_v = (foreground.sum(axis=tuple(a for a in range(3) if a != k)) for k in range(3))
    del foreground
    span = slice_span(per_slice, slicing.slices)
    if not high > low or not span:
        raise BadInputError(f"volume {name} has no foreground (its intensities are constant)")
    box = foreground_box(per_u, per_v) if slicing.crop_foreground else (slice(None), slice(None))
    return Volume(voxels, spacing, span, box, low, high)


def volume_span(path, slicing: Slicing, skip_bad: bool = False) -> range:
    """The slices a volume gives (none when unreadable and skip_bad)."""
    try:
        return read_volume(path, slicing).span
    except BadInputError:
        if not skip_bad:
            raise
        return range(0)


def read_volume_slices(path, image_size: int, channels: int = 1, slicing: Slicing = Slicing()
                       ) -> tuple[torch.Tensor, range]:
    """One NIfTI volume as uint8 slices (n, C, S, S) and which slices along the RAS axis they are.

    The volume is read once: reoriented to RAS, clipped to its intensity percentiles and scaled to 0-255;
    the chosen slices are cropped to the volume's foreground box (Slicing.crop_foreground), resampled to
    square pixels (voxel spacing kept), padded to a square with black and resized to S (one antialiased
    resize). Orientation: see the module docstring.
    """
    volume = read_volume(path, slicing)
    planes = _scaled(volume, volume.span)
    images, _ = _as_images(planes, volume, slicing.axis, image_size)
    return (images * 255).round_().clamp_(0, 255).to(torch.uint8).expand(-1, channels, -1, -1), volume.span


def _scaled(volume: Volume, span: range) -> torch.Tensor:
    """The planes `span` of a volume, cropped to its box and scaled by its percentiles to [0, 1]: (n, U, V)."""
    along_u, along_v = volume.box
    planes = volume.voxels[span.start:span.stop, along_u, along_v]  # a view: scaled in place
    planes -= volume.low
    planes *= 1 / (volume.high - volume.low)
    return torch.from_numpy(np.clip(planes, 0, 1, out=planes))


class SliceGeometry(NamedTuple):
    """Where an image made of one slice sits in its volume: enough to put a map of that image back (`to_volume`)."""
    path: str
    axis: str
    index: int                  # the slice along the RAS axis
    box: tuple[slice, slice]    # its in-plane crop (U, V)
    plane: tuple[int, int]      # the cropped plane's rows and columns as shown (V, U)
    placed: tuple[int, int, int, int]  # top, left, height, width of the plane in the square image


def _as_images(planes: torch.Tensor, volume: Volume, axis: str, image_size: int) -> tuple[torch.Tensor, tuple]:
    """Planes (n, U, V) in [0, 1] -> float images (n, 1, S, S) as shown (see the module docstring), and where the plane
    sits in them (top, left, height, width)."""
    planes = planes.transpose(1, 2).flip(1, 2)                         # (n, V, U): rows from S or A, columns from R or A
    du, dv = np.delete(volume.spacing, AXES[axis])
    scale = image_size / max(planes.shape[1] * dv, planes.shape[2] * du)  # pixels per mm
    h, w = (max(1, min(image_size, round(k * d * scale))) for k, d in ((planes.shape[1], dv), (planes.shape[2], du)))
    planes = F.interpolate(planes[:, None], size=(h, w), mode="bilinear", antialias=True, align_corners=False)
    top, left = (image_size - h) // 2, (image_size - w) // 2
    return F.pad(planes, (left, image_size - w - left, top, image_size - h - top)), (top, left, h, w)


def read_volume_slice(path, image_size: int, slicing: Slicing, index: int | None = None
                      ) -> tuple[torch.Tensor, SliceGeometry]:
    """One slice of a volume as the run's training slices are read (float (1, S, S) in [0, 1]), and its geometry.
    index: the slice along the RAS axis (default: the middle of the slices the run would take)."""
    volume = read_volume(path, slicing)
    n = len(volume.voxels)
    index = (volume.span.start + volume.span.stop) // 2 if index is None else index
    if not 0 <= index < n:
        raise BadInputError(f"--slice {index}: {printable(path)} has {n} {slicing.axis} slices (0-{n - 1})")
    planes = _scaled(volume, range(index, index + 1))
    shown = tuple(planes.shape[1:][::-1])
    images, placed = _as_images(planes, volume, slicing.axis, image_size)
    return images[0], SliceGeometry(os.fsdecode(path), slicing.axis, index, volume.box, shown, placed)


def to_volume(image: torch.Tensor, geometry: SliceGeometry) -> nib.Nifti1Image:
    """A map of an image made of one slice (S, S), put back into that slice of its volume: a NIfTI image of the input
    volume's shape (its first 3 dimensions) and affine, zero elsewhere. The padding is cut off, the plane resized
    back to its voxels (bilinear), flipped and transposed back, and the RAS reorientation undone."""
    img = load(geometry.path)
    top, left, h, w = geometry.placed
    plane = F.interpolate(image[None, None, top:top + h, left:left + w].float(), size=geometry.plane, mode="bilinear",
                          align_corners=False)[0, 0]
    plane = plane.flip(0, 1).transpose(0, 1).numpy()                   # (U, V) as cropped
    ornt = nib.io_orientation(img.affine)
    shape = nib.apply_orientation(np.empty(img.shape[:3], dtype=np.uint8), ornt).shape  # the RAS-ordered shape
    ras = np.zeros(shape, dtype=np.float32)
    cut = np.moveaxis(ras, AXES[geometry.axis], 0)                     # a view: (N, U, V)
    cut[geometry.index][geometry.box] = plane
    stored = nib.apply_orientation(ras, nib.orientations.ornt_transform(nib.orientations.axcodes2ornt("RAS"), ornt))
    return nib.Nifti1Image(np.ascontiguousarray(stored), img.affine)


def mask_slice(path, geometry: SliceGeometry, image_size: int) -> torch.Tensor:
    """A NIfTI mask of the input volume's grid, cut and placed as that volume's slice was: (S, S) of 0 and 1."""
    voxels, _ = load_voxels(os.fsdecode(path), None, AXES[geometry.axis])
    source = load(geometry.path)
    expected = nib.apply_orientation(np.empty(source.shape[:3], dtype=np.uint8), nib.io_orientation(source.affine))
    if voxels.shape != np.moveaxis(expected, AXES[geometry.axis], 0).shape:
        raise BadInputError(f"mask {printable(path)} has another grid than {printable(geometry.path)}")
    plane = torch.from_numpy(np.nan_to_num(voxels[geometry.index][geometry.box]) > 0.5).float()
    plane = plane.transpose(0, 1).flip(0, 1)
    top, left, h, w = geometry.placed
    plane = F.interpolate(plane[None, None], size=(h, w), mode="nearest")[0, 0]
    return F.pad(plane, (left, image_size - w - left, top, image_size - h - top))


def _header(path):
    """The NIfTI image of `path` with only its header read; None if unreadable (reported when it is decoded)."""
    try:
        return load(path)
    except UNREADABLE:
        return None


def unoriented(path) -> bool:
    """Whether a volume's header says nothing of its orientation (qform and sform codes 0, as in files converted from
    ANALYZE): nibabel then reads its voxels as LAS, ANALYZE's radiological convention, which mirrors left and right
    against a volume stored RAS whose header says so. False where unreadable (reported when it is decoded)."""
    img = _header(path)
    return img is not None and all(img.header.get(code, 1) == 0 for code in ("qform_code", "sform_code"))


def volume_slice_bound(path, slicing: Slicing) -> int:
    """At most how many slices a volume gives, from its header alone (0 if unreadable)."""
    img = _header(path)
    if img is None or len(img.shape) < 3:  # a 2D image: refused when it is decoded
        return 0
    stored = np.flatnonzero(nib.io_orientation(img.affine)[:, 0] == AXES[slicing.axis])  # the stored axis cut across
    if not len(stored):
        return 0
    n = int(img.shape[stored[0]])
    return min(n, slicing.slices) if isinstance(slicing.slices, int) else n


def volume_peak_bytes(path) -> int:
    """The memory reading one volume of `path` takes at its peak, from its header (0 if unreadable): the float32
    voxels with the raw ones beside them, or READ_BYTES_PER_VOXEL, whichever is more."""
    img = _header(path)
    if img is None:
        return 0
    return math.prod(img.shape[:3]) * max(READ_BYTES_PER_VOXEL, 4 + img.get_data_dtype().itemsize)


def volumes_at_once(paths: list, workers: int) -> int:
    """How many volumes to decode at once: `workers`, fewer where the largest volume's peak times that many would
    pass VOLUME_MEMORY_BUDGET, and at least one."""
    largest = max((volume_peak_bytes(p) for p in paths), default=0)
    return max(1, min(workers, VOLUME_MEMORY_BUDGET // max(largest, 1)))
