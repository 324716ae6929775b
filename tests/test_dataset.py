"""The ADNI-layout loader, the in-memory cache, the subject split, a run's data config, and image folders no one
should have to clean by hand (NIfTI volumes and the demo data: test_volumes.py)."""
import json
import os
import shutil
import struct
import zlib
from dataclasses import asdict
from pathlib import Path

import driver
import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings, strategies as st
from PIL import Image

from conftest import error_of, touch
from dataset import (InMemorySlices, SliceFolders, dataset_labels, dataset_paths, index_batches, load_slices,
                     uint8_images, uint8_loader)
from runtime.errors import BadInputError
from volumes.holdout import split_by_subject
from volumes.layouts import Layout, subject_id
from volumes.reader import Slicing
from volumes.run_data import DataConfig, data_files_key, refuse_subject_folders_as_classes, subject_summary


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
    key = cache.with_suffix(".json")                   # its key cut short (a full disk, before 2026-12-07): built anew
    key.write_text(key.read_text()[:40])
    assert torch.equal(load_slices(adni_folder, 32, 1, cache_gb=0.0, disk_cache=tmp_path).images, rebuilt.images)
    assert json.loads(key.read_text())["shape"] == list(rebuilt.images.shape)


def test_a_disk_cache_built_leaving_out_a_bad_file_is_not_reused_by_a_run_that_must_stop_at_it(adni_folder, tmp_path):
    """--skip-bad-images' cache records what it left out: read without the flag, the bad file is named, not hidden."""
    (adni_folder / "train" / "AD" / "broken_70.jpeg").write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    skipping = load_slices(adni_folder, 16, 1, cache_gb=0.0, disk_cache=tmp_path, skip_bad=True)
    assert len(skipping) == 24 and [Path(p).name for p in skipping.skipped] == ["broken_70.jpeg"]
    with pytest.raises(BadInputError, match="broken_70.jpeg"):
        load_slices(adni_folder, 16, 1, cache_gb=0.0, disk_cache=tmp_path)
    assert len(load_slices(adni_folder, 16, 1, cache_gb=0.0, disk_cache=tmp_path, skip_bad=True)) == 24


def test_a_subset_gathers_its_own_images_labels_and_paths(adni_folder):
    """A held-out run trains on a Subset: its batches and labels are those of its indices, not of the first images."""
    full = load_slices(adni_folder, 16, 1)
    subset = torch.utils.data.Subset(full, [20, 7])                     # test/NC and train/NC; the first 6 are AD
    images, index, on_disk = uint8_images(subset)
    assert torch.equal(images[index], full.images[[20, 7]]) and not on_disk
    batch = next(iter(uint8_loader(subset, [torch.tensor([0, 1])], workers=0)))
    assert torch.equal(batch, full.images[[20, 7]]) and not torch.equal(batch, full.images[:2])
    paths = dataset_paths(subset)
    assert paths == [full.samples[20][0], full.samples[7][0]]
    assert dataset_labels(subset).tolist() == [full.classes.index(Path(p).parent.name) for p in paths] == [1, 1]


def test_each_rank_takes_a_disjoint_shard_and_each_epoch_a_new_order():
    """index_batches: 2 ranks x 2 batches of 4 cover 16 items once an epoch; the next epoch is another order, the
    same on every rank; a resumed run (`start`) picks up the same stream."""
    def epochs(rank, world, count=2, start=0):
        stream = index_batches(16, 4, seed=0, rank=rank, world=world, start=start)
        per_epoch = 4 // world
        return [torch.cat([next(stream) for _ in range(per_epoch)]).tolist() for _ in range(count)]
    for epoch in range(2):
        shards = [epochs(rank, 2)[epoch] for rank in (0, 1)]
        assert sorted(shards[0] + shards[1]) == list(range(16)) and not set(shards[0]) & set(shards[1])
    first, second = epochs(0, 1)
    assert sorted(first) == sorted(second) == list(range(16)) and first != second
    stream = index_batches(16, 4, seed=0, start=5)                       # epoch 1, its second batch
    assert next(stream).tolist() == second[4:8]


def test_missing_folder_is_a_clear_error(tmp_path):
    with pytest.raises(BadInputError, match="does not exist"):
        SliceFolders(tmp_path / "nope", 64, 1)
    touch(tmp_path / "AD", ["scan_1.png", "scan_2.png"])
    with pytest.raises(BadInputError, match="is a file: give the folder of class folders"):
        SliceFolders(tmp_path / "AD" / "scan_1.png", 64, 1)
    with pytest.raises(BadInputError, match=r"AD holds images \(scan_.\.png ...\) but no class folders"):
        SliceFolders(tmp_path / "AD", 64, 1)                       # one class folder given for the data folder


