"""Data: the ADNI-layout image loader, the subject-level split, a run's training set in batches, and the
embedded MNI152 demo dataset.

The loader is the original report's: the `train` and `test` ImageFolders of an ADNI folder
(`ROOT/{train,test}/{AD,NC}/*.jpeg`) concatenated, each image Resize((256, 256)) -> ToTensor ->
Normalize(0.5, 0.5), so values lie in [-1, 1]. Grayscale by default; `channels=3` loads RGB as the
report did. A folder with class subfolders and no train/test level works too.

NIfTI volumes (`.nii`, `.nii.gz`) are read through the same folders, caches and subject split: the same
layouts with volumes in place of images, or a BIDS tree `ROOT/sub-*/[ses-*/]anat/*_T1w.nii[.gz]` (one
class, "all"). Each volume is reoriented to RAS, clipped to intensity percentiles, cut along an axis
(`Slicing`), each slice resampled to square pixels, padded to a square and resized; one volume is one
subject (its BIDS `sub-XX` where it has one). Slices are shown as a radiologist reads them: axial with
anterior at the top, coronal and sagittal with superior at the top; the patient's right on the image's
left (axial, coronal) and anterior on the left (sagittal).

Build the demo data by hand with `python dataset.py --out DIR` (training does it on first use).
"""
from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import math
import os
import re
import shutil
import zlib
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from functools import partial
from pathlib import Path

import nibabel as nib
import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch.utils.data import ConcatDataset, DataLoader, Dataset, DistributedSampler, Subset
from torchvision import datasets, transforms

from runtime.errors import BadInputError

DEMO_VERSION = 2                  # bump when the demo generator changes, so old caches are not reused
DEFAULT_DEMO_ROOT = Path.home() / ".cache" / "brain-ldm"
VOLUME_SUFFIXES = (".nii", ".nii.gz")
AXES = {"sagittal": 0, "coronal": 1, "axial": 2}   # the RAS axis each kind of slice is cut across
FOREGROUND_LEVEL = 0.1    # a voxel is foreground above 10% of its volume's clipped intensity range
FOREGROUND_KEEP = 0.25    # default slices: first to last with >= 25% of the fullest slice's foreground


# ----------------------------------------------------------------------------- loading images

def printable(path) -> str:
    """A path as text that can be printed, even when its name is not valid UTF-8 (shown as \\x.. escapes)."""
    return os.fsencode(path).decode("utf-8", "backslashreplace")


def load_image(path: str, mode: str) -> Image.Image:
    """Open an image and convert it to `mode` ("L" or "RGB"); a file PIL cannot decode is named.

    16-bit and float images (MRI exports often use 12 of the 16 bits) are scaled by their own maximum
    to 0-255, where PIL would clip them to white; transparent pixels (RGBA, LA, palette with
    transparency) are laid on black, the background of a slice.
    """
    try:
        with Image.open(path) as img:
            if img.mode.startswith("I") or img.mode == "F":
                a = np.asarray(img, dtype=np.float64).clip(0, None)
                img = Image.fromarray((a * (255.0 / a.max()) if a.max() > 0 else a).round().astype(np.uint8))
            elif img.mode in ("RGBA", "LA", "PA") or "transparency" in img.info:
                img = Image.alpha_composite(Image.new("RGBA", img.size, (0, 0, 0, 255)), img.convert("RGBA"))
            return img.convert(mode)
    except (OSError, ValueError, Image.DecompressionBombError) as e:
        raise BadInputError(f"cannot read image {printable(path)}: {e}") from None


def card_transform(image_size: int, channels: int) -> transforms.Compose:
    """The report's transform: Resize((S, S)) -> ToTensor -> Normalize(0.5, 0.5), values in [-1, 1]."""
    return transforms.Compose([
        transforms.Resize((image_size, image_size)),
        transforms.ToTensor(),
        transforms.Normalize([0.5] * channels, [0.5] * channels),
    ])


# ----------------------------------------------------------------------------- slicing volumes

@dataclass
class Slicing:
    """How NIfTI volumes become 2D slices (image folders ignore it).
    slices: None = the central slices with foreground (FOREGROUND_KEEP); a float in (0, 1] = that central
    fraction of the axis; an int >= 1 = that many central slices. volume_index: the volume of a 4D file."""
    axis: str = "axial"
    slices: float | int | None = None
    volume_index: int | None = None
    percentiles: tuple[float, float] = (0.5, 99.5)

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


def is_volume(path) -> bool:
    return os.fsdecode(path).lower().endswith(VOLUME_SUFFIXES)


