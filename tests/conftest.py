"""Shared fixtures: miniature image folders made on the fly (the real ADNI data never enters the tests)."""
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


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