def test_folder_without_images_is_a_clear_error(tmp_path):
    (tmp_path / "empty" / "AD").mkdir(parents=True)
    with pytest.raises(BadInputError, match="no images"):
        SliceFolders(tmp_path / "empty", 64, 1)


def test_corrupt_image_is_named(adni_folder):
    bad = adni_folder / "train" / "AD" / "broken_70.jpeg"
    bad.write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    with pytest.raises(BadInputError, match="broken_70.jpeg"):
        load_slices(adni_folder, 64, 1)


def test_subject_split_never_splits_a_subject():
    paths = [f"/d/{s}_{k}.jpeg" for s in range(30) for k in range(20)] + ["/d/odd.png", "/d/other.png"]
    train, held = split_by_subject(paths, holdout=0.2, seed=3)
    assert sorted(train + held) == list(range(len(paths)))
    assert not {subject_id(paths[i]) for i in train} & {subject_id(paths[i]) for i in held}
    assert 5 <= len({subject_id(paths[i]) for i in held}) <= 8
    assert split_by_subject(paths, 0.2, seed=3) == (train, held)
    assert split_by_subject(paths, 0.2, seed=4) != (train, held)


def test_an_old_layout_hold_out_never_takes_every_subject():
    """Drawn from all classes at once (layout versions 1-4), a large fraction of few subjects rounds up to all of
    them: one is kept for training."""
    paths = [f"/d/{s}_{k}.jpeg" for s in ("a", "b") for k in range(3)]
    for seed in range(5):
        train, held = split_by_subject(paths, holdout=0.9, seed=seed)
        assert len({subject_id(paths[i]) for i in train}) == 1 and len({subject_id(paths[i]) for i in held}) == 1


def test_layout_version_5_draws_the_hold_out_within_classes_and_version_4_from_all_at_once(tmp_path):
    """8 AD subjects and 1 NC at 20%: from version 5 on the NC subject stays in training on every seed; version 4
    draws from all subjects at once, and some seed holds it out."""
    root = touch(tmp_path / "data", [f"AD/AD{s}_{k}.png" for s in range(8) for k in range(2)] + ["NC/NC0_1.png"])
    listed = SliceFolders(root, 16, 1)
    samples, classes, nc = listed.samples, listed.classes, len(listed.samples) - 1     # NC's one image is the last
    nc_trained = {}
    for version in (4, 5, 6):
        configs = [DataConfig(root=str(root), holdout=0.2, holdout_seed=seed, layout=Layout(version=version))
                   for seed in range(20)]
        assert configs[0].strata(samples, classes) == (None if version == 4 else ["AD"] * 16 + ["NC"])
        nc_trained[version] = [nc in config.split(samples, classes)[0] for config in configs]
    assert all(nc_trained[5]) and all(nc_trained[6]) and not all(nc_trained[4])


# ----------------------------------------------------------------------------- a run's data config

def test_slicing_travels_in_the_data_config_and_old_checkpoints_still_load():
    args = driver.parse(["train-vqvae", "--data", "/d", "--axis", "coronal", "--slices", "0.6",
                         "--volume-index", "1", "--intensity-percentiles", "1,99"])
    config = DataConfig.from_args(args)
    assert config.slicing == Slicing("coronal", 0.6, 1, (1.0, 99.0))
    assert driver.parse(["train-vqvae", "--slices", "20"]).slices == 20
    saved = asdict(config)
    assert saved["slicing"] == {"axis": "coronal", "slices": 0.6, "volume_index": 1, "percentiles": (1.0, 99.0),
                                "crop_foreground": True}
    assert DataConfig.from_checkpoint({"data_config": saved}) == config
    del saved["slicing"]                                                 # a checkpoint from before volumes
    assert DataConfig.from_checkpoint({"data_config": saved}).slicing == Slicing(crop_foreground=False)
    with pytest.raises(BadInputError, match="--slices"):
        Slicing(slices=1.5)
    with pytest.raises(SystemExit):
        driver.parse(["train-vqvae", "--slices", "0"])