def _open_volume(path: str, volume_index: int | None):
    """The 3D image of a NIfTI file in its closest canonical (RAS) orientation; 4D files need volume_index."""
    name = printable(path)
    img = nib.load(path)
    spatial = [n for n in img.shape[:3] if n > 1]
    if len(spatial) < 3:
        raise BadInputError(f"{name} is a 2D image {tuple(img.shape)}, not a volume")
    if len(img.shape) > 4:
        raise BadInputError(f"{name} has {len(img.shape)} dimensions {tuple(img.shape)}; only 3D and 4D volumes are read")
    if len(img.shape) == 4:
        if img.shape[3] > 1 and volume_index is None:
            raise BadInputError(f"{name} is 4D ({img.shape[3]} volumes): pick one with --volume-index N")
        index = volume_index or 0
        if not 0 <= index < img.shape[3]:
            raise BadInputError(f"{name} has {img.shape[3]} volumes, so no --volume-index {index}")
        img = img.slicer[..., index]
    return nib.as_closest_canonical(img)


def _slice_span(volume: np.ndarray, slices, threshold: float) -> range:
    """The slices along axis 0 that `slices` (see Slicing) chooses; empty when nothing is foreground."""
    n = volume.shape[0]
    if slices is None:
        foreground = (volume > threshold).mean(axis=(1, 2))
        if foreground.max() == 0:
            return range(0)
        keep = np.flatnonzero(foreground >= FOREGROUND_KEEP * foreground.max())
        return range(int(keep[0]), int(keep[-1]) + 1)
    count = min(n, slices) if isinstance(slices, int) else max(1, round(slices * n))
    return range((n - count) // 2, (n - count) // 2 + count)


def _read_volume(path, slicing: Slicing) -> tuple[np.ndarray, np.ndarray, range, float, float]:
    """(volume (N, U, V) with the cut axis first, voxel spacing in mm along x, y, z, the chosen slices, the
    intensity percentiles low, high), read once; an unreadable or empty volume's BadInputError names it."""
    name = printable(path)
    try:
        img = _open_volume(os.fsdecode(path), slicing.volume_index)
        volume = np.nan_to_num(np.asarray(img.dataobj, dtype=np.float32))
    except (OSError, EOFError, ValueError, zlib.error, nib.filebasedimages.ImageFileError) as e:
        message = (str(e).splitlines() or [type(e).__name__])[0]
        raise BadInputError(f"cannot read volume {name}: {message}") from None
    spacing = np.sqrt((img.affine[:3, :3] ** 2).sum(0))              # mm per voxel along x, y, z
    low, high = (float(p) for p in np.percentile(volume, slicing.percentiles))  # python floats: stay float32
    volume = np.moveaxis(volume, AXES[slicing.axis], 0)                # (N, U, V): U, V in RAS order
    span = _slice_span(volume, slicing.slices, low + FOREGROUND_LEVEL * (high - low))
    if not high > low or not span:
        raise BadInputError(f"volume {name} has no foreground (its intensities are constant)")
    return volume, spacing, span, low, high


def _volume_span(path, slicing: Slicing, skip_bad: bool = False) -> range:
    """The slices a volume gives (none when unreadable and skip_bad)."""
    try:
        return _read_volume(path, slicing)[2]
    except BadInputError:
        if not skip_bad:
            raise
        return range(0)


def read_volume_slices(path, image_size: int, channels: int = 1, slicing: Slicing = Slicing()
                       ) -> tuple[torch.Tensor, range]:
    """One NIfTI volume as uint8 slices (n, C, S, S) and which slices along the RAS axis they are.

    The volume is read once: reoriented to RAS, clipped to its intensity percentiles and scaled to 0-255;
    the chosen slices are resampled to square pixels (voxel spacing kept), padded to a square with black
    and resized to S (one antialiased resize). Orientation: see the module docstring.
    """
    volume, spacing, span, low, high = _read_volume(path, slicing)
    planes = torch.from_numpy(np.clip((volume[span.start:span.stop] - low) / (high - low), 0, 1))
    planes = planes.transpose(1, 2).flip(1, 2)                         # (n, V, U): rows from S or A, columns from R or A
    axis = AXES[slicing.axis]
    du, dv = np.delete(spacing, axis)
    scale = image_size / max(planes.shape[1] * dv, planes.shape[2] * du)  # pixels per mm
    h, w = (max(1, min(image_size, round(k * d * scale))) for k, d in ((planes.shape[1], dv), (planes.shape[2], du)))
    planes = F.interpolate(planes[:, None], size=(h, w), mode="bilinear", antialias=True, align_corners=False)
    top, left = (image_size - h) // 2, (image_size - w) // 2
    planes = F.pad(planes, (left, image_size - w - left, top, image_size - h - top))
    return (planes * 255).round_().clamp_(0, 255).to(torch.uint8).expand(-1, channels, -1, -1), span


def volume_slice_bound(path, slicing: Slicing) -> int:
    """At most how many slices a volume gives, from its header alone (0 if unreadable: reported when decoded)."""
    try:
        img = nib.load(os.fsdecode(path))
        ornt = nib.io_orientation(img.affine)
        n = int(img.shape[int(np.flatnonzero(ornt[:, 0] == AXES[slicing.axis])[0])])
    except (OSError, EOFError, ValueError, IndexError, zlib.error, nib.filebasedimages.ImageFileError):
        return 0
    return min(n, slicing.slices) if isinstance(slicing.slices, int) else n


def find_image_roots(root: Path) -> list[Path]:
    """The ImageFolder roots under `root`: its train/ and test/ if present, else root itself."""
    if not root.is_dir():
        raise BadInputError(f"data folder {root} does not exist")
    split_roots = [root / s for s in ("train", "test") if (root / s).is_dir()]
    return split_roots or [root]


def _walk(top: str):
    """The files under `top`, sorted, without hidden files and folders; a symbolic link to a folder is followed
    only once, so a link loop does not list the same files again and again."""
    visited = set()
    for folder, subfolders, files in os.walk(top, followlinks=True):
        st = os.stat(folder)
        if (st.st_dev, st.st_ino) in visited:  # reached again through a link: already listed
            subfolders[:] = []
            continue
        visited.add((st.st_dev, st.st_ino))
        subfolders[:] = sorted(d for d in subfolders if not d.startswith("."))
        yield from (os.path.join(folder, f) for f in sorted(files) if not f.startswith("."))


def _is_bids_t1w(relative: str) -> bool:
    """sub-*/[ses-*/]anat/*_T1w.nii[.gz], relative to a BIDS root."""
    parts = Path(relative).parts
    return (parts[0].startswith("sub-") and len(parts) in (3, 4) and parts[-2] == "anat"
            and (len(parts) == 3 or parts[1].startswith("ses-")) and parts[-1].endswith(("_T1w.nii", "_T1w.nii.gz")))


class _ImageFolder(datasets.ImageFolder):
    """ImageFolder of images or NIfTI volumes (`kind`, never both) that ignores hidden files and folders
    (.DS_Store, .ipynb_checkpoints ...) and follows a symbolic link to a folder only once. A BIDS root
    (sub-* folders) is one class, "all", of its T1w volumes."""

    def find_classes(self, directory):
        folders = sorted(e.name for e in os.scandir(directory) if e.is_dir() and not e.name.startswith("."))
        self.bids = any(name.startswith("sub-") for name in folders)
        classes = ["all"] if self.bids else folders
        if not classes:
            raise FileNotFoundError(f"no class folders in {printable(directory)}")
        return classes, {name: i for i, name in enumerate(classes)}

    def make_dataset(self, directory, class_to_idx, extensions=None, is_valid_file=None, allow_empty=False):
        samples, suffixes = [], tuple(datasets.folder.IMG_EXTENSIONS) + VOLUME_SUFFIXES
        for name, label in sorted(class_to_idx.items()):
            top = directory if self.bids else os.path.join(directory, name)
            files = [f for f in _walk(top) if f.lower().endswith(suffixes)]
            if self.bids:
                files = [f for f in files if _is_bids_t1w(os.path.relpath(f, directory))]
            samples += [(f, label) for f in files]
        if not samples:
            raise FileNotFoundError(f"no image files ({', '.join(suffixes)}) in the class folders of {printable(directory)}")
        volumes = [p for p, _ in samples if is_volume(p)]
        if 0 < len(volumes) < len(samples):
            image = next(p for p, _ in samples if not is_volume(p))
            raise BadInputError(f"{printable(directory)} mixes images ({printable(image)}) and NIfTI volumes "
                                f"({printable(volumes[0])}): keep one kind per data folder")
        self.kind = "volumes" if volumes else "images"
        return samples


class SliceFolders(ConcatDataset):
    """The ImageFolders of `find_image_roots` concatenated (the report's loader), with class names and paths.
    A folder of NIfTI volumes lists one sample per volume (`volumes` is True) and is read whole, by
    InMemorySlices, never item by item."""

    def __init__(self, root: str | os.PathLike, image_size: int, channels: int, transform=None,
                 slicing: Slicing | None = None):
        if channels not in (1, 3):
            raise BadInputError(f"--channels must be 1 or 3, not {channels}")
        mode = "L" if channels == 1 else "RGB"
        transform = transform if transform is not None else card_transform(image_size, channels)
        folders = []
        for r in find_image_roots(Path(root)):
            try:
                folders.append(_ImageFolder(str(r), transform=transform,
                                            loader=partial(load_image, mode=mode)))  # picklable for workers
            except (FileNotFoundError, RuntimeError) as e:  # torchvision: no class folders / no images
                raise BadInputError(f"no images found under {r} ({str(e).splitlines()[0]})") from None
        classes = folders[0].classes
        for f in folders[1:]:
            if f.classes != classes:
                raise BadInputError(f"class folders differ between {folders[0].root} {classes} and {f.root} {f.classes}")
            if f.kind != folders[0].kind:
                raise BadInputError(f"{folders[0].root} holds {folders[0].kind} but {f.root} holds {f.kind}: keep one kind")
        super().__init__(folders)
        self.classes = classes
        self.samples = [s for f in folders for s in f.samples]  # [(path, label)] in dataset order
        self.volumes = folders[0].kind == "volumes"
        self.slicing = slicing or Slicing()

    def __getitem__(self, i):
        if self.volumes:
            raise TypeError("a folder of NIfTI volumes is read whole: use load_slices or InMemorySlices")
        return super().__getitem__(i)


class InMemorySlices(Dataset):
    """The same images decoded and resized once, kept as uint8 (N, C, S, S); items equal SliceFolders'.

    ToTensor + Normalize(0.5, 0.5) of a uint8 pixel v is exactly v / 127.5 - 1, applied per item (or
    per batch by the training loop, after the uint8 batch reached the GPU). Decoding uses threads (PIL
    releases the GIL while decoding and resizing). With `cache_file` the array lives on disk as a .npy
    memory map, for sets larger than memory: decoded once, then reused while the files are unchanged.
    A folder of volumes: each volume is decoded once and its slices fanned out; `samples` then holds
    (volume path, label) once per slice and `slice_numbers` which slice of its volume each is. Rows are
    reserved for as many slices as the headers allow; the unused ones are never touched (no memory, and
    holes in the sparse cache file).
    """

    def __init__(self, folders: SliceFolders, image_size: int, channels: int, workers: int = 4,
                 cache_file: Path | None = None, skip_bad: bool = False):
        self.classes, self.samples, self.cache_file = folders.classes, folders.samples, cache_file
        units = self.samples  # what is decoded: images, or volumes that each give several slices
        if folders.volumes:
            slicing = folders.slicing
            shape = (sum(volume_slice_bound(p, slicing) for p, _ in units), channels, image_size, image_size)
            fill = partial(self._decode_volumes_into, slicing=slicing, workers=workers, skip_bad=skip_bad)
            key = {"slicing": asdict(slicing)}
        else:
            shape = (len(units), channels, image_size, image_size)
            fill = partial(self._decode_into, image_size=image_size, channels=channels, workers=workers, skip_bad=skip_bad)
            key = {}
        if cache_file is None:
            images = torch.empty(shape, dtype=torch.uint8)
            done = fill(images)
        else:
            images, done = self._disk_cache(Path(cache_file), shape, fill, key, skip_bad)
        bad = done["bad"]
        self.skipped = [units[i][0] for i in bad]
        unreadable = set(bad)
        if folders.volumes:  # (path, label) once per slice, and which slice of its volume each is
            spans = [range(*s) for s in done["spans"]]
            self.samples = [units[v] for v, span in enumerate(spans) for _ in span]
            self.slice_numbers = [k for span in spans for k in span]
        else:  # _decode_into moved the good images to the front
            self.samples = [units[i] for i in range(len(units)) if i not in unreadable]
            self.slice_numbers = None
        images = images[:len(self.samples)]
        if bad:
            kind = "volume" if folders.volumes else "image"
            names = ", ".join(printable(p) for p in self.skipped[:3]) + (" ..." if len(bad) > 3 else "")
            print(f"--skip-bad-images: left out {len(bad)} unreadable {kind}(s) of {len(units)}: {names}")
            if len(bad) == len(units):
                raise BadInputError(f"none of the {len(units)} {kind}s could be read, e.g. {printable(self.skipped[0])}")
        self.images = images
        self.labels = torch.tensor([label for _, label in self.samples])

    def _decode_into(self, images: torch.Tensor, image_size: int, channels: int, workers: int,
                     skip_bad: bool) -> dict:
        """Decode every image into `images`, in order; with skip_bad the unreadable ones are left out (the rest
        move up) and their indices returned as {"bad": [...]}, else the first one stops it with its name."""
        mode = "L" if channels == 1 else "RGB"
        resize = transforms.Compose([transforms.Resize((image_size, image_size)), transforms.PILToTensor()])

        def decode(sample):
            try:
                return resize(load_image(sample[0], mode))
            except BadInputError:
                if not skip_bad:
                    raise
                return None

        bad = []
        with ThreadPoolExecutor(max(1, workers)) as pool:
            for i, img in enumerate(pool.map(decode, self.samples)):
                if img is None:
                    bad.append(i)
                else:
                    images[i - len(bad)] = img
        return {"bad": bad}

    def _decode_volumes_into(self, images: torch.Tensor, slicing: Slicing, workers: int, skip_bad: bool) -> dict:
        """Decode every volume once and fan its slices out into `images`, in order: {"bad": indices of the
        unreadable volumes (skip_bad; else the first stops it), "spans": [start, stop) of each one's slices}."""
        def decode(sample):
            try:
                return read_volume_slices(sample[0], images.shape[2], images.shape[1], slicing)
            except BadInputError:
                if not skip_bad:
                    raise
                return None

        bad, spans, n = [], [], 0
        with ThreadPoolExecutor(max(1, workers)) as pool:
            for i, result in enumerate(pool.map(decode, self.samples)):
                if result is None:
                    bad.append(i)
                    spans.append([0, 0])
                    continue
                slices, span = result
                if n + len(slices) > len(images):  # the header promised fewer slices than the data holds
                    raise BadInputError(f"volume {printable(self.samples[i][0])} changed while it was read")
                images[n:n + len(slices)] = slices
                n += len(slices)
                spans.append([span.start, span.stop])
        return {"bad": bad, "spans": spans}

    def _disk_cache(self, path: Path, shape: tuple, fill, key: dict, skip_bad: bool) -> tuple[torch.Tensor, dict]:
        """The uint8 array as a memory-mapped .npy next to a key of the files it holds (paths, sizes, mtimes) and
        of how they were read (`key`: the slicing of volumes), with what `fill` reported (unreadable files ...).
        Volumes reserve the slices their headers allow; the rows left unwritten stay holes in a sparse file."""
        key_path = path.with_suffix(".json")
        key = json.loads(json.dumps({"shape": shape, "files": files_fingerprint(self.samples), **key}))  # as saved: lists
        saved = json.loads(key_path.read_text()) if path.exists() and key_path.exists() else {}
        if {k: saved.get(k) for k in key} == key and (skip_bad or not saved.get("bad")):
            print(f"image cache {path}: {shape[0]} images reused")
            done = saved
        else:
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_name(f".{path.name}.tmp{os.getpid()}.npy")
            try:
                array = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.uint8, shape=shape)
                done = fill(torch.from_numpy(array))
                array.flush()
                del array
                os.replace(tmp, path)
            finally:
                tmp.unlink(missing_ok=True)
            key_path.write_text(json.dumps({**key, **done}))
            print(f"image cache {path}: {shape[0]} images decoded once ({math.prod(shape) / 2 ** 30:.2f} GB on disk)")
        return torch.from_numpy(np.load(path, mmap_mode="c")), done  # copy-on-write map: pages read on demand

    def __len__(self):
        return len(self.samples)

    def __getitem__(self, i):
        return self.images[i].float() / 127.5 - 1.0, int(self.labels[i])


