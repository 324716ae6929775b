"""The ADNI-layout loader, the in-memory cache, the subject split, NIfTI volumes, the demo data, and image
folders no one should have to clean by hand."""
import hashlib
import os
from dataclasses import asdict
from pathlib import Path

import driver
import nibabel as nib
import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings, strategies as st
from PIL import Image

from dataset import (BadInputError, DataConfig, InMemorySlices, SliceFolders, Slicing, load_slices, make_demo_dataset,
                     read_volume_slices, split_by_subject, subject_id, training_files)


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


# ----------------------------------------------------------------------------- NIfTI volumes (synthetic, written with nibabel)

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


@pytest.fixture
def volume_folder(tmp_path):
    """ROOT/{train,test}/{AD,NC}/sub-XXX.nii.gz: 2 subjects per class and split, 16x16x12 voxels each."""
    root = tmp_path / "volumes"
    for i, (split, label) in enumerate((s, c) for s in ("train", "test") for c in ("AD", "NC")):
        for k in range(2):
            write_volume(root / split / label / f"sub-{i}{k}.nii.gz", blob(seed=2 * i + k))
    return root


RAS_MARKER = (12, 5, 9)   # x right, y anterior, z superior, in a 16^3 RAS volume


@pytest.mark.parametrize("stored_as", ["RAS", "LPS", "permuted"])
@pytest.mark.parametrize("axis", ["axial", "coronal", "sagittal"])
def test_marker_voxel_lands_where_ras_says(tmp_path, stored_as, axis):
    ras = np.zeros((16, 16, 16))
    ras[RAS_MARKER] = 1
    affine = np.eye(4)
    if stored_as == "LPS":       # voxel i runs right-to-left, j anterior-to-posterior: the DICOM order
        data, affine[:3, :3] = ras[::-1, ::-1], np.diag([-1, -1, 1])
        affine[:3, 3] = 15, 15, 0
    elif stored_as == "permuted":  # stored (z, x, y): voxel axis 0 is superior, 1 right, 2 anterior
        data, affine[:3, :3] = ras.transpose(2, 0, 1), [[0, 1, 0], [0, 0, 1], [1, 0, 0]]
    else:
        data = ras
    path = write_volume(tmp_path / "v.nii.gz", data, affine)
    slices, span = read_volume_slices(path, 16, slicing=Slicing(axis, slices=1.0, percentiles=(0, 100)))
    assert slices.shape == (16, 1, 16, 16) and span == range(16)
    x, y, z = RAS_MARKER
    # radiological views: rows from superior (anterior for axial) down; columns from the patient's right
    # (axial, coronal) or from anterior (sagittal)
    k, row, col = {"axial": (z, 15 - y, 15 - x), "coronal": (y, 15 - z, 15 - x), "sagittal": (x, 15 - z, 15 - y)}[axis]
    assert slices[k, 0, row, col] == 255 and slices.sum() == 255


def test_slice_choice_by_fraction_count_and_foreground(tmp_path):
    data = np.zeros((16, 16, 16))
    data[2:14, 2:14, 3:13] = 100           # a box over axial slices 3..12
    data[7:9, 7:9, 2] = data[7:9, 7:9, 13] = 100  # the ends: a sliver of foreground, < 25% of the box's
    path = write_volume(tmp_path / "v.nii", data)
    span = lambda **kw: read_volume_slices(path, 16, slicing=Slicing(**kw))[1]  # noqa: E731
    assert span() == range(3, 13)          # default: slices with foreground, empty and sliver ends dropped
    assert span(slices=0.5) == range(4, 12) and span(slices=1.0) == range(16)
    assert span(slices=5) == range(5, 10) and span(slices=100) == range(16)
    assert span(axis="coronal") == range(2, 14)


def test_intensities_are_clipped_to_percentiles_and_scaled(tmp_path):
    ramp = np.arange(1000.0).reshape(10, 10, 10)
    path = write_volume(tmp_path / "ramp.nii.gz", ramp)
    slices, _ = read_volume_slices(path, 10, slicing=Slicing(slices=1.0, percentiles=(10, 90)))
    low, high = np.percentile(ramp, (10, 90))
    expected = np.round(np.clip((ramp - low) / (high - low), 0, 1) * 255)
    assert np.array_equal(np.sort(slices.numpy().ravel()), np.sort(expected.ravel()))  # no resize at 10 px
    assert (slices == 0).float().mean() == pytest.approx(0.1, abs=0.01)


@pytest.mark.parametrize("shape, spacing, bright", [((16, 8, 4), (1, 1, 1), (16, 32)),    # wide slice: padded
                                                     ((16, 16, 4), (1, 2, 1), (32, 16))])  # 2 mm rows: taller
