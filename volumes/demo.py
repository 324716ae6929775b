"""The embedded demo data: a stand-in for real scans that needs no download, written once as NIfTI volumes in
the ADNI layout so that it goes through the same volume reader as real scans (volumes/reader.py).

Axial slabs of nilearn's MNI152 2009 T1 template (shipped inside its wheel), 40 "subjects", each with its own
random affine, smooth elastic deformation and intensity; half of them ("AD") with a central expansion that
widens the ventricles. Each subject has an age (55-90) that atrophies its brain as well, whatever its group: the
ventricles widen (a smaller central expansion) and the sulci too (the dark gaps between gyri grow, an erosion of
the bright tissue). `participants.tsv` at the root (BIDS) holds each subject's group, age and sex (sex changes
nothing), so that conditioning on a covariate can be checked against an effect of known kind and size. Derived
from one template, not from patients: it shows that the pipeline works, not anatomy. Built on first use by
DataConfig.folder(), or by hand with `python dataset.py --out DIR`.
"""
from __future__ import annotations

import contextlib
import math
import os
import re
import shutil
from pathlib import Path

import nibabel as nib
import numpy as np
import torch
import torch.nn.functional as F

from runtime.errors import BadInputError

DEMO_VERSION = 3                  # bump when the demo generator changes, so old caches are not reused
DEFAULT_DEMO_ROOT = Path.home() / ".cache" / "brain-ldm"
AGES = (55.0, 90.0)               # the demo subjects' ages, uniform
AGE_VENTRICLES = 0.10             # the central expansion at the oldest age (AD adds 0.12-0.22)
AGE_SULCI = 0.8                   # how far the oldest brain is blended towards its erosion (5x5 minimum)


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


def ageing(age: float) -> float:
    """0 at the youngest demo age, 1 at the oldest."""
    return (age - AGES[0]) / (AGES[1] - AGES[0])


def widen_sulci(slab: torch.Tensor, amount: float) -> torch.Tensor:
    """Slices (n, H, W) in [0, 1] blended by `amount` towards their grey-scale erosion (the minimum over 5x5 pixels):
    the bright tissue thins and the dark gaps between it, sulci and ventricles, widen."""
    eroded = -F.max_pool2d(-slab[:, None], 5, stride=1, padding=2)[:, 0]
    return slab + amount * (eroded - slab)


def make_demo_dataset(out: str | os.PathLike, seed: int = 0, subjects: int = 40, slices: int = 20,
                      size: int = 256) -> Path:
    """Write the MNI152-derived demo set as NIfTI volumes `out/{train,test}/{AD,NC}/sub-XXX.nii.gz` (idempotent),
    read back like any folder of volumes (axial, default slices).

    Each "subject" is a slab of `slices` axial slices, 2 mm apart, of nilearn's MNI152 2009 T1 template
    (shipped in its wheel, no download) around the ventricles, each slice warped in-plane by the subject's
    own random affine and smooth elastic deformation, with its own intensity/contrast; half of them ("AD")
    get a central expansion that widens the ventricles, and every subject's age widens ventricles and sulci
    (`ageing`, `widen_sulci`). The slab is written in RAS order with a `size` x `size` in-plane grid, and the
    subjects' group, age and sex to participants.tsv. A stand-in for real scans, deterministic for a seed. A quarter of the subjects
    go to test/. Written to a temporary folder and renamed, so an interrupted build is never mistaken for
    a finished one.
    """
    out = Path(out)
    if (out / ".complete").exists():
        return out
    with _building(out):  # the ranks of torchrun, or two commands, build it once: the others wait, then read it
        if not (out / ".complete").exists():
            _build(out, seed, subjects, slices, size)
    return out


@contextlib.contextmanager
def _building(out: Path):
    """An exclusive lock on OUT.lock beside the folder while it is built (none without fcntl: Windows)."""
    try:
        import fcntl
    except ImportError:
        yield
        return
    out.parent.mkdir(parents=True, exist_ok=True)
    with open(out.with_name(out.name + ".lock"), "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def _build(out: Path, seed: int, subjects: int, slices: int, size: int):
    """make_demo_dataset's work, in a temporary folder renamed to `out` when it is whole."""
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
    for left in out.parent.glob(out.name + ".tmp*"):  # builds killed before they finished (this one holds the lock)
        shutil.rmtree(left, ignore_errors=True)
    tmp = out.with_name(out.name + f".tmp{os.getpid()}")
    participants = ["participant_id\tgroup\tage\tsex"]
    for s in range(subjects):
        split = "test" if (s // 2) % 4 == 3 else "train"   # AD/NC pairs: 1 in 4 to test
        label = "AD" if s % 2 else "NC"
        age, sex = round(float(rng.uniform(*AGES)), 1), "F" if rng.uniform() < 0.5 else "M"
        disease = rng.uniform(0.12, 0.22) if label == "AD" else 0.0
        grid = _subject_warp(rng, size, atrophy=disease + AGE_VENTRICLES * ageing(age))
        stack = volume[first:first + 2 * slices:2, None]              # (slices, 1, pad, pad)
        warped = F.grid_sample(stack, grid.expand(slices, -1, -1, -1), mode="bilinear",
                               padding_mode="zeros", align_corners=False)[:, 0]
        warped = widen_sulci(warped.clamp(0, 1), AGE_SULCI * ageing(age))
        gamma, contrast = rng.uniform(0.75, 1.3), rng.uniform(0.85, 1.1)
        jitter = torch.from_numpy(rng.uniform(0.93, 1.07, (slices, 1, 1))).float()  # per-slice brightness, as in ADNI
        slab = contrast * jitter * warped.clamp(0, 1) ** gamma        # (slices, rows from anterior, columns from left)
        slab = slab + torch.from_numpy(rng.normal(0, 0.01, slab.shape)).float() * (slab > 0)
        voxels = (slab.clamp(0, 1) * 1000).round().to(torch.int16).flip(1).permute(2, 1, 0)  # (x, y, z), RAS
        folder = tmp / split / label
        folder.mkdir(parents=True, exist_ok=True)
        nib.save(nib.Nifti1Image(voxels.numpy(), affine), folder / f"sub-{s:03d}.nii.gz")
        participants.append(f"sub-{s:03d}\t{label}\t{age:g}\t{sex}")
    (tmp / "participants.tsv").write_text("\n".join(participants) + "\n")
    (tmp / ".complete").touch()
    shutil.rmtree(out, ignore_errors=True)  # what an interrupted build left
    os.replace(tmp, out)


def demo_data_dir(root: str | os.PathLike = DEFAULT_DEMO_ROOT, seed: int = 0) -> Path:
    """The demo dataset's folder under `root`, built on first use."""
    return make_demo_dataset(Path(root) / f"mni152-demo-v{DEMO_VERSION}-seed{seed}", seed=seed)


def rebuilt_demo(folder: Path) -> Path | None:
    """`folder` built again where it is this version's demo data and was deleted (its cache cleared): the same files,
    byte for byte, from its seed, so that a run trained on it goes on; None for any other folder. An earlier
    version's, deleted, cannot be built again by this code: refused in one line."""
    found = re.fullmatch(r"mni152-demo-v(\d+)-seed(\d+)", folder.name)
    if not found or folder.exists():
        return None
    if int(found[1]) != DEMO_VERSION:
        raise BadInputError(f"{folder}, the demo data this run trained on (version {found[1]}), is gone, and this "
                            f"code builds version {DEMO_VERSION} alone: restore the folder, or build it with the code "
                            f"of its time (`git log -- volumes/demo.py`), or train a new run")
    return demo_data_dir(folder.parent, int(found[2]))
