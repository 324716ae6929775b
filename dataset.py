"""Data: the ADNI-layout image loader, the image caches and the training images in batches.

The loader is the original report's: the `train` and `test` ImageFolders of an ADNI folder
(`ROOT/{train,test}/{AD,NC}/*.jpeg`) concatenated, each image Resize((256, 256)) -> ToTensor ->
Normalize(0.5, 0.5), so values lie in [-1, 1]. Grayscale by default; `channels=3` loads RGB as the
report did. A folder with class subfolders and no train/test level works too.

NIfTI volumes (`.nii`, `.nii.gz`) go through the same folders, caches and subject split: the same layouts
with volumes in place of images, BIDS subtrees in class folders, or a BIDS tree (one class, "all").
volumes/reader.py reads a volume into slices (`Slicing`), volumes/images.py an image file into pixels;
volumes/layouts.py says which files a folder gives and whose each one is (`Layout`), volumes/holdout.py which
subjects are held out, volumes/run_data.py what a run's data is (`DataConfig`, saved in vqvae.pt: the folder, its
layout and slicing, the hold-out) and which files it trains on.

Without a data folder the embedded MNI152 demo data is used (volumes/demo.py); build it by hand with
`python dataset.py --out DIR` (training does it on first use).
"""
from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import math
import os
import signal
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict
from functools import partial
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import ConcatDataset, DataLoader, Dataset, DistributedSampler, Subset
from torchvision import transforms
from torchvision.datasets.folder import IMG_EXTENSIONS

from runtime.checkpoint import atomic_write, let_go_of_run_locks
from runtime.errors import BadInputError
from volumes.demo import DEFAULT_DEMO_ROOT, demo_data_dir
from volumes.images import image_percentiles, load_image
from volumes.layouts import ImageFolder, Layout, classes_from_table, find_image_roots
from volumes.reader import (VOLUME_SUFFIXES, Slicing, printable, read_volume_slices, unoriented, volume_slice_bound,
                            volumes_at_once)


# ----------------------------------------------------------------------------- the card's transform

def card_transform(image_size: int, channels: int) -> transforms.Compose:
    """The report's transform: Resize((S, S)) -> ToTensor -> Normalize(0.5, 0.5), values in [-1, 1]."""
    return transforms.Compose([
        transforms.Resize((image_size, image_size)),
        transforms.ToTensor(),
        transforms.Normalize([0.5] * channels, [0.5] * channels),
    ])


# ----------------------------------------------------------------------------- image folders and caches

class SliceFolders(ConcatDataset):
    """The ImageFolders of `find_image_roots` concatenated (the report's loader), with class names and paths.
    A folder of NIfTI volumes lists one sample per volume (`volumes` is True) and is read whole, by
    InMemorySlices, never item by item. `layout` says which files are taken (default Layout())."""

    def __init__(self, root: str | os.PathLike, image_size: int, channels: int, transform=None,
                 slicing: Slicing | None = None, layout: Layout | None = None):
        if channels not in (1, 3):
            raise BadInputError(f"--channels must be 1 or 3, not {channels}")
        mode = "L" if channels == 1 else "RGB"
        transform = transform if transform is not None else card_transform(image_size, channels)
        folders, layout, self.slicing = [], layout or Layout(), slicing or Slicing()
        self.image_percentiles = image_percentiles(self.slicing, layout)
        for r in find_image_roots(Path(root), layout.version):
            try:
                folders.append(ImageFolder(str(r), layout, transform=transform,  # the loader picklable for workers
                                            loader=partial(load_image, mode=mode, percentiles=self.image_percentiles)))
            except (FileNotFoundError, RuntimeError) as e:  # torchvision: no class folders / no images
                loose = next((f.name for f in r.iterdir()
                              if f.is_file() and f.name.lower().endswith(IMG_EXTENSIONS + VOLUME_SUFFIXES)), None)
                if loose:
                    raise BadInputError(f"{r} holds images ({loose} ...) but no class folders: put them in one "
                                        "folder per class, PATH/AD/, PATH/NC/ ... (one class: PATH/all/)") from None
                raise BadInputError(f"no images found under {r} ({str(e).splitlines()[0]})") from None
        classes = folders[0].classes
        for f in folders[1:]:
            if f.classes != classes:
                raise BadInputError(f"class folders differ between {folders[0].root} {classes} and {f.root} {f.classes}")
            if f.kind != folders[0].kind:
                raise BadInputError(f"{folders[0].root} holds {folders[0].kind} but {f.root} holds {f.kind}: keep one kind")
        self.unlabelled, self.classes_sha1, self.subject_classes = (
            classes_from_table(folders, Path(root), layout) if layout.class_column else (0, None, None))
        classes = folders[0].classes  # the table's, with --class-column
        super().__init__(folders)
        self.classes = classes
        self.samples = [s for f in folders for s in f.samples]  # [(path, label)] in dataset order
        self.volumes = folders[0].kind == "volumes"

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
            unsure = [p for p, _ in units if unoriented(p)]
            if unsure:  # all of them: mirrored alike, harmless to a generative model; some: mixed
                print(f"warning: volumes that say nothing of their orientation (qform and sform codes 0): "
                      f"{len(unsure)} of {len(units)}, e.g. {printable(unsure[0])}; read in ANALYZE's convention "
                      "(LAS), their left and right may be mirrored against the other volumes'; check them in a viewer")
            fill = partial(self._decode_volumes_into, slicing=slicing, workers=workers, skip_bad=skip_bad)
            key = {"slicing": asdict(slicing)}
        else:
            shape = (len(units), channels, image_size, image_size)
            percentiles = folders.image_percentiles
            fill = partial(self._decode_into, image_size=image_size, channels=channels, workers=workers,
                           skip_bad=skip_bad, percentiles=percentiles)
            key = {"percentiles": list(percentiles)} if percentiles else {}  # {}: a cache of layout versions 1-4
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
                     skip_bad: bool, percentiles: tuple[float, float] | None = None) -> dict:
        """Decode every image into `images`, in order; with skip_bad the unreadable ones are left out (the rest
        move up) and their indices returned as {"bad": [...]}, else the first one stops it with its name."""
        mode = "L" if channels == 1 else "RGB"
        resize = transforms.Compose([transforms.Resize((image_size, image_size)), transforms.PILToTensor()])

        def decode(sample):
            try:
                return resize(load_image(sample[0], mode, percentiles))
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
        at_once = volumes_at_once([p for p, _ in self.samples], max(1, workers))  # within the memory budget
        with ThreadPoolExecutor(at_once) as pool:
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
        saved = _read_key(key_path) if path.exists() else {}
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
            text = json.dumps({**key, **done})
            atomic_write(key_path, lambda f: f.write(text.encode()))
            print(f"image cache {path}: {shape[0]} images decoded once ({math.prod(shape) / 2 ** 30:.2f} GB on disk)")
        return torch.from_numpy(np.load(path, mmap_mode="c")), done  # copy-on-write map: pages read on demand

    def __len__(self):
        return len(self.samples)

    def __getitem__(self, i):
        return self.images[i].float() / 127.5 - 1.0, int(self.labels[i])