def test_slices_keep_their_physical_shape(tmp_path, shape, spacing, bright):
    data = np.ones(shape)
    data[..., 0] = 0                          # a black slice, so that the percentiles differ
    path = write_volume(tmp_path / "v.nii.gz", data, np.diag([*spacing, 1]))
    image = read_volume_slices(path, 32, slicing=Slicing(slices=1, percentiles=(0, 100)))[0][0, 0]
    rows, cols = (image > 127).any(1).sum().item(), (image > 127).any(0).sum().item()
    assert (rows, cols) == bright            # bright rows x columns: height and width in the 32 x 32 image
    assert image[0, 0] == 0 and image[16, 16] == 255  # padded with black around the centred slice


def test_volume_folder_loads_like_images_and_in_three_channels(volume_folder):
    ds = load_slices(volume_folder, 32, 1)
    assert ds.classes == ["AD", "NC"] and ds.images.dtype == torch.uint8
    volumes = sorted({p for p, _ in ds.samples})
    assert len(volumes) == 8 and len(ds) == len(ds.slice_numbers) > 8
    x, label = ds[0]
    assert x.shape == (1, 32, 32) and x.min() == -1 and label == 0 and ds.images.max() > 200
    rgb = load_slices(volume_folder, 32, 3)
    assert rgb.images.shape[1:] == (3, 32, 32) and torch.equal(rgb.images[:, 0], ds.images[:, 0])
    train, held = split_by_subject([p for p, _ in ds.samples], 0.25, seed=0)
    assert len({subject_id(ds.samples[i][0]) for i in held}) == 2          # whole volumes held out
    assert not {ds.samples[i][0] for i in train} & {ds.samples[i][0] for i in held}


def test_bids_tree_is_one_class_and_sessions_of_a_subject_stay_together(tmp_path):
    root = tmp_path / "bids"
    for subject, sessions in (("01", ["1", "2"]), ("02", ["1"]), ("03", []), ("04", []), ("05", [])):
        for ses in sessions or [None]:
            folder = root / f"sub-{subject}" / (f"ses-{ses}/anat" if ses else "anat")
            name = f"sub-{subject}" + (f"_ses-{ses}" if ses else "") + "_T1w.nii.gz"
            write_volume(folder / name, blob(seed=int(subject)))
    write_volume(root / "sub-01" / "ses-1" / "func" / "sub-01_ses-1_bold.nii.gz", blob())   # not anatomy
    write_volume(root / "derivatives" / "sub-01" / "anat" / "sub-01_T1w.nii.gz", blob())      # not a subject
    (root / "dataset_description.json").write_text("{}")
    ds = load_slices(root, 16, 1)
    assert ds.classes == ["all"] and len({p for p, _ in ds.samples}) == 6
    assert subject_id(str(root / "sub-01/ses-2/anat/sub-01_ses-2_T1w.nii.gz")) == "sub-01"
    assert subject_id("/data/AD/patient7.nii.gz") == "/data/AD/patient7.nii.gz"  # no BIDS label: its own subject
    for seed in range(6):
        train, held = split_by_subject([p for p, _ in ds.samples], 0.4, seed)
        held_subjects = {subject_id(ds.samples[i][0]) for i in held}
        assert len(held_subjects) == 2 and not held_subjects & {subject_id(ds.samples[i][0]) for i in train}
        sessions = {p for i in held for p, _ in [ds.samples[i]] if "sub-01" in p}
        assert len(sessions) in (0, 2)                                       # both sessions, or neither


def test_disk_cache_key_covers_the_slicing(volume_folder, tmp_path, capsys):
    cache = tmp_path / "cache"
    in_memory = load_slices(volume_folder, 16, 1, slicing=Slicing(slices=4))
    four = load_slices(volume_folder, 16, 1, cache_gb=0.0, disk_cache=cache, slicing=Slicing(slices=4))
    assert four.cache_file is not None and len(four) == 32 and torch.equal(four.images, in_memory.images)
    six = load_slices(volume_folder, 16, 1, cache_gb=0.0, disk_cache=cache, slicing=Slicing(slices=6))
    assert len(six) == 48 and "decoded once" in capsys.readouterr().out
    coronal = load_slices(volume_folder, 16, 1, cache_gb=0.0, disk_cache=cache, slicing=Slicing("coronal", slices=6))
    assert not torch.equal(coronal.images, six.images)
    again = load_slices(volume_folder, 16, 1, cache_gb=0.0, disk_cache=cache, slicing=Slicing("coronal", slices=6))
    assert "reused" in capsys.readouterr().out and torch.equal(again.images, coronal.images)
    assert again.samples == coronal.samples and again.slice_numbers == coronal.slice_numbers


def _bad_volume_message(root, **kw) -> str:
    message = str(pytest.raises(BadInputError, load_slices, root, 16, 1, **kw).value)
    assert "\n" not in message
    return message