def test_the_data_flags_round_trip_through_the_data_config():
    args = driver.parse(["train-vqvae", "--data", "/d", "--channels", "3", "--holdout", "0.2", "--holdout-seed", "3",
                         "--skip-bad-images", "--axis", "sagittal", "--slices", "20", "--volume-index", "0",
                         "--intensity-percentiles", "1,99", "--no-crop-foreground", "--subject-pattern", r"P(\d+)_",
                         "--bids-suffix", "T2w", "--bids-entities", "space-MNI152NLin2009cAsym,res-1", "--bids-all"])
    config = DataConfig.from_args(args)
    assert config.layout == Layout(subject_pattern=r"P(\d+)_", bids_suffix="T2w", bids_all=True,
                                   bids_entities=("space-MNI152NLin2009cAsym", "res-1"))
    assert config.slicing == Slicing("sagittal", 20, 0, (1.0, 99.0), crop_foreground=False)
    assert config.flags() == {name: getattr(args, name) for name in config.flags()}
    assert DataConfig.from_checkpoint({"data_config": config.saved()}).flags() == config.flags()
    args = driver.parse(["train-vqvae"])
    config = DataConfig.from_args(args)
    assert config.slicing.crop_foreground and config.layout == Layout()
    assert config.flags() == {name: getattr(args, name) for name in config.flags()}
    with pytest.raises(SystemExit):
        driver.parse(["train-vqvae", "--bids-entities", "space"])


def test_a_run_saved_before_layouts_keeps_its_files_and_subjects_and_the_summary_says_so(tmp_path):
    root = touch(tmp_path / "data", ["AD/sub-01/anat/sub-01_T1w.nii.gz", "AD/sub-01/anat/sub-01_T2w.nii.gz",
                                     "NC/ADNI_002_S_0295_MR_20060418.nii.gz", "NC/ADNI_002_S_0295_MR_20070512.nii.gz"])
    new = DataConfig(root=str(root), holdout=0.5)
    saved = asdict(new)
    del saved["layout"], saved["slicing"]["crop_foreground"]                # as a run saved it before
    old = DataConfig.from_checkpoint({"data_config": saved})
    assert old.layout == Layout(version=1) and not old.slicing.crop_foreground
    assert subject_summary(old).startswith("data: 4 volumes of 3 subjects (volumes per subject: min 1, median 1, "
                                           "max 2); held out: 2 subjects (AD 1 of 1, NC 1 of 2), ")  # a visit a subject
    version4 = DataConfig(root=str(root), holdout=0.5, layout=Layout(version=4))
    assert subject_summary(version4).startswith("data: 3 volumes of 2 subjects (volumes per subject: min 1, median "
                                                "1.5, max 2); held out: 1 subject (")   # one class left out whole
    with pytest.raises(BadInputError, match=r"leaves out no subject: .* one subject per class \(AD 1, NC 1\)"):
        subject_summary(new)                                                # version 5 keeps each class in training


def test_the_data_files_key_follows_names_and_sizes_not_places_or_times(volume_folder, tmp_path, monkeypatch):
    open_ = open
    key = data_files_key(DataConfig(root=str(volume_folder)), contents=True)
    assert key["files"] == 8
    copy = tmp_path / "copy"
    shutil.copytree(volume_folder, copy)
    os.utime(copy / "train" / "AD" / "sub-00.nii.gz", (0, 0))
    touch(copy, ["train/AD/.hidden.nii.gz"])                                 # not listed
    copied = data_files_key(DataConfig(root=str(copy)), contents=True)
    assert {k: copied[k] for k in ("files", "sha1", "contents")} == {k: key[k] for k in ("files", "sha1", "contents")}
    assert copied["times"] != key["times"]
    run = tmp_path / "run"
    run.mkdir()
    driver.check_same_files(DataConfig(root=str(copy)), {"data_files": key}, run)  # the same files elsewhere: taken
    assert list(json.loads((run / "data_checked.json").read_text()).values()) == [[copied["times"], key["contents"]]]
    reads = []                                                               # and noted: not read again
    monkeypatch.setattr("builtins.open", lambda *a, **k: reads.append(a) or open_(*a, **k))
    driver.check_same_files(DataConfig(root=str(copy)), {"data_files": key}, run)
    monkeypatch.undo()
    assert not [a for a in reads if str(a[0]).endswith(".nii.gz")]
    added = copy / "train" / "AD" / "sub-99.nii.gz"
    added.write_bytes(b"")
    assert data_files_key(DataConfig(root=str(copy)))["files"] == 9
    added.unlink()
    rewritten = copy / "train" / "AD" / "sub-01.nii.gz"                     # the preprocessing run again: same size
    rewritten.write_bytes(bytes(reversed(rewritten.read_bytes())))
    assert data_files_key(DataConfig(root=str(copy)))["sha1"] == key["sha1"]
    with pytest.raises(BadInputError, match="other contents"):
        driver.check_same_files(DataConfig(root=str(copy)), {"data_files": key}, run)
    grown = copy / "train" / "AD" / "sub-00.nii.gz"
    grown.write_bytes(grown.read_bytes() + b"\0")
    changed = data_files_key(DataConfig(root=str(copy)))
    assert changed["files"] == 8 and changed["sha1"] != key["sha1"]


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


