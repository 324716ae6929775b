"""Shared fixtures: miniature image folders and NIfTI volumes made on the fly (the real ADNI data never enters
the tests)."""
import errno
import os
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import driver  # noqa: E402
from conditions.table import Condition  # noqa: E402
from diffusion.gaussian import GaussianDiffusion  # noqa: E402
from modules import VQVAE, UNet, UNetConfig, VQVAEConfig  # noqa: E402
from runtime.models import LatentDiffusion  # noqa: E402


def pytest_configure(config):
    config.addinivalue_line("markers", "cuda: needs a CUDA GPU (`pytest -m cuda`; bench/gpu_check.py runs them)")


def write_blob_images(folder: Path, subjects: list[str], slices: int, rng, size=(256, 240), ext="jpeg"):
    """Grayscale ellipses of random size and brightness, named <subject>_<slice>.<ext>."""
    folder.mkdir(parents=True, exist_ok=True)
    w, h = size
    yy, xx = np.mgrid[0:h, 0:w]
    for subject in subjects:
        for k in range(slices):
            a, b = rng.uniform(0.25, 0.45) * w, rng.uniform(0.25, 0.45) * h
            inside = ((xx - w / 2) / a) ** 2 + ((yy - h / 2) / b) ** 2 < 1
            img = (inside * rng.uniform(120, 240) + rng.normal(0, 5, (h, w))).clip(0, 255).astype(np.uint8)
            Image.fromarray(img, mode="L").save(folder / f"{subject}_{67 + k}.{ext}")


@pytest.fixture
def adni_folder(tmp_path):
    """ROOT/{train,test}/{AD,NC}/<subject>_<slice>.jpeg: 2 subjects x 3 slices per class and split (24 images)."""
    rng = np.random.default_rng(0)
    root = tmp_path / "adni"
    for split in ("train", "test"):
        for label in ("AD", "NC"):
            write_blob_images(root / split / label, [f"{split}{label}{i}" for i in range(2)], 3, rng)
    return root


# ----------------------------------------------------------------------------- NIfTI volumes, written with nibabel

def write_volume(path, data, affine=None):
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(np.asarray(data, dtype=np.float32), np.eye(4) if affine is None else affine), path)
    return path


def blob(shape=(16, 16, 12), seed=0):
    """A bright noisy ellipsoid ("brain") on black, in RAS voxel order."""
    rng = np.random.default_rng(seed)
    grid = np.meshgrid(*(np.linspace(-1, 1, n) for n in shape), indexing="ij")
    inside = sum((g / 0.8) ** 2 for g in grid) < 1
    return inside * rng.uniform(50, 100, shape)


def touch(root: Path, names: list[str]) -> Path:
    """Empty files root/name: enough where the files are listed, never read."""
    for name in names:
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_bytes(b"")
    return root


@pytest.fixture
def volume_folder(tmp_path):
    """ROOT/{train,test}/{AD,NC}/sub-XXX.nii.gz: 2 subjects per class and split, 16x16x12 voxels each."""
    root = tmp_path / "volumes"
    for i, (split, label) in enumerate((s, c) for s in ("train", "test") for c in ("AD", "NC")):
        for k in range(2):
            write_volume(root / split / label / f"sub-{i}{k}.nii.gz", blob(seed=2 * i + k))
    return root


# ----------------------------------------------------------------------------- a trained miniature run

SMALL_VQ = ["--image-size", "32", "--vq-channels", "8", "--vq-mult", "1,2", "--codebook-size", "32",
            "--batch-size", "8", "--log-every", "2", "--sample-every", "2", "--save-every", "2", "--workers", "1"]
SMALL_UNET = ["--unet-channels", "8", "--unet-mult", "1,1,1,1", "--batch-size", "8", "--log-every", "2",
              "--sample-every", "4", "--save-every", "2", "--warmup", "2"]


def vqvae(run, data, *extra):
    driver.main(["train-vqvae", "--run", str(run), "--data", str(data), "--preset", "tiny", *SMALL_VQ, *extra])


def unet(run, *extra):
    driver.main(["train-unet", "--run", str(run), *SMALL_UNET, *extra])


