"""The ADNI-layout loader, the in-memory cache, the subject split, the demo data, and image folders no one
should have to clean by hand."""
import hashlib
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings, strategies as st
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
    for f in sorted(folder.rglob("*.png")):
        h.update(f.relative_to(folder).as_posix().encode())
        h.update(f.read_bytes())
    return h.hexdigest()


def test_demo_data_is_deterministic_for_a_seed(tmp_path):
    a = make_demo_dataset(tmp_path / "a", seed=5, subjects=8, slices=2, size=64)
    b = make_demo_dataset(tmp_path / "b", seed=5, subjects=8, slices=2, size=64)
    c = make_demo_dataset(tmp_path / "c", seed=6, subjects=8, slices=2, size=64)
    assert _digest(a) == _digest(b) != _digest(c)
    ds = SliceFolders(a, image_size=64, channels=1)
    assert len(ds) == 16 and ds.classes == ["AD", "NC"]
    assert len(SliceFolders(a / "test", 64, 1)) == 4                   # subjects 6 and 7 are held as test
    img = np.stack([ds[i][0].numpy() for i in range(len(ds))])
    assert img.std() > 0.3 and (img > -0.9).mean() > 0.2              # a bright brain on a black background
    mtime = (a / "train").stat().st_mtime_ns
    make_demo_dataset(a, seed=5, subjects=8, slices=2, size=64)       # reused, not rewritten
    assert (a / "train").stat().st_mtime_ns == mtime


# ----------------------------------------------------------------------------- hostile image folders

def write_file(path: Path, kind: str, size: tuple[int, int], seed: int) -> bool:
    """One file of `kind`; returns whether it is a readable image."""
    rng = np.random.default_rng(seed)
    w, h = size
    path.parent.mkdir(parents=True, exist_ok=True)
    if kind == "zero-byte":
        path.write_bytes(b"")
    elif kind == "not an image":
        path.write_text("subject,age\n002_S_0295,72\n")
    elif kind == "truncated jpeg":
        Image.fromarray(rng.integers(0, 256, (h + 16, w + 16), dtype=np.uint8)).save(path, format="JPEG")
        path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    elif kind == "16-bit":
        Image.fromarray(rng.integers(0, 4096, (h, w)).astype(np.uint16)).save(path, format="PNG")
    else:  # a PIL mode: L, RGB, RGBA, LA, P, 1
        img = Image.fromarray(rng.integers(0, 256, (h, w, 4), dtype=np.uint8), "RGBA")
        img = img.convert(kind) if kind != "P" else img.convert("RGB").quantize(16)
        img.save(path, format="JPEG" if path.suffix == ".jpeg" else "PNG")
    return kind not in ("zero-byte", "not an image", "truncated jpeg")


KINDS = ["L", "RGB", "RGBA", "LA", "P", "1", "16-bit", "zero-byte", "not an image", "truncated jpeg"]


files = st.lists(st.tuples(st.sampled_from(KINDS), st.sampled_from(["AD", "NC", "NC/deeper/still"]),
                           st.tuples(st.integers(1, 300), st.integers(1, 300))), min_size=1, max_size=6)


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(files=files, channels=st.sampled_from([1, 3]))
def test_fuzzed_folders_load_in_range_and_in_shape_or_name_the_bad_file(files, channels, tmp_path_factory):
    root = tmp_path_factory.mktemp("fuzz")
    good, bad = [], []
    for i, (kind, folder, size) in enumerate(files):
        ext = ".jpeg" if kind in ("L", "RGB", "truncated jpeg", "zero-byte") else ".png"
        path = root / "train" / folder / f"s{i}_{i}{ext}"
        (good if write_file(path, kind, size, seed=i) else bad).append(str(path))

    if bad:
        with pytest.raises(BadInputError, match="cannot read image") as e:
            load_slices(root, 32, channels, workers=1)
        assert any(name in str(e.value) for name in bad)
    if not good:
        with pytest.raises(BadInputError, match="none of the"):
            load_slices(root, 32, channels, workers=1, skip_bad=True)
        return
    dataset = load_slices(root, 32, channels, workers=1, skip_bad=True)
    assert sorted(dataset.skipped) == sorted(bad) and sorted(p for p, _ in dataset.samples) == sorted(good)
    for i in range(len(dataset)):
        x, _ = dataset[i]
        assert x.shape == (channels, 32, 32) and x.min() >= -1 and x.max() <= 1


def test_hidden_folders_symlink_loops_odd_names_and_huge_images(tmp_path):
    root = tmp_path / "data"
    for name in ("AD/a_1.png", "NC/b_1.png", "NC/nested/deeper/c_1.png", ".ipynb_checkpoints/d_1.png", "NC/.e_1.png"):
        write_file(root / name, "L", (20, 20), seed=0)
    odd = os.fsencode(root / "AD") + b"/\xff\xfe_subject_2.png"   # not valid UTF-8
    write_file(Path(os.fsdecode(odd)), "L", (20, 20), seed=1)
    Image.new("L", (4000, 4000), 200).save(root / "AD" / "huge_3.png")
    os.symlink(root / "NC", root / "NC" / "nested" / "loop")        # NC/nested/loop -> NC
    os.symlink(root / "NC" / "b_1.png", root / "AD" / "linked_4.png")

    dataset = load_slices(root, 32, 1, workers=2)
    names = sorted(os.path.relpath(p, root) for p, _ in dataset.samples)
    assert dataset.classes == ["AD", "NC"]                                  # not .ipynb_checkpoints
    assert names == sorted(["AD/a_1.png", os.fsdecode(odd)[len(str(root)) + 1:], "AD/huge_3.png", "AD/linked_4.png",
                            "NC/b_1.png", "NC/nested/deeper/c_1.png"])       # the loop listed nothing twice
    huge = dataset[names.index("AD/huge_3.png")][0]
    assert huge.shape == (1, 32, 32) and torch.allclose(huge, torch.full_like(huge, 200 / 127.5 - 1))
    (root / "AD" / "broken_5.png").write_bytes(b"\x89PNG")
    message = str(pytest.raises(BadInputError, load_slices, root, 32, 1).value)
    assert "broken_5.png" in message
    Path(os.fsdecode(odd)).write_bytes(b"")
    print(str(pytest.raises(BadInputError, load_slices, root, 32, 1).value))  # a non-UTF-8 name prints


def test_16_bit_and_transparent_images_keep_their_contrast(tmp_path):
    from dataset import load_image
    ramp = np.tile(np.linspace(0, 4095, 256), (8, 1)).astype(np.uint16)    # 12 bits used, as MRI exports do
    Image.fromarray(ramp).save(tmp_path / "ramp.png")
    pixels = np.asarray(load_image(str(tmp_path / "ramp.png"), "L"), dtype=float)
    assert pixels.min() == 0 and pixels.max() == 255 and abs(pixels.mean() - 127.5) < 1   # PIL alone: almost all 255
    rgba = np.zeros((8, 8, 4), np.uint8)
    rgba[..., :3], rgba[:4, :, 3], rgba[4:, :, 3] = 255, 255, 0              # white; the lower half transparent
    Image.fromarray(rgba, "RGBA").save(tmp_path / "rgba.png")
    pixels = np.asarray(load_image(str(tmp_path / "rgba.png"), "L"))
    assert (pixels[:4] == 255).all() and (pixels[4:] == 0).all()