def test_float_images_with_nan_or_infinite_pixels_keep_their_contrast(tmp_path):
    from dataset import load_image
    ramp = np.tile(np.linspace(0, 1000, 64), (8, 1)).astype(np.float32)
    Image.fromarray(ramp, "F").save(tmp_path / "clean.tif")
    clean = np.asarray(load_image(str(tmp_path / "clean.tif"), "L"))
    for bad in (np.nan, np.inf, -np.inf):
        spoilt = ramp.copy()
        spoilt[:, :4] = bad                                                  # where the ramp is darkest
        Image.fromarray(spoilt, "F").save(tmp_path / "spoilt.tif")
        pixels = np.asarray(load_image(str(tmp_path / "spoilt.tif"), "L"))
        assert (pixels[:, :4] == 0).all() and (pixels[:, 4:] == clean[:, 4:]).all(), bad
    z = np.tile(np.linspace(-2, 2, 64), (8, 1)).astype(np.float32)          # z-scores, clipped to their percentiles
    Image.fromarray(z, "F").save(tmp_path / "z.tif")
    clean = np.asarray(load_image(str(tmp_path / "z.tif"), "L", (0, 100)))
    for bad in (np.nan, np.inf, -np.inf):
        spoilt = z.copy()
        spoilt[:, 30:34] = bad                                               # around 0: mid-grey if read as 0
        Image.fromarray(spoilt, "F").save(tmp_path / "spoilt.tif")
        pixels = np.asarray(load_image(str(tmp_path / "spoilt.tif"), "L", (0, 100)))
        assert (pixels[:, 30:34] == 0).all() and (np.delete(pixels, range(30, 34), 1) ==
                                                  np.delete(clean, range(30, 34), 1)).all(), bad


def test_16_bit_and_float_images_of_new_runs_are_clipped_to_their_percentiles_as_volumes_are(tmp_path):
    """Layout version 5 scales a 16-bit or float image as a volume: clipped to its --intensity-percentiles. A
    z-scored image keeps its negative half (from 0 to its maximum, as runs of versions 1-4 still read it, that half
    was black), and one hot pixel no longer darkens the slice. Pillow reads a 16-bit colour PNG as its top 8 bits:
    refused, not trained on dark."""
    from dataset import load_image
    z = np.tile(np.linspace(-2, 2, 65), (8, 1)).astype(np.float32)          # z-scores; the middle column is 0
    Image.fromarray(z, "F").save(tmp_path / "z.tif")
    Image.fromarray((z * 1000).astype(np.int32), "I").save(tmp_path / "signed.tif")
    for name in ("z.tif", "signed.tif"):
        pixels = np.asarray(load_image(str(tmp_path / name), "L", (0, 100)), dtype=float)[0]
        assert pixels[0] == 0 and pixels[-1] == 255 and abs(pixels[32] - 127.5) <= 1, name
        assert (np.diff(pixels) >= 0).all() and len(np.unique(pixels[:32])) > 20, name   # no black half
        assert (np.asarray(load_image(str(tmp_path / name), "L"))[0, :33] == 0).all()     # versions 1-4
    hot = np.full((32, 32), 500, np.uint16)
    hot[:, 16:], hot[0, 0] = 1000, 65535                                      # one pixel of 1024 at the top
    Image.fromarray(hot).save(tmp_path / "hot.png")
    pixels = np.asarray(load_image(str(tmp_path / "hot.png"), "L", (0.5, 99.5)))
    assert (pixels[1:, :16] == 0).all() and (pixels[:, 16:] == 255).all()
    assert np.asarray(load_image(str(tmp_path / "hot.png"), "L"))[:, 16:].max() < 5          # versions 1-4: dark
    sparse = np.zeros((256, 256), np.uint16)                                # a top slice: 0.46% of it tissue
    sparse[:15, :20] = np.linspace(1000, 3000, 300).reshape(15, 20)
    Image.fromarray(sparse).save(tmp_path / "sparse.png")
    tissue = np.asarray(load_image(str(tmp_path / "sparse.png"), "L", (0.5, 99.5)))[:15, :20]
    assert 80 < tissue.min() < 90 and (tissue == 255).mean() < 0.02        # not black (the background's percentile)
    for version, black in ((5, False), (4, True)):                          # how a run of each version reads them
        folder = tmp_path / f"v{version}" / "AD"
        folder.mkdir(parents=True)
        shutil.copy(tmp_path / "z.tif", folder / "s1_1.tif")
        image = load_slices(folder.parent, 16, 1, layout=Layout(version=version)).images[0, 0]
        assert (image[:, :7] == 0).all() == black, version

    def png16(path, samples, colour_type, width):                           # Pillow cannot write these
        rows = b"".join(b"\0" + row.astype(">u2").tobytes() for row in samples)
        chunk = lambda kind, data: (struct.pack(">I", len(data)) + kind + data  # noqa: E731
                                    + struct.pack(">I", zlib.crc32(kind + data)))
        header = struct.pack(">IIBBBBB", width, len(samples), 16, colour_type, 0, 0, 0)
        path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(rows))
                         + chunk(b"IEND", b""))
    png16(tmp_path / "rgb48.png", np.full((4, 12), 3000), 2, 4)
    png16(tmp_path / "grey16.png", np.tile(np.arange(4) * 1000, (4, 1)), 0, 4)
    with pytest.raises(BadInputError, match="rgb48.png is a 16-bit PNG in colour or with transparency"):
        load_image(str(tmp_path / "rgb48.png"), "L")

    def tiff16_rgb(path, rgb):                                              # nor these: a baseline TIFF by hand
        h, w, _ = rgb.shape
        pixels = rgb.astype("<u2").tobytes()
        tags = [(256, 1, w), (257, 1, h), (258, 3, 8 + 2 + 9 * 12 + 4), (259, 1, 1), (262, 1, 2),
                (273, 1, 8 + 2 + 9 * 12 + 4 + 6), (277, 1, 3), (278, 1, h), (279, 1, len(pixels))]
        ifd = b"".join(struct.pack("<HHII", tag, 4 if tag in (273, 279) else 3, count, value)
                       if tag in (258, 273, 279) else struct.pack("<HHIHH", tag, 3, count, value, 0)
                       for tag, count, value in tags)
        path.write_bytes(b"II*\0" + struct.pack("<IH", 8, len(tags)) + ifd + struct.pack("<I3H", 0, 16, 16, 16)
                         + pixels)
    tiff16_rgb(tmp_path / "rgb48.tif", np.full((4, 4, 3), 3000))
    assert Image.open(tmp_path / "rgb48.tif").mode == "RGB"                 # what Pillow makes of it: 3000 >> 8
    with pytest.raises(BadInputError, match="rgb48.tif is a 16-bit TIFF in colour or with transparency"):
        load_image(str(tmp_path / "rgb48.tif"), "L")
    assert np.asarray(load_image(str(tmp_path / "grey16.png"), "L"))[0].tolist() == [0, 85, 170, 255]


