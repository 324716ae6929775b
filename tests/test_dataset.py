"""The ADNI-layout loader, the in-memory cache, the subject split and the demo data."""
import hashlib
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from dataset import (BadInputError, InMemorySlices, SliceFolders, load_slices, make_demo_dataset,
                     split_by_subject, subject_id)


def test_adni_layout_concatenates_train_and_test(adni_folder):
    ds = SliceFolders(adni_folder, image_size=256, channels=1)
    assert len(ds) == 24 and len(ds.datasets) == 2
    assert ds.classes == ["AD", "NC"]
    x, label = ds[0]
    assert x.shape == (1, 256, 256) and label in (0, 1)
    assert x.min() >= -1 and x.max() <= 1 and x.min() < -0.9  # background is black: -1 after Normalize(0.5, 0.5)


def test_rgb_loading_gives_three_channels(adni_folder):
    x, _ = SliceFolders(adni_folder, image_size=64, channels=3)[5]
    assert x.shape == (3, 64, 64)
    assert torch.equal(x[0], x[1])  # grayscale source: equal channels


def test_single_imagefolder_root(adni_folder):
    ds = SliceFolders(adni_folder / "train", image_size=32, channels=1)
    assert len(ds) == 12 and len(ds.datasets) == 1


def test_in_memory_cache_equals_the_card_transform(adni_folder):
    folders = SliceFolders(adni_folder, image_size=64, channels=1)
    cached = InMemorySlices(folders, image_size=64, channels=1, workers=2)
    assert cached.images.dtype == torch.uint8
    for i in (0, 7, 23):
        assert torch.allclose(cached[i][0], folders[i][0], atol=1e-6)
        assert cached[i][1] == folders[i][1]
    assert isinstance(load_slices(adni_folder, 64, 1, cache_gb=1.0), InMemorySlices)
    assert isinstance(load_slices(adni_folder, 64, 1, cache_gb=0.0), SliceFolders)


def test_disk_cache_holds_the_same_pixels_and_is_rebuilt_when_a_file_changes(adni_folder, tmp_path):
    in_memory = load_slices(adni_folder, 32, 1, cache_gb=1.0)
    on_disk = load_slices(adni_folder, 32, 1, cache_gb=0.0, disk_cache=tmp_path)
    cache = tmp_path / "images-32px-1ch.npy"
    assert on_disk.cache_file == cache and cache.exists()
    assert torch.equal(on_disk.images, in_memory.images)
    assert not list(tmp_path.glob(".*tmp*"))  # written under a temporary name, then renamed

    changed = Path(on_disk.samples[5][0])
    Image.new("L", (256, 240), 255).save(changed, format="JPEG")
    rebuilt = load_slices(adni_folder, 32, 1, cache_gb=0.0, disk_cache=tmp_path)
    assert rebuilt.images[5].float().mean() > 250 and torch.equal(rebuilt.images[:5], in_memory.images[:5])


def test_missing_folder_is_a_clear_error(tmp_path):
    with pytest.raises(BadInputError, match="does not exist"):
        SliceFolders(tmp_path / "nope", 64, 1)


def test_folder_without_images_is_a_clear_error(tmp_path):
    (tmp_path / "empty" / "AD").mkdir(parents=True)
    with pytest.raises(BadInputError, match="no images"):
        SliceFolders(tmp_path / "empty", 64, 1)


def test_corrupt_image_is_named(adni_folder):
    bad = adni_folder / "train" / "AD" / "broken_70.jpeg"
    bad.write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    with pytest.raises(BadInputError, match="broken_70.jpeg"):
        load_slices(adni_folder, 64, 1)


def test_subject_ids():
    assert subject_id("/x/AD/1234_S_5678_099.jpeg") == "1234_S_5678"
    assert subject_id("/x/AD/sub-007_052.png") == "sub-007"
    assert subject_id("/x/AD/scan.png") == "/x/AD/scan.png"          # unparseable: its own subject


def test_subject_split_never_splits_a_subject():
    paths = [f"/d/{s}_{k}.jpeg" for s in range(30) for k in range(20)] + ["/d/odd.png", "/d/other.png"]
    train, held = split_by_subject(paths, holdout=0.2, seed=3)
    assert sorted(train + held) == list(range(len(paths)))
    assert not {subject_id(paths[i]) for i in train} & {subject_id(paths[i]) for i in held}
    assert 5 <= len({subject_id(paths[i]) for i in held}) <= 8
    assert split_by_subject(paths, 0.2, seed=3) == (train, held)
    assert split_by_subject(paths, 0.2, seed=4) != (train, held)


def _digest(folder):
    h = hashlib.sha256()
    for f in sorted(folder.rglob("*.nii.gz")):
        h.update(f.relative_to(folder).as_posix().encode())
        h.update(f.read_bytes())
    return h.hexdigest()


def test_demo_data_is_deterministic_for_a_seed(tmp_path):
    a = make_demo_dataset(tmp_path / "a", seed=5, subjects=8, slices=2, size=64)
    b = make_demo_dataset(tmp_path / "b", seed=5, subjects=8, slices=2, size=64)
    c = make_demo_dataset(tmp_path / "c", seed=6, subjects=8, slices=2, size=64)
    assert _digest(a) == _digest(b) != _digest(c)
    assert sorted(p.name for p in (a / "train" / "AD").iterdir()) == ["sub-001.nii.gz", "sub-003.nii.gz", "sub-005.nii.gz"]
    ds = load_slices(a, image_size=64, channels=1)                     # volumes, sliced by the default rule
    assert len(ds) == 16 and ds.classes == ["AD", "NC"]
    assert len(load_slices(a / "test", 64, 1)) == 4                    # subjects 6 and 7 are held as test
    img = np.stack([ds[i][0].numpy() for i in range(len(ds))])
    assert img.std() > 0.3 and (img > -0.9).mean() > 0.2              # a bright brain on a black background
    mtime = (a / "train").stat().st_mtime_ns
    make_demo_dataset(a, seed=5, subjects=8, slices=2, size=64)       # reused, not rewritten
    assert (a / "train").stat().st_mtime_ns == mtime