def files_fingerprint(samples: list[tuple[str, int]]) -> str:
    """A hash of the files' names, sizes and modification times: a cache built from them is stale when it changes."""
    key = hashlib.sha1()
    for p, _ in samples:
        st = os.stat(p)
        key.update(os.fsencode(p) + f"|{st.st_size}|{st.st_mtime_ns}\n".encode())
    return key.hexdigest()


def uint8_images(dataset) -> tuple[torch.Tensor, torch.Tensor | None, bool]:
    """(uint8 images, index map or None, whether memory-mapped from disk) of an InMemorySlices or a Subset of one."""
    if isinstance(dataset, Subset):
        images, _, on_disk = uint8_images(dataset.dataset)
        return images, torch.as_tensor(dataset.indices), on_disk
    if not isinstance(dataset, InMemorySlices):
        raise TypeError(f"expected images decoded once (InMemorySlices), got {type(dataset).__name__}")
    return dataset.images, None, dataset.cache_file is not None


def load_slices(root, image_size: int = 256, channels: int = 1, cache_gb: float = 8.0, workers: int = 4,
                disk_cache: Path | None = None, build_guard=contextlib.nullcontext, skip_bad: bool = False,
                slicing: Slicing | None = None):
    """The training dataset, decoded once as uint8: in memory when it fits in `cache_gb`, else in a
    memory-mapped file under `disk_cache` (built inside `build_guard`, e.g. by one process of many),
    else, without `disk_cache`, decoded per item (where an unreadable image stops it even with skip_bad;
    volumes, which are read whole, are then decoded into memory all the same).
    skip_bad: leave out unreadable images or volumes (InMemorySlices.skipped) instead of stopping at the first.
    slicing: how NIfTI volumes are cut into slices (default Slicing()); images ignore it."""
    folders = SliceFolders(root, image_size, channels, slicing=slicing)
    n = sum(volume_slice_bound(p, folders.slicing) for p, _ in folders.samples) if folders.volumes else len(folders)
    if n * channels * image_size ** 2 <= cache_gb * 2 ** 30 or (folders.volumes and disk_cache is None):
        return InMemorySlices(folders, image_size, channels, workers, skip_bad=skip_bad)
    if disk_cache is not None:
        with build_guard():
            return InMemorySlices(folders, image_size, channels, workers, skip_bad=skip_bad,
                                  cache_file=Path(disk_cache) / f"images-{image_size}px-{channels}ch.npy")
    return folders