class WorkerSignals(torch.utils.data.Dataset):
    """Each item: the process group, whether SIGINT is ignored and SIGTERM left to its default, in the loader worker
    that made it."""

    def __len__(self):
        return 2

    def __getitem__(self, i):
        import signal
        return (os.getpgrp(), int(signal.getsignal(signal.SIGINT) == signal.SIG_IGN),
                int(signal.getsignal(signal.SIGTERM) == signal.SIG_DFL))


def test_loader_workers_leave_the_trainers_process_group_and_ignore_sigint():
    """Ctrl-C in a terminal and `kill -- -PGID` reach every process of the group: a worker that died of it failed the
    step the trainer finishes before it saves (tests/test_end_to_end.py sends them). SIGTERM, by which the trainer
    ends its workers, ends a worker forked inside the training loop too, whose handler would only note it."""
    from dataset import _leave_stop_signals_to_the_trainer
    from runtime.signals import StopRequests
    with StopRequests():
        loader = torch.utils.data.DataLoader(WorkerSignals(), batch_size=None, num_workers=2,
                                             worker_init_fn=_leave_stop_signals_to_the_trainer)
        for group, ignored, default in loader:
            assert group != os.getpgrp() and ignored == 1 and default == 1


def test_split_folders_in_any_spelling_and_what_is_not_a_class(tmp_path):
    for splits in (("Train", "Test"), ("training", "validation", "testing")):
        root = touch(tmp_path / "_".join(splits), [f"{s}/{c}/{c}{i}_1.png" for s in splits for c in ("AD", "NC")
                                                  for i in range(2)] + ["__MACOSX/train/AD/._AD0_1.png"])
        folders = SliceFolders(root, 16, 1)
        assert folders.classes == ["AD", "NC"] and len(folders.samples) == 4 * len(splits)
        first = os.path.relpath(folders.samples[0][0], root)
        assert first.split(os.sep)[0] == splits[0]                          # train, then validation, then test
        old = SliceFolders(root, 16, 1, layout=Layout(version=2))          # a run begun before: as it was listed
        assert old.classes == sorted([*splits, "__MACOSX"])                # the splits and an empty class
    mixed = touch(tmp_path / "mixed", ["train/AD/a_1.png", "train/NC/b_1.png", "extra/AD/c_1.png"])
    message = str(pytest.raises(BadInputError, SliceFolders, mixed, 16, 1).value)
    assert "split folders train and beside them extra" in message
    empty = touch(tmp_path / "empty", ["AD/a_1.png", "NC/b_1.png"])
    (empty / "MCI").mkdir()
    assert "class folder" in str(pytest.raises(BadInputError, SliceFolders, empty, 16, 1).value)
    assert SliceFolders(empty, 16, 1, layout=Layout(version=2)).classes == ["AD", "MCI", "NC"]


