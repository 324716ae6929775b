"""What `driver.py evaluate --samples DIR` reads: the images of a folder, a sample set's as its manifest lists them
(less those it withheld), and how the set was drawn.

    python driver.py evaluate --run RUN --samples DIR     # a set `sample --out DIR` wrote, or any folder of images
"""
from __future__ import annotations

import json
from pathlib import Path

import torch
import torch.nn.functional as F

from dataset import card_transform
from export.sample_set import MANIFEST, SETTINGS, manifest_rows, read_sample, withheld_rows
from runtime.checkpoint import fingerprint, load_checkpoint
from runtime.errors import BadInputError
from volumes.images import load_image

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff"}
SAMPLE_SUFFIXES = (".nii", ".nii.gz", ".npz")  # `sample --format nifti|npz`


def sample_files(folder: Path) -> tuple[Path, list[Path]]:
    """The images a --samples folder holds, and the folder they are named from: a sample set's (`sample --out
    folder`, or its samples/) the files its manifest lists, not the grid beside them, nor a batch an interruption
    kept out of the manifest; any other folder's every image, NIfTI and npz sample under it."""
    if not folder.is_dir():
        raise BadInputError(f"--samples folder {folder} does not exist")
    folder = folder / "samples" if (folder / "samples" / MANIFEST).is_file() else folder
    if (folder / MANIFEST).is_file():
        withheld = {row["file"] for row in withheld_rows(folder)}  # left out as possible copies: drawn, not there
        files = [folder / row["file"] for row in manifest_rows(folder) if row["file"] not in withheld]
        settings = json.loads((folder / SETTINGS).read_text()) if (folder / SETTINGS).is_file() else {}
        asked = settings.get("num", 0) * len(settings.get("rows", [[]]))
        if len(files) + len(withheld) < asked:  # an interrupted set: its rows would be scored as if they were all
            raise BadInputError(f"{folder} holds {len(files)} of its {asked} samples (an interrupted set): finish it "
                                f"with the same `sample` command and --resume")
    else:
        files = sorted(f for f in folder.rglob("*")
                       if f.suffix.lower() in IMAGE_SUFFIXES or f.name.endswith(SAMPLE_SUFFIXES))
    if not files:
        raise BadInputError(f"no images in --samples folder {folder}")
    return folder, files


def sample_set_folder(folder: Path) -> Path | None:
    """The sample set in `folder` (`sample --out folder` wrote it into its samples/), or `folder` itself, known by
    its sampling.json; None for another folder."""
    return next((f for f in (folder / "samples", folder) if (f / SETTINGS).is_file()), None)


def read_folder(folder: Path, image_size: int, channels: int) -> tuple[torch.Tensor, list[str]]:
    """Every image of a --samples folder (`sample_files`; images with the card's transform, NIfTI and npz samples
    as `sample` writes them, export/sample_set.py) -> (N, C, S, S) in [-1, 1], and their names in the folder (a
    set's files as its manifest names them), read in one listing so that name k is image k's."""
    folder, files = sample_files(folder)
    transform, resized = card_transform(image_size, channels), []

    def read(f: Path) -> torch.Tensor:
        if f.suffix.lower() in IMAGE_SUFFIXES:
            image = load_image(str(f), "L" if channels == 1 else "RGB")
            if image.size != (image_size,) * 2:
                resized.append(f)
            return transform(image)
        x = read_sample(f).float()
        x = x.mean(0, keepdim=True).expand(channels, -1, -1) if x.shape[0] != channels else x
        if x.shape[-2:] != (image_size,) * 2:
            resized.append(f)
        return F.interpolate(x[None], size=(image_size,) * 2, mode="bilinear", antialias=True, align_corners=False)[0]

    images = torch.stack([read(f) for f in files])
    if resized:  # another run's or tool's samples: resampling moves the finest band, which the scores then measure
        print(f"warning: {len(resized)} of {len(files)} images in {folder} are not {image_size}x{image_size} (e.g. "
              f"{resized[0].name}); they were resized to the run's size, which changes their fine detail")
    return images, [f.relative_to(folder).as_posix() for f in files]


def cohort_from(folder: Path) -> str | None:
    """Whose scans' values a `sample --cohort` set was drawn at ("training", "held-out"), from its sampling.json; None
    for a set drawn otherwise, or a folder that is no set."""
    folder = sample_set_folder(folder)
    rows = json.loads((folder / SETTINGS).read_text()).get("rows", []) if folder else []
    drawn = [row[1] for row in rows if isinstance(row, list) and isinstance(row[1], dict) and "drawn" in row[1]]
    return drawn[0].get("from", "training") if drawn else None


def refuse_another_runs_set(folder: Path, run: Path):
    """--withhold-flagged screens the set in `folder` for copies of `run`'s training patients: a set drawn with
    another stage 1 (its sampling.json's VQ-VAE fingerprint) came from a model that may have learned other patients,
    and its card would say it was screened when it was not compared with them. A set that names no fingerprint (drawn
    before sets recorded one) is not checked."""
    drawn_with = folder_record(folder).get("vqvae_fingerprint")
    ours = fingerprint(load_checkpoint(run / "vqvae.pt", "vqvae")["model"])
    if drawn_with is not None and drawn_with != ours:
        named = {row.get("run") for row in manifest_rows(folder)} - {None, ""}
        theirs = f" (its manifest names {', '.join(sorted(named))})" if named else ""
        raise BadInputError(f"--withhold-flagged: the set {folder} was drawn with another VQ-VAE than {run}'s{theirs}; "
                            f"the screen would compare it with {run}'s training patients, not those its model learned: "
                            f"give --run the run that drew it")


def folder_record(folder: Path) -> dict:
    """How a --samples folder was drawn, as far as it says: a sample set's settings (its sampling.json, without the
    rows), else nothing."""
    folder = sample_set_folder(folder)
    return {k: v for k, v in json.loads((folder / SETTINGS).read_text()).items() if k != "rows"} if folder else {}