# ----------------------------------------------------------------------------- subject-level split

_SUBJECT_SLICE = re.compile(r"^(?P<subject>.+)_(?P<slice>\d+)$")


def subject_id(path: str) -> str:
    """`<subject>_<slice>.jpeg` -> subject; a name that does not parse is a subject of its own. A NIfTI volume
    is one subject: its BIDS `sub-<label>` (`sub-01_ses-2_T1w.nii.gz` -> sub-01, so sessions stay together),
    else the volume itself."""
    if is_volume(path):
        m = re.match(r"sub-[A-Za-z0-9]+", Path(path).name)
        return m.group(0) if m else str(path)
    m = _SUBJECT_SLICE.match(Path(path).stem)
    return m.group("subject") if m else str(path)


def split_by_subject(paths: list[str], holdout: float, seed: int = 0) -> tuple[list[int], list[int]]:
    """Indices (train, held_out): a seeded random `holdout` fraction of subjects, whole subjects only."""
    subjects = sorted({subject_id(p) for p in paths})
    rng = np.random.default_rng(seed)
    n_held = min(len(subjects) - 1, max(1, round(holdout * len(subjects))))
    held = set(rng.permutation(subjects)[:n_held].tolist())
    train_idx = [i for i, p in enumerate(paths) if subject_id(p) not in held]
    held_idx = [i for i, p in enumerate(paths) if subject_id(p) in held]
    return train_idx, held_idx