def test_a_bids_root_with_images_beside_its_subjects_is_refused(tmp_path):
    root = touch(tmp_path / "data", ["AD/a_1.nii.gz", "NC/b_1.nii.gz", "sub-99/anat/sub-99_T1w.nii.gz",
                                     "derivatives/sub-99/anat/sub-99_T1w.nii.gz", "code/notes.txt"])
    message = str(pytest.raises(BadInputError, SliceFolders, root, 16, 1).value)
    assert "BIDS sub-* folders and beside them" in message and "a_1.nii.gz" in message
    assert len(SliceFolders(root, 16, 1, layout=Layout(version=2)).samples) == 1   # before: AD and NC left out
    shutil.rmtree(root / "AD"), shutil.rmtree(root / "NC")
    assert [os.path.relpath(p, root) for p, _ in SliceFolders(root, 16, 1).samples] == ["sub-99/anat/sub-99_T1w.nii.gz"]
    wrong_suffix = touch(tmp_path / "t2", ["sub-01/anat/sub-01_T2w.nii.gz"])
    message = str(pytest.raises(BadInputError, SliceFolders, wrong_suffix, 16, 1).value)
    assert "1 found" in message and "suffix T1w" in message                 # says why nothing was taken


def _subjects_and_classes(sizes: dict[str, int], images: int = 3) -> tuple[list[str], list[str]]:
    """Paths of `sizes[class]` subjects of `images` images each, and each path's class."""
    paths = [f"/d/{c}/{c}{s}_{k}.png" for c, n in sizes.items() for s in range(n) for k in range(images)]
    return paths, [p.split("/")[2] for p in paths]


def test_the_hold_out_is_drawn_within_each_class():
    """8 AD subjects and 1 NC at 20%: drawn from all subjects at once (layout versions 1-4), some seeds hold the NC
    subject out, and no NC image is trained on; drawn within each class (version 5), 2 of AD are held out and NC
    stays in training, on every seed."""
    paths, labels = _subjects_and_classes({"AD": 8, "NC": 1})
    at_once = [split_by_subject(paths, 0.2, seed) for seed in range(20)]
    assert any({labels[i] for i in train} == {"AD"} for train, _ in at_once)
    for seed in range(20):
        train, held = split_by_subject(paths, 0.2, seed, labels=labels)
        assert sorted(train + held) == list(range(len(paths))) and {labels[i] for i in train} == {"AD", "NC"}
        assert len({subject_id(paths[i]) for i in held}) == 2 and {labels[i] for i in held} == {"AD"}
    paths, labels = _subjects_and_classes({"AD": 10, "NC": 10})
    train, held = split_by_subject(paths, 0.1, 0, labels=labels)
    assert sorted(labels[i] for i in held if i % 3 == 0) == ["AD", "NC"]     # one subject of each


@settings(max_examples=60, deadline=None)
@given(sizes=st.lists(st.integers(1, 6), min_size=1, max_size=4), holdout=st.floats(0.01, 0.99), seed=st.integers(0, 9))
def test_the_hold_out_within_classes_takes_each_class_s_share_and_never_all_of_one(sizes, holdout, seed):
    paths, labels = _subjects_and_classes({f"C{k}": n for k, n in enumerate(sizes)}, images=2)
    if max(sizes) == 1:                                                      # nothing can be held out
        with pytest.raises(BadInputError, match="leaves out no subject"):
            split_by_subject(paths, holdout, seed, labels=labels)
        return
    train, held = split_by_subject(paths, holdout, seed, labels=labels)
    held_subjects = {subject_id(paths[i]) for i in held}
    assert not held_subjects & {subject_id(paths[i]) for i in train}        # whole subjects
    shares = {f"C{k}": min(n - 1, round(holdout * n)) for k, n in enumerate(sizes)}
    per_class = {c: len({subject_id(paths[i]) for i in held if labels[i] == c}) for c in shares}
    if sum(shares.values()):
        assert per_class == shares
    else:                                                                    # rounded to none: one of the largest
        assert len(held_subjects) == 1 and sizes[int(labels[held[0]][1:])] == max(sizes)
    assert {labels[i] for i in train} == set(shares)                         # every class is trained on


