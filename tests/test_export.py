"""export/sample_set.py and volumes/writer.py: samples written as a dataset that --data reads back, NIfTI in the
training geometry, the manifest, and an interrupted set resumed to the very same files."""
import csv
import json
import shutil
from dataclasses import asdict

import nibabel as nib
import numpy as np
import pytest
import torch
from PIL import Image

import driver
import predict
from conftest import SMALL_UNET, ckpt, error_of, unet, vqvae, write_volume
from export.sample_set import SEEDING, SampleSet, batch_seed, read_sample
from runtime.checkpoint import fingerprint, run_lock
from runtime.errors import BadInputError
from runtime.models import load_run
from volumes.reader import Slicing, read_volume_slices
from volumes.run_data import DataConfig, run_geometry
from volumes.writer import SampleGeometry, read_slice, slice_volume, training_geometry

FAST = ["--sampler", "ddim", "--steps", "3", "--gif-frames", "2"]


def manifest(folder):
    with open(folder / "manifest.csv", newline="") as f:
        return list(csv.DictReader(f))


def test_samples_are_a_dataset_that_stage_1_trains_on_with_a_manifest_naming_the_model(trained_run, tmp_path):
    run, _ = trained_run
    images = predict.predict(predict.parse_args(["--run", str(run), "--out", str(tmp_path), "--num", "8",
                                                 "--batch-size", "3", "--seed", "5", *FAST]))
    folder = tmp_path / "samples"
    assert sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*.png")) == [f"all/sub-{i:06d}.png" for i in range(8)]
    rows = manifest(folder)
    saved = ckpt(run / "unet.pt")
    assert [r["file"] for r in rows] == [f"all/sub-{i:06d}.png" for i in range(8)]
    assert [(r["seed"], r["in_batch"], r["batch_count"]) for r in rows] == [
        (str(batch_seed(5, i // 3)), str(i % 3), "3" if i < 6 else "2") for i in range(8)]
    assert {(r["sampler"], r["steps"], r["batch_size"], r["unet_step"]) for r in rows} == {("ddim", "3", "3", str(saved["step"]))}
    assert {r["unet_fingerprint"] for r in rows} == {fingerprint(saved["ema"])}
    assert {r["vqvae_fingerprint"] for r in rows} == {fingerprint(ckpt(run / "vqvae.pt")["model"])}
    # the 8-bit files hold the samples (rounded), and a sample is made again from its seed and place in the batch
    assert (torch.stack([read_sample(folder / r["file"]) for r in rows]) - images).abs().max() <= 1 / 127.5
    model = load_run(run, "cpu")
    sampling = predict.sampling_from_args(predict.parse_args(["--batch-size", "3", *FAST]), model)
    torch.manual_seed(int(rows[6]["seed"]))                    # the short last batch: its seed and its size
    again, _, _ = predict.generate(model, sampling, int(rows[6]["batch_count"]))
    assert torch.allclose(again, images[6:], atol=1e-5)
    # the round trip: stage 1 trains on the samples, every sample its own subject
    vqvae(tmp_path / "again", folder, "--max-steps", "2", "--holdout", "0.25")
    assert ckpt(tmp_path / "again" / "vqvae.pt")["step"] == 2


def test_a_conditioned_runs_samples_carry_their_conditions_back_into_training(conditioned_run, tmp_path):
    run, _ = conditioned_run
    predict.predict(predict.parse_args(["--run", str(run), "--out", str(tmp_path), "--num", "3", "--set", "sex=F",
                                        "--sweep", "class=all", "--set", "age=60", *FAST]))
    folder = tmp_path / "samples"
    rows = manifest(folder)
    assert [r["file"] for r in rows] == [f"{c}/sub-{i:06d}.png" for i, c in enumerate(["AD"] * 3 + ["NC"] * 3)]
    assert {(r["class"], r["age"], r["sex"], r["guidance"]) for r in rows} == {("AD", "60", "F", "3.0"), ("NC", "60", "F", "3.0")}
    table = (folder / "participants.tsv").read_text().splitlines()
    assert table[0] == "participant_id\tage\tsex" and table[1:] == [f"sub-{i:06d}\t60\tF" for i in range(6)]
    # the same run sampled unconditionally: no class, no condition, the `all` folder and `n/a` in the table
    predict.predict(predict.parse_args(["--run", str(run), "--out", str(tmp_path / "open"), "--num", "2", *FAST]))
    assert [r["file"] for r in manifest(tmp_path / "open" / "samples")] == ["all/sub-000000.png", "all/sub-000001.png"]
    assert (tmp_path / "open" / "samples" / "participants.tsv").read_text().splitlines()[1] == "sub-000000\tn/a\tn/a"
    # our own reader takes the folder as a data set, and the table as its conditions
    stage2 = tmp_path / "again"
    vqvae(stage2, folder, "--max-steps", "2")
    driver.main(["train-unet", "--run", str(stage2), *SMALL_UNET, "--max-steps", "2", "--condition", "class,sex"])
    saved = ckpt(stage2 / "unet.pt")
    assert saved["labels"]["file"] == str(folder / "participants.tsv")
    assert [c["values"] for c in saved["conditions"]] == [["AD", "NC"], ["F"]]


def test_samples_decoded_without_the_quantiser_are_the_decoders_reading_of_the_latents_and_say_so(trained_run, tmp_path):
    run, _ = trained_run
    flags = ["--run", str(run), "--num", "3", "--seed", "2", "--format", "npz", *FAST]
    quantised = predict.predict(predict.parse_args([*flags, "--out", str(tmp_path / "q")]))
    straight = predict.predict(predict.parse_args([*flags, "--out", str(tmp_path / "s"), "--decode", "unquantised"]))
    # the same latents (same seed) decoded both ways: the decoder straight from z, not the same images
    model = load_run(run, "cpu")
    sampling = predict.sampling_from_args(predict.parse_args(FAST), model)
    torch.manual_seed(batch_seed(2, 0))                        # as `sample` seeds its first batch
    x_T = torch.randn(3, *model.latent_shape)
    z, _ = predict.sample_latents(model.diffusion, model.unet, x_T, sampling)
    with torch.no_grad():
        assert torch.allclose(straight, model.vqvae.decoder(z / model.latent_scale).clamp(-1, 1), atol=1e-5)
        assert torch.allclose(quantised, model.vqvae.decode(z / model.latent_scale).clamp(-1, 1), atol=1e-5)
    assert not torch.allclose(straight, quantised, atol=1e-3)
    # the manifest says how a set was decoded; a set decoded as always carries no new column
    assert {r["decode"] for r in manifest(tmp_path / "s" / "samples")} == {"unquantised"}
    assert "decode" not in manifest(tmp_path / "q" / "samples")[0]


def test_an_interrupted_set_resumes_to_the_same_files_and_a_changed_flag_is_refused(trained_run, tmp_path, monkeypatch):
    run, _ = trained_run
    flags = ["--run", str(run), "--num", "7", "--batch-size", "2", "--format", "npz", *FAST]
    whole = tmp_path / "whole"
    predict.predict(predict.parse_args([*flags, "--out", str(whole)]))
    write, calls = SampleSet.write, []

    def interrupted(self, row, batch, images):
        if len(calls) == 2:
            raise KeyboardInterrupt
        calls.append(batch)
        write(self, row, batch, images)

    cut = tmp_path / "cut"
    monkeypatch.setattr(SampleSet, "write", interrupted)
    with pytest.raises(KeyboardInterrupt):
        predict.predict(predict.parse_args([*flags, "--out", str(cut)]))
    monkeypatch.setattr(SampleSet, "write", write)
    assert len(manifest(cut / "samples")) == 4 and (cut / "denoise.gif").stat().st_size > 0   # the GIF, at once
    with open(cut / "samples" / "manifest.csv", "a") as f:   # a row cut off in the middle, as a kill would leave it
        f.write("all/sub-000004.npz,sub-0000")
    (cut / "samples" / "all" / ".sub-000004.npz.tmp999").write_bytes(b"half")   # and the file it was writing
    drawn = predict.predict(predict.parse_args([*flags, "--out", str(cut), "--resume"]))
    assert len(drawn) == 3                                     # batches 2 and 3 only
    assert not list((cut / "samples").rglob(".*tmp*"))
    assert manifest(cut / "samples") == manifest(whole / "samples")
    for row in manifest(whole / "samples"):                   # npz keeps the float samples: equal to the bit
        assert torch.equal(read_sample(whole / "samples" / row["file"]), read_sample(cut / "samples" / row["file"]))
    assert "steps: 3 then, 4 now); --resume continues a set with the same run and flags (give --steps 3)" in error_of(
        predict.main, [*flags, "--out", str(cut), "--resume", "--steps", "4"])
    message = error_of(predict.main, [*flags, "--out", str(cut), "--resume", "--decode", "unquantised", "--steps", "4"])
    assert "decode: None then, unquantised now" in message and "(give" not in message  # no flag of its name: no hint
    # without --resume a new set replaces the old one: its files go, also those of batches the manifest never listed
    text = (cut / "samples" / "manifest.csv").read_text()
    (cut / "samples" / "manifest.csv").write_text("".join(text.splitlines(keepends=True)[:3]))  # rows of 0 and 1
    mine = [cut / "samples" / "all" / "sub-ADNI002S0295_T1w.npz", cut / "samples" / "NC" / "sub-01_T1w.nii.gz",
            cut / "samples" / "all" / "sub-000007.npz", cut / "samples" / "all" / "sub-0000001.npz"]
    for path in mine:     # a user's own files beside the set, real scans among them: not named as its samples
        path.parent.mkdir(exist_ok=True)
        path.write_bytes(b"a user's own file")
    predict.predict(predict.parse_args([*flags, "--out", str(cut), "--num", "2"]))
    assert sorted(p.name for p in (cut / "samples" / "all").iterdir()) == sorted([
        "sub-000000.npz", "sub-000001.npz", "sub-000007.npz", "sub-0000001.npz", "sub-ADNI002S0295_T1w.npz"])
    assert all(path.read_bytes() == b"a user's own file" for path in mine)


def test_a_set_being_written_is_not_written_into_by_a_second_command(trained_run, tmp_path):
    """Two commands (array jobs given one --out) would interleave the manifest's rows."""
    run, _ = trained_run
    flags = ["--run", str(run), "--num", "2", "--format", "npz", *FAST, "--out", str(tmp_path / "out")]
    with run_lock(tmp_path / "out", create=True, lock=predict.SAMPLES_LOCK):   # the first command, still writing
        message = error_of(predict.main, flags)
    assert "another command is writing a sample set into" in message and not (tmp_path / "out" / "samples").exists()
    training = tmp_path / "training"                  # a run folder being trained: its own lock is another one
    with run_lock(training, create=True):
        predict.predict(predict.parse_args(flags[:-1] + [str(training)]))
    assert len(manifest(training / "samples")) == 2


def test_a_sample_file_is_written_whole_or_not_at_all(trained_run, tmp_path, monkeypatch):
    run, _ = trained_run
    save = Image.Image.save

    def disk_full(self, f, format=None, **kwargs):
        if format == "GIF":                                  # the GIF, written first (before the batch's files), fits
            return save(self, f, format=format, **kwargs)
        f.write(b"half a PNG")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(Image.Image, "save", disk_full)
    message = error_of(predict.main, ["--run", str(run), "--num", "2", *FAST, "--out", str(tmp_path)])
    assert "could not write" in message and "sub-000000.png (No space left on device)" in message
    assert not list((tmp_path / "samples").rglob("*.png")) and not manifest(tmp_path / "samples")


def test_sets_of_other_seeds_share_no_batch_and_an_old_set_resumes_its_own_way(trained_run, tmp_path):
    run, _ = trained_run
    flags = ["--run", str(run), "--num", "4", "--batch-size", "2", "--format", "npz", *FAST]
    first = predict.predict(predict.parse_args([*flags, "--out", str(tmp_path / "s0"), "--seed", "0"]))
    second = predict.predict(predict.parse_args([*flags, "--out", str(tmp_path / "s1"), "--seed", "1"]))
    assert not any(torch.allclose(a, b, atol=1e-3) for a in first for b in second)   # with seed + b: 2 of 4 equal
    old = tmp_path / "s0" / "samples"                         # as a set written before batch seeds were spread
    settings = json.loads((old / "sampling.json").read_text())
    del settings["batch_seeds"]
    (old / "sampling.json").write_text(json.dumps(settings))
    (old / "all" / "sub-000003.npz").unlink()
    kept = manifest(old)[:2]
    with open(old / "manifest.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, list(kept[0]))
        writer.writeheader()
        writer.writerows(kept)
    assert "begun before --row-noise" in error_of(predict.main, [*flags, "--out", str(tmp_path / "s0"), "--seed", "0",
                                                                  "--resume", "--row-noise", "independent"])
    resumed = predict.predict(predict.parse_args([*flags, "--out", str(tmp_path / "s0"), "--seed", "0", "--resume"]))
    assert [r["seed"] for r in manifest(old)][2:] == ["1", "1"] and len(resumed) == 2   # batch 1: seed + b goes on
    assert "batch_seeds" not in json.loads((old / "sampling.json").read_text())


def test_a_set_resumes_on_the_kind_of_device_it_was_begun_on(trained_run, tmp_path):
    run, _ = trained_run
    flags = ["--run", str(run), "--num", "2", "--batch-size", "1", "--format", "npz", *FAST, "--out", str(tmp_path)]
    predict.predict(predict.parse_args(flags))
    assert {r["device"] for r in manifest(tmp_path / "samples")} == {"cpu"}
    path = tmp_path / "samples" / "sampling.json"
    settings = json.loads(path.read_text())
    path.write_text(json.dumps({**settings, "device": "cuda"}))  # as a GPU began it: its noise and precision differ
    assert "device: cuda then, cpu now" in error_of(predict.main, [*flags, "--resume"])
    del settings["device"]                                      # a set from before the device was saved: resumes
    path.write_text(json.dumps(settings))
    predict.predict(predict.parse_args([*flags, "--resume"]))


def test_a_folder_that_is_not_a_sample_set_is_never_written_into(trained_run, tmp_path):
    run, _ = trained_run
    mine = tmp_path / "mine" / "samples" / "all"
    mine.mkdir(parents=True)
    (mine / "sub-000000.png").write_bytes(b"a user's own file")
    message = error_of(predict.main, ["--run", str(run), "--num", "2", *FAST, "--out", str(tmp_path / "mine")])
    assert "not a sample set" in message and (mine / "sub-000000.png").read_bytes() == b"a user's own file"
    earlier = tmp_path / "earlier" / "samples"                      # what predict.py wrote before sets: replaced
    earlier.mkdir(parents=True)
    (earlier / "0000.png").write_bytes(b"an old sample")
    predict.predict(predict.parse_args(["--run", str(run), "--num", "2", *FAST, "--out", str(tmp_path / "earlier")]))
    assert sorted(p.name for p in earlier.rglob("*.png")) == ["sub-000000.png", "sub-000001.png"]
    (tmp_path / "afile").write_text("")
    assert "give --out a folder" in error_of(predict.main, ["--run", str(run), "--num", "2", *FAST, "--out",
                                                            str(tmp_path / "afile")])
    assert "cannot make" in error_of(predict.main, ["--run", str(run), "--num", "2", *FAST, "--out",
                                                    str(tmp_path / "afile" / "below")])   # below a file


# ----------------------------------------------------------------------------- resuming, on sets of constructed images

def constructed_set(folder, rows=1, num=3, batch_size=2, resume=False):
    """A set of `rows` unconditional rows of `num` npz samples each, opened as `sample` opens it, without a model."""
    captions = [f"row {r}" for r in range(rows)]
    settings = {"num": num, "batch_size": batch_size, "format": "npz", "seed": 0, "batch_seeds": SEEDING,
                "rows": [[caption, None] for caption in captions]}
    return SampleSet(folder, settings, [(caption, None) for caption in captions], [], {"sampler": "ddim"},
                     resume=resume)


def write_batches(samples, batches):
    """Each (row, batch) written as `sample` writes it, its images constant at a value of their own."""
    for row, batch in batches:
        count = min(samples.batch_size, samples.num - batch * samples.batch_size)   # the last batch may be short
        samples.write(row, batch, torch.full((count, 1, 2, 2), (row * 10 + batch) / 100))


def test_a_complete_set_whose_last_batch_is_short_resumes_with_nothing_to_draw(tmp_path):
    samples = constructed_set(tmp_path, num=3, batch_size=2)    # batches of 2 and 1
    write_batches(samples, [(0, 0), (0, 1)])
    written = manifest(tmp_path)
    resumed = constructed_set(tmp_path, num=3, batch_size=2, resume=True)
    assert resumed.batches(0) == {0, 1} and manifest(tmp_path) == written   # the short batch is whole: kept


def test_an_interrupted_set_of_two_rows_resumes_in_its_second_row_to_the_uninterrupted_set(tmp_path):
    """Row 1's samples are numbered after row 0's: their batch is counted from the row's start, not the set's."""
    order = [(0, 0), (0, 1), (1, 0), (1, 1)]
    write_batches(constructed_set(tmp_path / "whole", rows=2), order)
    write_batches(constructed_set(tmp_path / "cut", rows=2), order[:3])           # stopped after row 1's batch 0
    resumed = constructed_set(tmp_path / "cut", rows=2, resume=True)
    assert [resumed.batches(row) for row in (0, 1)] == [{0, 1}, {0}]
    assert [r["index"] for r in manifest(tmp_path / "cut")] == ["0", "1", "2", "3", "4"]
    write_batches(resumed, [(1, 1)])
    assert manifest(tmp_path / "cut") == manifest(tmp_path / "whole")


@pytest.mark.parametrize("cut", ["after-a-whole-line-inside-a-batch", "inside-the-last-field"])
def test_a_manifest_cut_by_a_kill_resumes_from_its_whole_batches_only(tmp_path, cut):
    """A kill while a batch's rows are appended leaves any prefix of them: a whole line of a batch whose other line
    is missing, or a last line cut inside its last field (`ddi`, no newline), which the csv reader takes whole."""
    write_batches(constructed_set(tmp_path / "whole", num=4), [(0, 0), (0, 1)])
    write_batches(constructed_set(tmp_path / "cut", num=4), [(0, 0), (0, 1)])
    lines = (tmp_path / "cut" / "manifest.csv").read_text().splitlines(keepends=True)
    assert lines[-1].startswith("all/sub-000003.npz,") and lines[-1].endswith(",ddim\n")   # batch 1's second line
    kept = "".join(lines[:-1]) if cut == "after-a-whole-line-inside-a-batch" else "".join(lines)[:-2]
    (tmp_path / "cut" / "manifest.csv").write_text(kept)
    resumed = constructed_set(tmp_path / "cut", num=4, resume=True)
    assert resumed.batches(0) == {0} and manifest(tmp_path / "cut") == manifest(tmp_path / "whole")[:2]
    write_batches(resumed, [(0, 1)])                                              # batch 1 drawn again, whole
    assert manifest(tmp_path / "cut") == manifest(tmp_path / "whole")


def test_replacing_a_set_never_deletes_a_file_outside_it_that_its_manifest_names(tmp_path):
    folder = tmp_path / "set"
    write_batches(constructed_set(folder), [(0, 0)])
    outside, elsewhere = tmp_path / "outside.npz", tmp_path / "scans" / "sub-01.npz"
    elsewhere.parent.mkdir()
    for path in (outside, elsewhere):
        path.write_bytes(b"a user's own file")
    lines = (folder / "manifest.csv").read_text().splitlines(keepends=True)   # edited, or crafted, to name them
    lines[2] = lines[2].replace("all/sub-000001.npz", "../outside.npz")
    lines.append(lines[1].replace("all/sub-000000.npz", str(elsewhere)))
    (folder / "manifest.csv").write_text("".join(lines))
    assert [r["file"] for r in manifest(folder)] == ["all/sub-000000.npz", "../outside.npz", str(elsewhere)]
    constructed_set(folder)                                # a new set replaces this one's files, and only those
    assert outside.read_bytes() == elsewhere.read_bytes() == b"a user's own file"
    assert not (folder / "all").exists() and manifest(folder) == []


# ----------------------------------------------------------------------------- NIfTI

def test_a_nifti_sample_is_shown_as_the_training_slices_were_and_reads_back(tmp_path):
    image = np.linspace(-1, 1, 24 * 24, dtype=np.float32).reshape(24, 24)
    image[:6, :3], image[-1, -1] = 1, -1                        # a corner marks which way is up and which is left
    geometry = SampleGeometry("sagittal", 0.9, 10.0, 500.0, known=True)
    path = tmp_path / "s.nii.gz"
    nib.save(slice_volume(image, geometry), path)
    img = nib.load(path)
    assert img.shape == (1, 24, 24) and nib.aff2axcodes(img.affine) == ("R", "A", "S")
    assert np.allclose(img.header.get_zooms(), 0.9) and img.header["sform_code"] == img.header["qform_code"] == 2
    assert np.allclose(img.affine[:3, 3], -np.array([0, 23, 23]) / 2 * 0.9, atol=1e-5)   # the origin at the image's centre
    assert b"no scanner space" in img.header["descrip"].tobytes()
    voxels = np.asarray(img.dataobj)
    assert np.isclose(voxels.min(), 10.0) and np.isclose(voxels.max(), 500.0)   # the training intensity range
    assert np.allclose(read_slice(path), image, atol=1e-5)
    nib.save(nib.Nifti1Image(voxels * 3, img.affine), tmp_path / "elsewhere.nii.gz")   # no range: -1 and +1 unknown
    nib.save(nib.Nifti1Image(np.repeat(voxels, 2, 0), img.affine), tmp_path / "volume.nii.gz")
    for name in ("elsewhere.nii.gz", "volume.nii.gz"):
        with pytest.raises(BadInputError, match=f"{name} .* is not a slice written by `sample --format nifti`"):
            read_slice(tmp_path / name)
    # the volume reader shows it as the training slices: the same image, the marked corner top left
    shown, _ = read_volume_slices(path, 24, slicing=Slicing("sagittal", percentiles=(0, 100), crop_foreground=False))
    assert np.abs(shown[0, 0].numpy() / 127.5 - 1 - image).max() <= 1 / 127.5 + 1e-6


def test_the_nifti_geometry_comes_from_the_training_volumes(tmp_path, trained_run):
    blob = np.zeros((16, 20, 12), dtype=np.float32)
    blob[2:14, 2:18, 2:10] = 100
    for k in range(2):
        write_volume(tmp_path / "vols" / "AD" / f"sub-{k}.nii.gz", blob + k, affine=np.diag([2.0, 1.5, 3.0, 1.0]))
    slicing = Slicing("axial", crop_foreground=False)
    geometry = training_geometry([str(p) for p in sorted((tmp_path / "vols").rglob("*.nii.gz"))], slicing, 40)
    assert geometry.known and geometry.axis == "axial"
    assert geometry.spacing == pytest.approx(max(16 * 2.0, 20 * 1.5) / 40)          # the plane fitted into 40 px
    data = DataConfig(str(tmp_path / "vols"), image_size=40, slicing=slicing)
    assert run_geometry(data) == geometry
    (tmp_path / "vols" / "AD" / "sub-00.nii.gz").write_bytes(b"corrupt")    # listed first, left out in training
    skipped = DataConfig(str(tmp_path / "vols"), image_size=40, slicing=slicing, skip_bad_images=True)
    assert run_geometry(skipped) == geometry
    assert "sub-00.nii.gz" in str(pytest.raises(BadInputError, run_geometry, data).value)   # trained without skipping
    _, images = trained_run                                    # 2D images: plane and spacing assumed, said so
    assert run_geometry(DataConfig(str(images), image_size=32)) == SampleGeometry()
    assert "assumed" in SampleGeometry().description()


def test_sample_writes_nifti_in_the_runs_geometry(trained_run, tmp_path):
    run, _ = trained_run
    images = predict.predict(predict.parse_args(["--run", str(run), "--out", str(tmp_path), "--num", "2", "--format",
                                                 "nifti", *FAST]))
    files = sorted((tmp_path / "samples" / "all").iterdir())
    assert [f.name for f in files] == ["sub-000000.nii.gz", "sub-000001.nii.gz"]
    img = nib.load(files[0])
    assert img.shape == (32, 32, 1) and img.header["cal_max"] == 255 and np.allclose(img.header.get_zooms(), 1.0)
    assert torch.allclose(read_sample(files[1]), images[1], atol=1e-5)
    # `evaluate --samples` reads such a folder as it reads images (the manifest and settings beside them ignored)
    from evaluation.sample_folder import read_folder
    assert torch.allclose(read_folder(tmp_path / "samples", 32, 1)[0], images, atol=1e-5)
    # a resumed set keeps the geometry it was written with (the run's data may be elsewhere, or gone)
    settings = json.loads((tmp_path / "samples" / "sampling.json").read_text())
    assert settings["geometry"] == {"axis": "axial", "spacing": 1.0, "low": 0.0, "high": 255.0, "known": False}
    settings["geometry"].update(spacing=0.7, known=True)          # as if the volumes it was trained on said so
    (tmp_path / "samples" / "sampling.json").write_text(json.dumps(settings))
    files[1].unlink()
    predict.predict(predict.parse_args(["--run", str(run), "--out", str(tmp_path), "--num", "2", "--format", "nifti",
                                        "--resume", *FAST]))
    assert np.allclose(nib.load(files[1]).header.get_zooms(), 0.7)


def test_stage_1_saves_the_nifti_geometry_so_that_a_run_without_its_data_writes_nifti(volume_folder, tmp_path):
    """The training volumes' pixel size and intensity range are saved with stage 1 (vqvae.pt), and a resumed stage 1
    keeps them: samples of a run whose data is gone are written in them."""
    run = tmp_path / "run"
    vqvae(run, volume_folder, "--max-steps", "2")
    saved = ckpt(run / "vqvae.pt")["sample_geometry"]
    geometry = run_geometry(DataConfig.of_run(run))
    assert saved == asdict(geometry) and geometry.known and geometry.spacing != 1.0
    vqvae(run, volume_folder, "--max-steps", "4", "--resume")
    assert ckpt(run / "vqvae.pt")["sample_geometry"] == saved
    unet(run, "--max-steps", "2")
    volume_folder.rename(tmp_path / "gone")
    predict.main(["--run", str(run), "--num", "1", "--format", "nifti", "--out", str(tmp_path / "s"), *FAST])
    header = nib.load(next((tmp_path / "s" / "samples" / "all").glob("*.nii.gz"))).header
    assert np.allclose(header.get_zooms(), geometry.spacing) and header["cal_max"] == pytest.approx(geometry.high)


def test_a_nifti_set_of_a_run_whose_data_moved_takes_the_data_from_data_and_never_assumes(trained_run, tmp_path):
    """The headers' pixel size and intensity range are the training volumes': of a run whose stage 1 did not save
    them (before 2026-12-08) with its data gone from where it was, --format nifti is refused naming --data (review:
    it wrote 1 mm pixels and 0-255 for a run trained at 3 mm, and refused --data without --cohort); with --data at
    the moved folder, checked to hold stage 1's files, it writes."""
    from runtime.checkpoint import atomic_save
    run, data = trained_run
    copy, moved = tmp_path / "run", tmp_path / "moved"
    shutil.copytree(run, copy)
    shutil.copytree(data, moved)
    vq = ckpt(copy / "vqvae.pt")
    vq["data_config"]["root"] = vq["data"] = str(tmp_path / "gone")
    del vq["sample_geometry"]                                   # a stage 1 of before 2026-12-08
    atomic_save(vq, copy / "vqvae.pt")
    base = ["--run", str(copy), "--num", "1", "--format", "nifti", *FAST]
    message = error_of(predict.main, [*base, "--out", str(tmp_path / "a")])
    assert "--format nifti gives each header the pixel size" in message and "--data" in message
    assert not (tmp_path / "a" / "samples").exists()
    predict.main([*base, "--out", str(tmp_path / "b"), "--data", str(moved)])
    assert len(list((tmp_path / "b" / "samples" / "all").glob("*.nii.gz"))) == 1
    (moved / "train" / "AD" / "extra.jpeg").write_bytes((moved / "train" / "AD").iterdir().__next__().read_bytes())
    assert "does not hold the files" in error_of(predict.main, [*base, "--out", str(tmp_path / "c"), "--data",
                                                                str(moved)])
    assert "without those sample reads neither" in error_of(predict.main, ["--run", str(copy), "--data", str(moved)])


def test_sample_refuses_a_format_it_does_not_know(trained_run):
    run, _ = trained_run
    with pytest.raises(SystemExit):
        predict.parse_args(["--run", str(run), "--format", "dicom"])


def test_evaluate_reads_a_sample_set_as_its_manifest_lists_it(trained_run, tmp_path):
    from evaluation.sample_folder import read_folder
    run, _ = trained_run
    drawn = predict.predict(predict.parse_args(["--run", str(run), "--num", "3", "--format", "npz", *FAST,
                                                "--out", str(tmp_path)]))
    (tmp_path / "samples" / "all" / "sub-000007.npz").write_bytes((tmp_path / "samples" / "all" /
                                                                    "sub-000000.npz").read_bytes())  # not listed
    for folder in (tmp_path, tmp_path / "samples"):            # not samples.png beside them, not the unlisted file
        assert torch.allclose(read_folder(folder, 32, 1)[0], drawn, atol=1e-6)
    manifest_file = tmp_path / "samples" / "manifest.csv"
    whole = manifest_file.read_text()
    manifest_file.write_text(whole[:-10])                      # its last line cut by a kill: an unfinished set
    assert "holds 2 of its 3 samples (an interrupted set)" in str(pytest.raises(
        BadInputError, read_folder, tmp_path, 32, 1).value)


def test_a_value_read_back_empty_from_the_manifest_is_n_a_in_the_participants_table():
    from export.sample_set import _csv                      # how --resume rewrites the table from the manifest's rows
    rows = [{"participant_id": "sub-000000", "age": ""}, {"participant_id": "sub-000001", "age": "61"}]
    assert _csv(["participant_id", "age"], rows, "\t", "n/a").splitlines()[1:] == ["sub-000000\tn/a", "sub-000001\t61"]


def test_a_condition_named_like_a_manifest_column_is_refused_not_written_over(tmp_path):
    from conditions.table import Condition
    settings = {"num": 1, "batch_size": 1, "format": "png", "seed": 0}
    for name in ("seed", "batch_size"):                        # a fixed column, and one of the record's
        with pytest.raises(BadInputError, match=f"conditioned on {name}, which the manifest names"):
            SampleSet(tmp_path / "set", settings, [("", None)], [Condition(name, "continuous", low=0.0, high=1.0)],
                      {"batch_size": 1})
    assert not (tmp_path / "set").exists()


# ----------------------------------------------------------------------------- samples withheld (possible copies)

def test_a_withheld_sample_leaves_the_set_and_its_tables_and_is_not_drawn_again(conditioned_run, tmp_path):
    """`withhold` (evaluate --withhold-flagged): the file deleted, its manifest and participants.tsv rows moved into
    withheld.csv with what flagged it; --resume draws nothing in its place, the grid skips it, evaluate counts it
    as drawn; withholding again changes nothing; a new set starts without it."""
    from evaluation.sample_folder import sample_files
    from export.sample_set import withheld_rows, withhold
    run, _ = conditioned_run
    flags = ["--run", str(run), "--out", str(tmp_path), "--num", "3", "--batch-size", "2", "--class", "AD",
             "--set", "age=60", *FAST]
    predict.predict(predict.parse_args(flags))
    grid = Image.open(tmp_path / "samples.png").size                                   # 3 images: 2 rows of 2
    folder = tmp_path / "samples"
    rows, table = manifest(folder), (folder / "participants.tsv").read_text().splitlines()
    why = {"flagged_by": "pixels", "correlation": "0.999"}
    assert withhold(folder, {"AD/sub-000001.png": why}) == 1
    assert not (folder / "AD" / "sub-000001.png").exists() and (folder / "AD" / "sub-000000.png").is_file()
    assert manifest(folder) == [rows[0], rows[2]]
    assert (folder / "participants.tsv").read_text().splitlines() == [table[0], table[1], table[3]]
    assert withheld_rows(folder) == [{**rows[1], **why}]
    assert withhold(folder, {}) == 1 and manifest(folder) == [rows[0], rows[2]]        # again: nothing changes
    assert withhold(folder, {"AD/sub-000001.png": why}) == 1 and len(withheld_rows(folder)) == 1
    assert "lists no AD/sub-000009.png" in str(pytest.raises(BadInputError, withhold, folder,
                                                             {"AD/sub-000009.png": why}).value)
    # evaluate reads the two left, and knows the set whole; --resume draws nothing, and its grid shows the two
    assert [f.name for f in sample_files(tmp_path)[1]] == ["sub-000000.png", "sub-000002.png"]
    predict.predict(predict.parse_args([*flags, "--resume"]))
    assert not (folder / "AD" / "sub-000001.png").exists() and manifest(folder) == [rows[0], rows[2]]
    width, height = Image.open(tmp_path / "samples.png").size                          # 2 images: 1 row of 2
    assert width == grid[0] and height < grid[1]
    # a new set (no --resume) is whole again, and withholds nothing
    predict.predict(predict.parse_args(flags))
    assert not (folder / "withheld.csv").exists() and [r["file"] for r in manifest(folder)] == [
        r["file"] for r in rows] and (folder / "AD" / "sub-000001.png").is_file()


def test_withholding_cut_short_by_a_kill_is_finished_by_withholding_again(tmp_path):
    """A kill after withheld.csv was written and before the manifest lost the row: the set reads as if the sample
    were gone (evaluate, --resume), and withholding again removes the row and the file."""
    from evaluation.sample_folder import sample_files
    from export.sample_set import withheld_rows, withhold
    folder = tmp_path / "samples"
    write_batches(constructed_set(folder, num=3, batch_size=2), [(0, 0), (0, 1)])
    rows = manifest(folder)
    (folder / "withheld.csv").write_text("file,index,flagged_by\nall/sub-000001.npz,1,features\n")
    assert [f.name for f in sample_files(tmp_path)[1]] == ["sub-000000.npz", "sub-000002.npz"]
    resumed = constructed_set(folder, num=3, batch_size=2, resume=True)
    assert resumed.batches(0) == {0, 1} and manifest(folder) == [rows[0], rows[2]]   # the row left out, not redrawn
    assert withhold(folder, {}) == 1 and not (folder / "all" / "sub-000001.npz").exists()
    assert [r["file"] for r in withheld_rows(folder)] == ["all/sub-000001.npz"]


def test_a_withholding_cut_short_is_finished_by_resume_and_leaves_no_empty_folder_nor_figure_showing_it(tmp_path):
    """A kill after the rows left and before the file went: --resume deletes the file (--data reads every file in a
    class folder). A class folder withholding empties goes (--data refuses an empty one), and so do samples.png and
    denoise.gif beside the set, which show its first samples; withholding nothing new leaves a grid drawn again."""
    from export.sample_set import withhold
    folder = tmp_path / "samples"
    write_batches(constructed_set(folder, num=3, batch_size=2), [(0, 0), (0, 1)])
    (folder / "withheld.csv").write_text("file,index,flagged_by\nall/sub-000001.npz,1,features\n")
    constructed_set(folder, num=3, batch_size=2, resume=True)
    assert not (folder / "all" / "sub-000001.npz").exists() and (folder / "all" / "sub-000000.npz").is_file()
    for figure in ("samples.png", "denoise.gif"):
        (tmp_path / figure).write_bytes(b"the first samples")
    assert withhold(folder, {f"all/sub-00000{k}.npz": {"flagged_by": "pixels"} for k in (0, 2)}) == 3
    assert not (folder / "all").exists() and not (tmp_path / "samples.png").exists()
    assert not (tmp_path / "denoise.gif").exists()
    (tmp_path / "samples.png").write_bytes(b"drawn again by --resume")
    assert withhold(folder, {}) == 3 and (tmp_path / "samples.png").is_file()


def test_a_new_set_killed_as_it_starts_keeps_nothing_the_set_before_it_withheld(tmp_path, monkeypatch):
    """A kill after a new set's sampling.json is written: the earlier set's withheld.csv is already gone, so that
    --resume draws every sample of the new set (a stale one would leave its samples out as withheld)."""
    from export import sample_set
    folder = tmp_path / "samples"
    write_batches(constructed_set(folder, num=3, batch_size=1), [(0, 0), (0, 1), (0, 2)])
    sample_set.withhold(folder, {"all/sub-000001.npz": {"flagged_by": "pixels"}})
    write = sample_set._write_atomically

    def killed_after_the_settings(path, text):
        write(path, text)
        if path.name == "sampling.json":
            raise KeyboardInterrupt

    monkeypatch.setattr(sample_set, "_write_atomically", killed_after_the_settings)
    with pytest.raises(KeyboardInterrupt):
        constructed_set(folder, num=3, batch_size=1)                  # a new set, no --resume
    monkeypatch.undo()
    assert constructed_set(folder, num=3, batch_size=1, resume=True).batches(0) == set()


# ----------------------------------------------------------------------------- the set's card

def test_a_whole_set_has_a_card_saying_what_it_is_how_it_was_drawn_and_that_it_was_not_screened(conditioned_run,
                                                                                                   tmp_path):
    """dataset_card.md, from the set's own files: counts per class folder, the run's fingerprints and sampler, each
    condition (a category's counts, a covariate's range); screened or not; names no training image. A new set in
    the folder starts without the card and checks of the one before."""
    from export.card import write_card
    run, _ = conditioned_run
    flags = ["--run", str(run), "--out", str(tmp_path), "--num", "3", "--batch-size", "2", "--class", "all", *FAST]
    predict.predict(predict.parse_args(flags))
    folder = tmp_path / "samples"
    card = (folder / "dataset_card.md").read_text()
    settings = json.loads((folder / "sampling.json").read_text())
    assert "6 synthetic 2D slices (png files; 3 in AD/, 3 in NC/)" in card and "none of them is a scan" in card
    assert f"the UNet at step {settings['unet_step']} (weights' fingerprint {settings['unet_fingerprint']})" in card
    assert f"decoded by the VQ-VAE {settings['vqvae_fingerprint']}" in card and "| sampler | ddim, 3 steps" in card
    assert "| class | AD 3, NC 3 |" in card and "## Not screened for copies of training patients" in card
    assert "| age | left open (drawn without it) |" in card                    # --class all: age and sex left open
    assert "## Usefulness not measured" in card and "withheld" not in card.split("## Files")[1]
    ages = tmp_path / "ages"
    predict.predict(predict.parse_args(["--run", str(run), "--out", str(ages), "--num", "2", "--class", "AD", *FAST,
                                        "--sweep", "age=60,70"]))
    assert "| age | 60 2, 70 2 |" in (ages / "samples" / "dataset_card.md").read_text()     # few values: counted
    from export.card import _conditions                       # many: a range; categories coded as numbers: counted
    rows = [{"file": "", "row": "", "age": str(55 + k), "sex": "12"[k % 2], "site": "", "seed": ""} for k in range(8)]
    assert _conditions(rows) == [("age", "55 to 62, mean 58.5"), ("sex", "1 4, 2 4"),
                                 ("site", "left open (drawn without it)")]
    from export.sample_set import withhold
    withhold(folder, {"NC/sub-000004.png": {"flagged_by": "pixels"}})          # screened before the card's checks
    write_card(folder)
    card = (folder / "dataset_card.md").read_text()
    assert "5 synthetic 2D slices (png files; 3 in AD/, 2 in NC/)" in card and "1 more was drawn and left out" in card
    assert "1 sample was left out as possible copies" in card and "thresholds were not kept" in card
    from export.card import record_checks                                      # screened: the card says by what
    repeat = {"subject": "344370", "flagged": 20, "images": 20, "nearest_training_subject": "344365",
              "nearest_count": 20}
    other = {"subject": "874865", "flagged": 6, "images": 20, "nearest_training_subject": "344365", "nearest_count": 11}
    floor = {"count": 400, "flagged_features": 0.0125, "flagged_pixels": 0.0825, "flagged_subjects": [repeat, other]}
    record_checks(folder, {"percentile": 1.0, "thresholds": {"distance": 0.295, "correlation": 0.9586},
                           "rows": {"samples": {"count": 6}, "real (held out, B)": floor}, "withheld": 1}, None, run)
    checks, card = json.loads((folder / "checks.json").read_text()), (folder / "dataset_card.md").read_text()
    assert checks["screen"]["held_out_flagged"]["likely_repeat_scans"] == 20      # the subject flagged on every image
    assert "pixel correlation above 0.9586" in card and "1 withheld in all" in card and "8.2% (pixels)" in card
    assert "20 of those flagged images are of held-out subjects flagged on most of their images" in card
    assert "344370" not in card and "344365" not in card and "## Usefulness not measured" in card  # no subject named
    screen = {"percentile": 1.0, "thresholds": {"distance": 0.295, "correlation": 0.9586},
              "rows": {"samples": {"count": 6}, "real (held out, B)": floor}, "withheld": 1}
    record_checks(folder, screen, {"conditions_table": "| age | synthetic, the set | 5 |"}, run,
                  {"rows": [], "table": "| age | the set | 5 | 0.412 |"})    # a set in all/: the table's conditions
    card = (folder / "dataset_card.md").read_text()
    assert "## Do the images show the values they were drawn at?" in card and "| age | the set | 5 | 0.412 |" in card
    assert "| age | synthetic, the set | 5 |" in card and "classifier trained on" not in card
    (folder / "checks.json").write_text("{}")
    predict.predict(predict.parse_args(flags))                                 # a new set: none of the old record
    assert not (folder / "checks.json").exists() and "Not screened" in (folder / "dataset_card.md").read_text()


def test_a_row_whose_samples_were_all_withheld_is_left_out_of_the_grid(conditioned_run, tmp_path, capsys):
    """... and with every row withheld there is no grid, and `sample` does not say it wrote one."""
    from export.sample_set import withhold
    run, _ = conditioned_run
    flags = ["--run", str(run), "--out", str(tmp_path), "--num", "2", "--batch-size", "2", "--class", "AD",
             "--sweep", "age=60,70", *FAST]
    predict.predict(predict.parse_args(flags))
    height = Image.open(tmp_path / "samples.png").size[1]                              # 2 rows
    withhold(tmp_path / "samples", {f"AD/sub-00000{k}.png": {"flagged_by": "pixels"} for k in (2, 3)})  # row 2's
    predict.predict(predict.parse_args([*flags, "--resume"]))
    assert Image.open(tmp_path / "samples.png").size[1] == height // 2                 # 1 row
    withhold(tmp_path / "samples", {f"AD/sub-00000{k}.png": {"flagged_by": "pixels"} for k in (0, 1)})  # row 1's
    capsys.readouterr()
    predict.predict(predict.parse_args([*flags, "--resume"]))
    assert not (tmp_path / "samples.png").exists()
    printed = capsys.readouterr().out
    assert "wrote no samples.png (every sample it would show is withheld), 0 images as png in" in printed
    card = (tmp_path / "samples" / "dataset_card.md").read_text()
    assert "No slice is left in this set: all 4 drawn were left out as possible copies" in card


def test_a_batch_drawn_again_after_a_withholding_leaves_its_withheld_sample_out(tmp_path):
    """Another file of a withheld sample's batch lost: --resume draws the batch again, from the same seed, and the
    withheld sample (a possible copy) is not written back into the set, where evaluate would never screen it."""
    from evaluation.sample_folder import sample_files
    from export.sample_set import withhold
    folder = tmp_path / "samples"
    write_batches(constructed_set(folder, num=4, batch_size=2), [(0, 0), (0, 1)])
    withhold(folder, {"all/sub-000001.npz": {"flagged_by": "pixels"}})
    (folder / "all" / "sub-000000.npz").unlink()
    resumed = constructed_set(folder, num=4, batch_size=2, resume=True)
    assert resumed.batches(0) == {1}
    write_batches(resumed, [(0, 0)])
    assert not (folder / "all" / "sub-000001.npz").exists()
    assert sorted(r["file"] for r in manifest(folder)) == [f"all/sub-00000{k}.npz" for k in (0, 2, 3)]
    assert [f.name for f in sample_files(folder)[1]] == ["sub-000002.npz", "sub-000003.npz", "sub-000000.npz"]