# ----------------------------------------------------------------------------- a run's training set, in batches

@dataclass
class DataConfig:
    """Which images a run trains on and how they are read. driver.py resolves it once: from the flags for
    stage 1, which saves it in vqvae.pt; stage 2 and `evaluate` inherit it from there."""
    root: str | None = None         # the image folder; None: the embedded demo data under demo_dir
    demo_dir: str = str(DEFAULT_DEMO_ROOT)
    image_size: int = 256
    channels: int = 1
    holdout: float = 0.0            # fraction of subjects left out of training, for evaluation
    holdout_seed: int = 0
    skip_bad_images: bool = False
    slicing: Slicing = field(default_factory=Slicing)  # NIfTI volumes only; saved as a plain dict

    def __post_init__(self):
        if isinstance(self.slicing, dict):  # rebuilt from a checkpoint: DataConfig(**asdict(config))
            self.slicing = Slicing(**self.slicing)

    @classmethod
    def from_args(cls, args) -> "DataConfig":
        slicing = Slicing(args.axis, args.slices, args.volume_index, args.intensity_percentiles)
        return cls(args.data, args.demo_dir, args.image_size, args.channels, args.holdout, args.holdout_seed,
                   args.skip_bad_images, slicing)

    @classmethod
    def from_checkpoint(cls, ckpt: dict) -> "DataConfig":
        """The data config saved by stage 1; a checkpoint written before it was saved keeps it in its flags."""
        if "data_config" in ckpt:
            return cls(**ckpt["data_config"])
        saved = ckpt["args"]
        return cls(ckpt["data"], saved.get("demo_dir", str(DEFAULT_DEMO_ROOT)), saved["image_size"],
                   saved.get("channels", 1), saved.get("holdout", 0.0), saved.get("holdout_seed", 0),
                   saved.get("skip_bad_images", False))

    def folder(self) -> Path:
        """The image folder (the demo data is built on first use)."""
        return Path(self.root) if self.root else demo_data_dir(self.demo_dir)

    def saved(self) -> dict:
        return {**asdict(self), "root": str(self.folder())}