def error_of(fn, *args) -> str:
    with pytest.raises(SystemExit) as e:
        fn(*args)
    assert isinstance(e.value.code, str) and e.value.code.startswith("error: ")
    assert "\n" not in e.value.code
    return e.value.code


def disk_full(fp):
    """A writer that finds the disk full halfway: a piece of a file written into `fp` (a path or an open file), then
    ENOSPC. Patched in for a library's writer, it shows whether a file is written whole (atomic_write) or in place."""
    if isinstance(fp, (str, os.PathLike)):
        with open(fp, "wb") as f:
            f.write(b"half a file")
    else:
        fp.write(b"half a file")
    raise OSError(errno.ENOSPC, "No space left on device")


def ckpt(path):
    return torch.load(path, map_location="cpu", weights_only=True)


def saved_flags_as(path, drop=(), **values):
    """Rewrite the flags a checkpoint saved (what --resume reads), as a run from before a flag, or with other values,
    saved them."""
    from runtime.checkpoint import atomic_save
    saved = ckpt(path)
    saved["args"] = {**{k: v for k, v in saved["args"].items() if k not in drop}, **values}
    atomic_save(saved, path)


@pytest.fixture(scope="session")
def trained_run(tmp_path_factory):
    """train-vqvae (4 steps) -> train-unet (4 steps) on a 24-image ADNI-layout folder, once per test session:
    tests that change it work on a copy."""
    root = tmp_path_factory.mktemp("cli")
    data = root / "adni"
    rng = np.random.default_rng(0)
    for split in ("train", "test"):
        for label in ("AD", "NC"):
            write_blob_images(data / split / label, [f"{split}{label}{i}" for i in range(2)], 3, rng)
    run = root / "run"
    vqvae(run, data, "--max-steps", "4")
    unet(run, "--max-steps", "4")
    return run, data


def conditioned_data(data: Path, per_class: int = 4) -> Path:
    """Blob images of subjects AD0-AD3 and NC0-NC3 (`per_class` of each; 3 images each, 40x40) in `data`, and its
    participants.csv giving each an age (AD 55, 65 ..., NC 50, 60 ...) and a sex."""
    rng, lines = np.random.default_rng(0), ["participant_id,age,sex"]
    for label in ("AD", "NC"):
        subjects = [f"{label}{i}" for i in range(per_class)]
        write_blob_images(data / label, subjects, 3, rng, size=(40, 40))
        lines += [f"{s},{50 + 10 * i + (5 if label == 'AD' else 0)},{'FM'[i % 2]}" for i, s in enumerate(subjects)]
    (data / "participants.csv").write_text("\n".join(lines) + "\n")
    return data


@pytest.fixture(scope="session")
def conditioned_run(tmp_path_factory):
    """A 32-px run on blob images whose participants table gives age and sex, trained 2 + 2 steps, 25% of the
    subjects held out; stage 2 conditioned on class, age and sex."""
    root = tmp_path_factory.mktemp("conditioned")
    data = conditioned_data(root / "data")
    run = root / "run"
    vqvae(run, data, "--max-steps", "2", "--holdout", "0.25")
    driver.main(["train-unet", "--run", str(run), *SMALL_UNET, "--max-steps", "2", "--condition", "class,age,sex",
                 "--labels", str(data / "participants.csv")])
    return run, data


# ----------------------------------------------------------------------------- a miniature pair of models

def random_latent_diffusion() -> LatentDiffusion:
    """A miniature conditional pair with random weights (the UNet's zero-initialised output layer made random, so
    that its calls matter), 20 diffusion steps."""
    torch.manual_seed(0)
    vq = VQVAE(VQVAEConfig(image_size=16, channels=8, channel_mult=(1, 2), num_res_blocks=1, codebook_size=16)).eval()
    net = UNet(UNetConfig(latent_size=8, channels=8, channel_mult=(1, 2), num_res_blocks=1, attention_levels=(1,),
                          conditions=(2,))).eval().requires_grad_(False)
    torch.nn.init.normal_(net.out[-1].weight, std=0.2)
    return LatentDiffusion(vq, net, GaussianDiffusion(num_steps=20, prediction="v"), 1.5, vq.cfg.latent_shape,
                           2.0, [Condition("class", "category", ["AD", "NC"])], 0)