def test_the_hold_out_is_the_same_wherever_the_folder_is_and_however_it_is_named(tmp_path, monkeypatch):
    names = [f"{c}{n}.png" for c in ("AD", "NC") for n in
             ("alpha_1", "beta_1", "gamma_1", "delta_1", "scanA", "scanB", "scanC", "scanD", "omega_1", "zeta_1")]
    root = touch(tmp_path / "data", [f"{n[:2]}/{n}" for n in names])      # some named <subject>_<n>, some not
    shutil.copytree(root, tmp_path / "moved" / "elsewhere")
    os.symlink(root, tmp_path / "link")
    monkeypatch.chdir(tmp_path)

    def held_out(folder, layout=Layout()):
        data = DataConfig(root=folder, holdout=0.3, layout=layout)
        paths = [p for p, _ in SliceFolders(data.folder(), 16, 1).samples]
        _, held = split_by_subject(paths, data.holdout, data.holdout_seed, data.subject())
        return sorted(os.path.relpath(paths[i], folder) for i in held)

    places = [str(root), "data", "data/", "link", str(tmp_path / "moved" / "elsewhere")]
    assert len({tuple(held_out(f)) for f in places}) == 1
    assert len({tuple(held_out(f, Layout(version=2))) for f in places}) > 1   # the rules before: a path's subject


def test_a_file_that_cannot_be_read_moves_no_subject_between_training_and_the_held_out_ones(tmp_path):
    """--skip-bad-images leaves out the files it cannot read; layout version 6 draws the held-out subjects from every
    file listed, so that a training subject whose files became unreadable does not redraw the split (version 5 drew
    from the files read: a held-out subject could come into training, and evaluate's halves change)."""
    from types import SimpleNamespace
    from evaluation.evaluate import run_split
    names = [f"{c}/{c}{s:02d}_{k}.png" for c in ("AD", "NC") for s in range(8) for k in range(2)]
    root = touch(tmp_path / "data", names)
    moved = {}
    for version in (5, 6):
        data = DataConfig(root=str(root), holdout=0.25, skip_bad_images=True, layout=Layout(version=version))
        listed = SliceFolders(data.folder(), 16, 1, layout=data.layout)
        subject = data.subject()

        def held_out(samples):  # the held-out subjects of training's split, and evaluate's halves A and B
            dataset = SimpleNamespace(samples=samples, classes=listed.classes, slice_numbers=None)
            _, held = data.split(samples, listed.classes)
            _, a, b = run_split(data, dataset)
            return [{subject(samples[i][0]) for i in part} for part in (held, a, b)]

        everything = held_out(listed.samples)
        moved[version] = [victim for victim in sorted({subject(p) for p, _ in listed.samples} - everything[0])
                          if held_out([s for s in listed.samples if subject(s[0]) != victim]) != everything]
    assert moved[5] and not moved[6]        # some training subject's loss redraws version 5's split; none version 6's


def test_a_class_of_one_subject_is_named_in_the_summary(tmp_path):
    root = touch(tmp_path / "data", [f"{c}/{c}_{i:03d}.png" for c in ("AD", "NC") for i in range(5)])
    summary = subject_summary(DataConfig(root=str(root), holdout=0.2, layout=Layout(version=4)))
    assert "WARNING: class AD, NC is one subject" in summary and "--subject-pattern" in summary
    with pytest.raises(BadInputError, match=r"one subject per class \(AD 1, NC 1\).*--subject-pattern"):
        subject_summary(DataConfig(root=str(root), holdout=0.2))          # version 5: no class held out whole
    assert "WARNING" not in subject_summary(DataConfig(root=str(root), holdout=0.2, layout=Layout(
        subject_pattern=r"^(\w+_\d+)")))
    numbered = subject_summary(DataConfig(root=str(root), holdout=0.2, layout=Layout(subject_pattern=r"_(\d+)")))
    assert "5 subjects by the naming rules have files in more than one class (AD+NC 5)" in numbered  # AD_000, NC_000


def test_files_of_no_known_subject_id_are_named_in_the_summary(tmp_path):
    """Files named by no rule (AD/scan.png) are each a subject of their own: the split may part a person's, and the
    summary says so. Visits in folders of their own (NC/0295/visit1/T1.png) were (layout version 4); version 5 takes
    the folder below the class folder for their subject."""
    names = [f"{c}/{s}/visit{v}/T1.png" for c in ("AD", "NC") for s in range(3) for v in (1, 2)]
    root = touch(tmp_path / "data", names)
    summary = subject_summary(DataConfig(root=str(root), holdout=0.2, layout=Layout(version=4)))
    assert "data: 12 images of 12 subjects" in summary
    assert "WARNING: 12 of the 12 images carry no subject ID" in summary and "--subject-pattern" in summary
    summary = subject_summary(DataConfig(root=str(root), holdout=0.2))
    assert "data: 12 images of 3 subjects" in summary and "carry no subject ID" not in summary
    assert "3 subjects by the naming rules have files in more than one class (AD+NC 3)" in summary  # 0, 1, 2 in both
    loose = touch(tmp_path / "loose", [f"{c}/scan{c}{v}.png" for c in ("AD", "NC") for v in range(4)])
    assert "WARNING: 8 of the 8 images carry no subject ID" in subject_summary(DataConfig(root=str(loose), holdout=0.2))
    by_folder = subject_summary(DataConfig(root=str(root), holdout=0.2, layout=Layout(subject_pattern=r"^([^/]+/\d)/")))
    assert "data: 12 images of 6 subjects" in by_folder and "WARNING" not in by_folder   # a pattern with a / : the path
    assert "WARNING" not in subject_summary(DataConfig(root=str(tmp_path / "data"), holdout=0.0))  # nothing held out