def training_files(data: DataConfig, expand_volumes: bool = True) -> tuple[list[tuple[str, int]], list[str]]:
    """(path, class index) of the training images (held-out subjects removed) and the class names (the image
    folder's: AD, NC), without decoding any image. Volumes are read (not resized) to find their slices:
    one (volume path, class index) per slice; with expand_volumes=False one per volume file, without reading
    any (enough to key a cache: the files and the slicing in the data config decide the slices)."""
    folders = SliceFolders(data.folder(), data.image_size, data.channels, slicing=data.slicing)
    samples = folders.samples
    if folders.volumes and expand_volumes:
        samples = [s for s in samples for _ in _volume_span(s[0], data.slicing, data.skip_bad_images)]
    if data.holdout > 0:
        train_idx, _ = split_by_subject([p for p, _ in samples], data.holdout, data.holdout_seed)
        samples = [samples[i] for i in train_idx]
    return samples, folders.classes


def training_data(data: DataConfig, cache_gb: float, workers: int, disk_cache: Path,
                  build_guard=contextlib.nullcontext) -> Dataset:
    """The training images decoded once as uint8 (in memory, or memory-mapped under `disk_cache` when larger
    than cache_gb), held-out subjects removed."""
    dataset = load_slices(data.folder(), data.image_size, data.channels, cache_gb, workers, disk_cache=disk_cache,
                          build_guard=build_guard, skip_bad=data.skip_bad_images, slicing=data.slicing)
    if data.holdout > 0:
        train_idx, _ = split_by_subject([p for p, _ in dataset.samples], data.holdout, data.holdout_seed)
        dataset = Subset(dataset, train_idx)
    return dataset