def _read_key(path: Path) -> dict:
    """A disk cache's key; {} where there is none or it cannot be read (a write cut short): the cache is built anew."""
    try:
        saved = json.loads(path.read_text())
    except (OSError, ValueError):  # ValueError: JSON's and UTF-8's decoding errors
        return {}
    return saved if isinstance(saved, dict) else {}


def files_fingerprint(samples: list[tuple[str, int]]) -> str:
    """A hash of the files' names, sizes and modification times: a cache built from them is stale when it changes."""
    key = hashlib.sha1()
    for p, _ in samples:
        size, mtime = size_and_time(p)
        key.update(os.fsencode(p) + f"|{size}|{mtime}\n".encode())
    return key.hexdigest()


def size_and_time(path: str) -> tuple[int, int]:
    """(size, modification time in ns) of a file; (-1, -1) for a link to a file that is not there (a DataLad tree
    before `datalad get`): reading it says what is wrong, or --skip-bad-images leaves it out."""
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return -1, -1
    return st.st_size, st.st_mtime_ns


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
                slicing: Slicing | None = None, layout: Layout | None = None):
    """The training dataset, decoded once as uint8: in memory when it fits in `cache_gb`, else in a
    memory-mapped file under `disk_cache` (built inside `build_guard`, e.g. by one process of many),
    else, without `disk_cache`, decoded per item (where an unreadable image stops it even with skip_bad;
    volumes, which are read whole, are then decoded into memory all the same).
    skip_bad: leave out unreadable images or volumes (InMemorySlices.skipped) instead of stopping at the first.
    slicing: how NIfTI volumes are cut into slices (default Slicing()); images ignore it.
    layout: which files of the folder are taken (default Layout())."""
    folders = SliceFolders(root, image_size, channels, slicing=slicing, layout=layout)
    n = sum(volume_slice_bound(p, folders.slicing) for p, _ in folders.samples) if folders.volumes else len(folders)
    if n * channels * image_size ** 2 <= cache_gb * 2 ** 30 or (folders.volumes and disk_cache is None):
        return InMemorySlices(folders, image_size, channels, workers, skip_bad=skip_bad)
    if disk_cache is not None:
        with build_guard():
            return InMemorySlices(folders, image_size, channels, workers, skip_bad=skip_bad,
                                  cache_file=Path(disk_cache) / f"images-{image_size}px-{channels}ch.npy")
    return folders


# ----------------------------------------------------------------------------- batches

def dataset_paths(dataset) -> list[str]:
    """The file of each image of an InMemorySlices, or of a Subset of one (a volume's once per slice)."""
    if isinstance(dataset, Subset):
        paths = dataset_paths(dataset.dataset)
        return [paths[i] for i in dataset.indices]
    return [p for p, _ in dataset.samples]


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
                      pin_memory=pin_memory, worker_init_fn=_leave_stop_signals_to_the_trainer)


def _leave_stop_signals_to_the_trainer(worker_id: int):
    """A loader worker leaves the trainer's process group and ignores SIGINT: Ctrl-C in a terminal, or a SIGTERM
    sent to the group (`kill -- -PGID`), reaches every process of the group, and a worker that died of it would fail
    the step that the trainer finishes before it saves (runtime/signals.py). SIGTERM still ends a worker: it is how
    the trainer ends its workers when it exits (reset here: a worker forked inside a training loop would inherit its
    handler, which only notes the signal); a worker also ends by itself once the trainer is gone, and holds none of
    the trainer's run locks meanwhile (its copies closed: a kill -9 of the trainer frees the run at once)."""
    let_go_of_run_locks()
    if hasattr(os, "setpgrp"):
        os.setpgrp()
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)


def to_unit(x: torch.Tensor, device, channels_last: bool = False) -> torch.Tensor:
    """uint8 batch -> float in [-1, 1] on the device (v / 127.5 - 1, exactly the card's ToTensor + Normalize)."""
    x = x.to(device, non_blocking=True).float().div_(127.5).sub_(1.0)
    return x.contiguous(memory_format=torch.channels_last) if channels_last else x


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default=str(DEFAULT_DEMO_ROOT), help="folder to hold the demo set (default: %(default)s)")
    parser.add_argument("--seed", type=int, default=0, help="demo data seed (default: %(default)s)")
    args = parser.parse_args()
    print(demo_data_dir(args.out, args.seed))


if __name__ == "__main__":
    main()