def test_an_adni_download_before_it_is_sorted_is_refused_as_classes_and_read_from_above_as_one(tmp_path):
    """LONI delivers ADNI/<PTID>/<series>/<date>/<image id>/ADNI_<PTID>_..._I<id>.nii: read from ADNI/, each subject's
    folder would be a class of its own (a class per person, none held out); the folder above is one class."""
    subjects = ("002_S_0295", "002_S_0413", "941_S_1194")
    names = [f"ADNI/{s}/MPRAGE/2006-0{v}-18_08_20_30.0/I1{i}{v}/ADNI_{s}_MR_MPRAGE_br_raw_2006_S1_I1{i}{v}.nii"
             for i, s in enumerate(subjects) for v in (1, 2)]
    root = touch(tmp_path / "download", names)
    message = error_of(driver.main, ["train-vqvae", "--run", str(tmp_path / "run"), "--data", str(root / "ADNI"),
                                     "--preset", "tiny"])
    assert "are ADNI subjects (002_S_0295, 002_S_0413, 941_S_1194), each a class of its own" in message
    assert "--labels FILE" in message and "the folder above" in message and not (tmp_path / "run").exists()
    above = DataConfig(root=str(root), holdout=0.34)
    refuse_subject_folders_as_classes(above)                                   # one class, ADNI, of 3 subjects
    assert "data: 6 volumes of 3 subjects" in subject_summary(above) and "held out: 1 subject" in subject_summary(above)
    sorted_by_hand = touch(tmp_path / "sorted", [("CN/" if "0295" in n else "AD/") + n.split("/", 1)[1] for n in names])
    refuse_subject_folders_as_classes(DataConfig(root=str(sorted_by_hand)))  # AD/002_S_0413/... : classes
    named_by_class = touch(tmp_path / "named", [f"{c}/{c}_{i}.png" for c in ("AD", "NC") for i in range(3)])
    refuse_subject_folders_as_classes(DataConfig(root=str(named_by_class)))  # AD/AD_0.png: a class, not a subject
    assert "subject_classes" not in DataConfig(root=str(sorted_by_hand)).saved()["layout"]  # unset: as saved before


def test_a_link_to_a_file_that_is_not_there_is_named_or_left_out(tmp_path):
    root = touch(tmp_path / "data", [])
    for c in ("AD", "NC"):
        for i in range(2):
            write_file(root / c / f"{c}{i}_1.png", "L", (20, 20), seed=i)
    os.symlink(tmp_path / "annex" / "never-fetched.png", root / "AD" / "gone_1.png")
    data = DataConfig(root=str(root))
    assert data_files_key(data)["files"] == 5                               # before: FileNotFoundError
    message = str(pytest.raises(BadInputError, load_slices, root, 16, 1).value)
    assert "gone_1.png" in message and "datalad get" in message
    assert len(load_slices(root, 16, 1, skip_bad=True)) == 4


def test_an_empty_data_flag_or_a_hold_out_out_of_range_is_refused(tmp_path):
    with pytest.raises(BadInputError, match="--data is empty"):
        DataConfig(root="")
    for holdout in ("1", "-0.1", "10"):
        message = error_of(driver.main, ["train-vqvae", "--run", str(tmp_path / "r"), "--holdout", holdout])
        assert "--holdout" in message and "[0, 1)" in message
    assert not (tmp_path / "r").exists()


def test_a_tiff_stack_is_named_rather_than_read_as_its_first_slice(tmp_path):
    from dataset import load_image
    frames = [Image.new("L", (8, 8), v) for v in (10, 200)]
    frames[0].save(tmp_path / "stack.tif", save_all=True, append_images=frames[1:])
    message = str(pytest.raises(BadInputError, load_image, str(tmp_path / "stack.tif"), "L").value)
    assert "holds 2 images (a TIFF stack)" in message
    frames[0].save(tmp_path / "one.tif")
    assert np.asarray(load_image(str(tmp_path / "one.tif"), "L")).max() == 10