def test_bad_volumes_are_named_in_one_line(tmp_path):
    good = write_volume(tmp_path / "good.nii.gz", np.random.default_rng(0).uniform(0, 100, (24, 24, 24)))
    cases = {
        "truncated.nii.gz": (good.read_bytes()[:good.stat().st_size // 2], "cannot read volume"),
        "text.nii.gz": (b"this is not a NIfTI file", "cannot read volume"),
        "text.nii": (b"this is not a NIfTI file either", "cannot read volume"),
    }
    for name, (payload, expected) in cases.items():
        root = tmp_path / name.replace(".", "_")
        (root / "AD").mkdir(parents=True)
        (root / "AD" / name).write_bytes(payload)
        message = _bad_volume_message(root)
        assert expected in message and name in message
    write_volume(tmp_path / "flat" / "AD" / "slice.nii.gz", np.ones((16, 16)))
    assert "2D" in _bad_volume_message(tmp_path / "flat") and "slice.nii.gz" in _bad_volume_message(tmp_path / "flat")
    write_volume(tmp_path / "empty" / "AD" / "zeros.nii.gz", np.zeros((16, 16, 16)))
    assert "zeros.nii.gz has no foreground" in _bad_volume_message(tmp_path / "empty")
    four_d = np.stack([blob(seed=1), blob(seed=2) * 0], axis=-1)           # volume 1 is empty
    write_volume(tmp_path / "fmri" / "AD" / "run.nii.gz", four_d)
    message = _bad_volume_message(tmp_path / "fmri")
    assert "run.nii.gz is 4D (2 volumes)" in message and "--volume-index" in message
    assert "no foreground" in _bad_volume_message(tmp_path / "fmri", slicing=Slicing(volume_index=1))
    assert "no --volume-index 2" in _bad_volume_message(tmp_path / "fmri", slicing=Slicing(volume_index=2))
    picked = load_slices(tmp_path / "fmri", 16, 1, slicing=Slicing(volume_index=0))
    write_volume(tmp_path / "one" / "AD" / "run.nii.gz", blob(seed=1))
    assert torch.equal(picked.images, load_slices(tmp_path / "one", 16, 1).images)


def test_a_folder_mixing_images_and_volumes_is_refused(adni_folder, volume_folder):
    write_volume(adni_folder / "train" / "AD" / "sub-99.nii.gz", blob())
    message = _bad_volume_message(adni_folder)
    assert "mixes images" in message and "sub-99.nii.gz" in message
    (adni_folder / "train" / "AD" / "sub-99.nii.gz").unlink()
    import shutil
    shutil.rmtree(adni_folder / "test")
    shutil.copytree(volume_folder / "test", adni_folder / "test")           # train/ images, test/ volumes
    assert "keep one kind" in _bad_volume_message(adni_folder)


def test_skip_bad_leaves_out_an_unreadable_volume(volume_folder):
    bad = volume_folder / "train" / "NC" / "sub-11.nii.gz"
    bad.write_bytes(bad.read_bytes()[:200])
    assert "sub-11.nii.gz" in _bad_volume_message(volume_folder)
    ds = load_slices(volume_folder, 16, 1, skip_bad=True)
    assert ds.skipped == [str(bad)] and len({p for p, _ in ds.samples}) == 7 and str(bad) not in dict(ds.samples)
    assert len(ds) == len(ds.images) == len(ds.labels)
    config = DataConfig(root=str(volume_folder), image_size=16, skip_bad_images=True)
    files, classes = training_files(config)
    assert files == ds.samples and classes == ["AD", "NC"]              # the same slices, found without resizing


def test_slicing_travels_in_the_data_config_and_old_checkpoints_still_load():
    args = driver.parse(["train-vqvae", "--data", "/d", "--axis", "coronal", "--slices", "0.6",
                         "--volume-index", "1", "--intensity-percentiles", "1,99"])
    config = DataConfig.from_args(args)
    assert config.slicing == Slicing("coronal", 0.6, 1, (1.0, 99.0))
    assert driver.parse(["train-vqvae", "--slices", "20"]).slices == 20
    saved = asdict(config)
    assert saved["slicing"] == {"axis": "coronal", "slices": 0.6, "volume_index": 1, "percentiles": (1.0, 99.0)}
    assert DataConfig.from_checkpoint({"data_config": saved}) == config
    del saved["slicing"]                                                 # a checkpoint from before volumes
    assert DataConfig.from_checkpoint({"data_config": saved}).slicing == Slicing()
    with pytest.raises(BadInputError, match="--slices"):
        Slicing(slices=1.5)
    with pytest.raises(SystemExit):
        driver.parse(["train-vqvae", "--slices", "0"])


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