def dataset_labels(dataset) -> torch.Tensor:
    """The class labels of an InMemorySlices, or of a Subset of one (held-out subjects removed)."""
    if isinstance(dataset, Subset):
        return dataset_labels(dataset.dataset)[torch.as_tensor(dataset.indices)]
    return dataset.labels


def index_batches(n: int, batch_size: int, seed: int, rank: int = 0, world: int = 1, start: int = 0, device="cpu"):
    """This rank's batches of indices into n items, endlessly: each epoch a DistributedSampler order
    (set_epoch(epoch): new for every epoch, the same on every rank, which take disjoint shards), cut
    into batches; the last partial batch is dropped. `start` skips that many batches (a resumed run)."""
    sampler = DistributedSampler(range(n), num_replicas=world, rank=rank, shuffle=True, seed=seed, drop_last=world > 1)
    per_epoch = max(1, len(sampler) // batch_size)  # a set smaller than a batch is one batch
    epoch, skip = divmod(start, per_epoch)
    while True:
        sampler.set_epoch(epoch)
        order = torch.tensor(list(sampler), device=device)
        for i in range(skip, per_epoch):
            yield order[i * batch_size:(i + 1) * batch_size]
        epoch, skip = epoch + 1, 0


class _Gather(Dataset):
    """dataset[index tensor] -> the uint8 batch of those images (for a DataLoader with batch_size=None)."""

    def __init__(self, images: torch.Tensor, index: torch.Tensor | None):
        self.images, self.index = images, index

    def __getitem__(self, idx):
        return self.images[idx if self.index is None else self.index[idx]]


def uint8_loader(dataset, batches, workers: int, pin_memory: bool = False) -> DataLoader:
    """uint8 image batches for the index batches `batches`. Worker processes only for a memory-mapped cache
    (they overlap its disk reads); in memory a gather beats the hand-over."""
    images, index, on_disk = uint8_images(dataset)
    return DataLoader(_Gather(images, index), sampler=batches, batch_size=None, num_workers=workers if on_disk else 0,
                      pin_memory=pin_memory)


def to_unit(x: torch.Tensor, device, channels_last: bool = False) -> torch.Tensor:
    """uint8 batch -> float in [-1, 1] on the device (v / 127.5 - 1, exactly the card's ToTensor + Normalize)."""
    x = x.to(device, non_blocking=True).float().div_(127.5).sub_(1.0)
    return x.contiguous(memory_format=torch.channels_last) if channels_last else x


# ----------------------------------------------------------------------------- embedded demo data

def _smooth_field(rng: np.random.Generator, size: int, grid: int, amplitude: float) -> torch.Tensor:
    """A smooth random displacement field (1, size, size, 2): coarse normal noise, bicubic upsampled."""
    coarse = torch.from_numpy(rng.normal(0.0, amplitude, (1, 2, grid, grid))).float()
    return F.interpolate(coarse, size=(size, size), mode="bicubic", align_corners=True).permute(0, 2, 3, 1)


def _subject_warp(rng: np.random.Generator, size: int, atrophy: float) -> torch.Tensor:
    """Sampling grid (1, size, size, 2) of one subject: affine + elastic + (for "AD") central expansion."""
    angle = math.radians(rng.uniform(-7, 7))
    sx, sy = rng.uniform(1.05, 1.25, 2)             # zoom in: the brain fills the frame
    tx, ty = rng.uniform(-0.04, 0.04, 2)
    theta = torch.tensor([[math.cos(angle) / sx, -math.sin(angle) / sx, tx],
                          [math.sin(angle) / sy, math.cos(angle) / sy, ty]], dtype=torch.float32)
    grid = F.affine_grid(theta[None], [1, 1, size, size], align_corners=False)
    grid = grid + _smooth_field(rng, size, grid=6, amplitude=0.025)
    if atrophy > 0:  # pull sampling points towards the centre: ventricles widen, tissue thins
        r2 = (grid ** 2).sum(-1, keepdim=True)
        grid = grid * (1 - atrophy * torch.exp(-r2 / (2 * 0.18 ** 2)))
    return grid


def make_demo_dataset(out: str | os.PathLike, seed: int = 0, subjects: int = 40, slices: int = 20,
                      size: int = 256) -> Path:
    """Write the MNI152-derived demo set as NIfTI volumes `out/{train,test}/{AD,NC}/sub-XXX.nii.gz` (idempotent),
    read back like any folder of volumes (axial, default slices).

    Each "subject" is a slab of `slices` axial slices, 2 mm apart, of nilearn's MNI152 2009 T1 template
    (shipped in its wheel, no download) around the ventricles, each slice warped in-plane by the subject's
    own random affine and smooth elastic deformation, with its own intensity/contrast; half of them ("AD")
    get a central expansion that widens the ventricles. The slab is written in RAS order with a `size` x
    `size` in-plane grid. A stand-in for real scans, deterministic for a seed. A quarter of the subjects
    go to test/. Written to a temporary folder and renamed, so an interrupted build is never mistaken for
    a finished one.
    """
    out = Path(out)
    if (out / ".complete").exists():
        return out
    from nilearn.datasets import load_mni152_template  # imported late: slow, and only needed here

    volume = load_mni152_template(resolution=1).get_fdata()           # (197, 233, 189), x, y, z
    volume = torch.from_numpy(np.rot90(volume, 1, axes=(0, 1)).copy()).float()  # anterior up
    pad = max(volume.shape[:2])
    volume = F.pad(volume.permute(2, 0, 1), (0, pad - volume.shape[1], 0, pad - volume.shape[0]))
    volume = torch.roll(volume, ((pad - 233) // 2, (pad - 197) // 2), dims=(1, 2))  # centre in square
    first = 50                                                        # axial slices 50, 52, ...
    spacing = pad / size                                              # mm per pixel of the warped slices
    affine = np.diag([spacing, spacing, 2.0, 1.0])
    affine[:3, 3] = -spacing * size / 2, -spacing * size / 2, first - 72.0  # MNI z of the template's slice
    rng = np.random.default_rng(seed)
    tmp = out.with_name(out.name + f".tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    for s in range(subjects):
        split = "test" if (s // 2) % 4 == 3 else "train"   # AD/NC pairs: 1 in 4 to test
        label = "AD" if s % 2 else "NC"
        grid = _subject_warp(rng, size, atrophy=rng.uniform(0.12, 0.22) if label == "AD" else 0.0)
        stack = volume[first:first + 2 * slices:2, None]              # (slices, 1, pad, pad)
        warped = F.grid_sample(stack, grid.expand(slices, -1, -1, -1), mode="bilinear",
                               padding_mode="zeros", align_corners=False)[:, 0]
        gamma, contrast = rng.uniform(0.75, 1.3), rng.uniform(0.85, 1.1)
        jitter = torch.from_numpy(rng.uniform(0.93, 1.07, (slices, 1, 1))).float()  # per-slice brightness, as in ADNI
        slab = contrast * jitter * warped.clamp(0, 1) ** gamma        # (slices, rows from anterior, columns from left)
        slab = slab + torch.from_numpy(rng.normal(0, 0.01, slab.shape)).float() * (slab > 0)
        voxels = (slab.clamp(0, 1) * 1000).round().to(torch.int16).flip(1).permute(2, 1, 0)  # (x, y, z), RAS
        folder = tmp / split / label
        folder.mkdir(parents=True, exist_ok=True)
        nib.save(nib.Nifti1Image(voxels.numpy(), affine), folder / f"sub-{s:03d}.nii.gz")
    (tmp / ".complete").touch()
    shutil.rmtree(out, ignore_errors=True)
    out.parent.mkdir(parents=True, exist_ok=True)
    os.replace(tmp, out)
    return out


def demo_data_dir(root: str | os.PathLike = DEFAULT_DEMO_ROOT, seed: int = 0) -> Path:
    """The demo dataset's folder under `root`, built on first use."""
    return make_demo_dataset(Path(root) / f"mni152-demo-v{DEMO_VERSION}-seed{seed}", seed=seed)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default=str(DEFAULT_DEMO_ROOT), help="folder to hold the demo set (default: %(default)s)")
    parser.add_argument("--seed", type=int, default=0, help="demo data seed (default: %(default)s)")
    args = parser.parse_args()
    print(demo_data_dir(args.out, args.seed))


if __name__ == "__main__":
    main()
