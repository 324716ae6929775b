"""Evaluation: metrics on constructed cases with known answers, the subject split, `driver.py evaluate` end to end."""
import csv
import json
import math
import shutil
from collections import Counter

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from torchvision.utils import save_image

import driver
import predict
from evaluation.evaluate import class_scores, evaluation_split
from evaluation.report import central_crops, format_level_table, format_table
from evaluation.metrics import (ClassifierFeatures, SetScorer, _laplacian_pyramid, ms_ssim_diversity,
                                sliced_wasserstein)
from evaluation.classifier import ClassifierConfig, SliceClassifier
from conftest import error_of
from runtime.checkpoint import fingerprint
from runtime.models import load_run
from volumes.layouts import subject_id


def ellipses(n, size=32, seed=0, blur=False):
    """Bright textured ellipses of random shape on a dark background, (n, 1, size, size) in [-1, 1]."""
    g = torch.Generator().manual_seed(seed)
    yy, xx = torch.meshgrid(torch.linspace(-1, 1, size), torch.linspace(-1, 1, size), indexing="ij")
    a, b = 0.4 + 0.4 * torch.rand(n, 1, 1, generator=g), 0.4 + 0.4 * torch.rand(n, 1, 1, generator=g)
    inside = ((xx / a) ** 2 + (yy / b) ** 2 < 1).float()
    images = (inside * (0.6 + 0.3 * torch.randn(n, size, size, generator=g)) - (1 - inside)).clamp(-1, 1)[:, None]
    return F.avg_pool2d(images, 5, 1, 2) if blur else images


class Flatten(nn.Module):
    """Identity features: FID becomes the Frechet distance of the pixel vectors, known in closed form."""

    def __init__(self, num_features):
        super().__init__()
        self.num_features = num_features

    def forward(self, x):
        return x.flatten(1).double()


def test_fid_matches_the_closed_form_for_gaussians():
    """FID(N(0, I), N(mu, s^2 I)) = |mu|^2 + d (1 - s)^2 in d dimensions (Dowson & Landau 1982)."""
    g = torch.Generator().manual_seed(0)
    d, n = 4, 20000
    a = torch.randn(n, 1, 2, 2, generator=g)
    b = 0.5 + 2.0 * torch.randn(n, 1, 2, 2, generator=g)
    fid = SetScorer(Flatten(d), a)(b)["fid"]
    assert fid == pytest.approx(d * 0.5 ** 2 + d * (1 - 2.0) ** 2, rel=0.05)


def test_identical_sets_score_zero_and_degraded_sets_score_worse():
    torch.manual_seed(0)
    features = ClassifierFeatures(SliceClassifier(ClassifierConfig(input_size=32, num_classes=2)))  # random, no download
    reference = ellipses(120, seed=0)
    scorer = SetScorer(features, reference)
    same = scorer(reference)
    fresh = scorer(ellipses(120, seed=1))  # same distribution, other draw
    blurred = scorer(ellipses(120, seed=1, blur=True))
    darker = scorer(ellipses(120, seed=1) * 0.5 - 0.5)
    flatter = scorer(ellipses(120, seed=1) * 0.5)  # lower contrast: invisible to features normalised from the first layer
    # KID's unbiased estimate scatters around 0 (measured -0.001 for identical sets, 0.016 for blur)
    assert abs(same["fid"]) < 1e-3 and abs(same["kid"]) < 0.1 * blurred["kid"]
    # measured FID ratios to the fresh draw: blur 3.4x, darker 2.2x, lower contrast 1.4x
    assert blurred["fid"] > 2.5 * fresh["fid"] and darker["fid"] > 1.7 * fresh["fid"] and flatter["fid"] > 1.2 * fresh["fid"]
    assert min(blurred["kid"], darker["kid"], flatter["kid"]) > fresh["kid"] + 0.002


def test_swd_is_zero_on_identical_sets_symmetric_and_sees_blur():
    a, b = ellipses(64, seed=0), ellipses(64, seed=1)
    zero = sliced_wasserstein(a, a.clone())
    assert all(v == 0 for v in zero.values())
    assert set(zero) == {"swd", "swd_32", "swd_16"}  # one band-pass level per octave down to 16, then the residual
    assert sliced_wasserstein(a, b)["swd"] == pytest.approx(sliced_wasserstein(b, a)["swd"], rel=1e-6)
    assert sliced_wasserstein(a, ellipses(64, seed=1, blur=True))["swd_32"] > 3 * sliced_wasserstein(a, b)["swd_32"]


def test_kid_is_the_same_whatever_ran_before_it():
    """torchmetrics draws KID's subsets from the global generator: a row's KID must not depend on the state it is in."""
    scorer = SetScorer(Flatten(16), ellipses(60, size=4, seed=0))
    torch.manual_seed(1)
    first = scorer(ellipses(60, size=4, seed=1))
    torch.manual_seed(2)
    torch.rand(7)
    assert scorer(ellipses(60, size=4, seed=1)) == first


def test_swd_of_sets_of_different_sizes_compares_a_random_draw_of_the_larger_not_its_first_images():
    bright, dark = ellipses(30, seed=0), ellipses(30, seed=1) * 0.3 - 0.7
    a = torch.cat([bright, dark])                       # folder order: one kind, then the other
    b = torch.cat([ellipses(15, seed=2), ellipses(15, seed=3) * 0.3 - 0.7])
    both_halves = sliced_wasserstein(b, a)["swd"]
    assert both_halves < 0.5 * sliced_wasserstein(b, a[:30])["swd"]   # the first 30 of a alone are all bright
    assert both_halves == sliced_wasserstein(a, b)["swd"]              # still symmetric


def test_ms_ssim_takes_as_many_scales_as_torchmetrics_allows_at_every_image_size():
    for size in (16, 24, 32, 48, 64, 96, 128, 168, 256):
        assert 0 <= ms_ssim_diversity(torch.rand(4, 1, size, size) * 2 - 1, pairs=4) <= 1   # 96 and 168 px raised


def test_swd_per_level_is_zero_for_identical_sets_and_sees_a_finest_band_blur_at_the_finest_level():
    a, b = ellipses(64, size=64, seed=0), ellipses(64, size=64, seed=1)
    zero = sliced_wasserstein(a, a.clone())
    assert set(zero) == {"swd", "swd_64", "swd_32", "swd_16"} and all(v == 0 for v in zero.values())
    # a 3x3 box blur removes mostly the finest octave: the finest level moves far beyond a fresh draw, the low-pass hardly
    blurred = sliced_wasserstein(a, F.avg_pool2d(b, 3, 1, 1, count_include_pad=False))
    fresh = sliced_wasserstein(a, b)
    assert blurred["swd_64"] > 3 * fresh["swd_64"] and blurred["swd_64"] > 3 * blurred["swd_16"]
    assert blurred["swd_64"] - fresh["swd_64"] > 5 * abs(blurred["swd_16"] - fresh["swd_16"])


def test_level_table_has_one_row_per_set_and_one_column_per_level_finest_first():
    row = lambda v: {"swd": v, "swd_64": 3 * v, "swd_16": v, "swd_32": 2 * v}  # noqa: E731
    table = format_level_table({"samples": row(10.0), "real (floor)": row(1.0)})
    assert table.splitlines()[0] == "| images | 64 px (finest band) | 32 px | 16 px (low-pass) |"
    assert "| samples | 30.0 | 20.0 | 10.0 |" in table and "| real (floor) | 3.0 | 2.0 | 1.0 |" in table
    x = torch.arange(2 * 10 * 10.0).view(2, 1, 10, 10)
    assert torch.equal(central_crops(x, 4), x[..., 3:7, 3:7])


def test_laplacian_pyramid_reconstructs_the_image():
    x = ellipses(4, size=64)
    levels = _laplacian_pyramid(x)
    assert [lv.shape[-1] for lv in levels] == [64, 32, 16]
    k = torch.tensor([1.0, 4.0, 6.0, 4.0, 1.0]) / 16
    kernel = (k[:, None] * k[None, :]).expand(1, 1, 5, 5)
    recon = levels[-1]
    for band in reversed(levels[:-1]):  # expand: zero-insert, blur x 4, add the band
        up = torch.zeros_like(band)
        up[..., ::2, ::2] = recon * 4
        recon = band + F.conv2d(F.pad(up, (2, 2, 2, 2), mode="reflect"), kernel)
    assert torch.allclose(recon, x, atol=1e-5)


def test_ms_ssim_diversity_of_two_images_is_their_ms_ssim_never_an_images_with_itself():
    """Pairs are distinct: of two images every pair is (a, b) or (b, a), and MS-SSIM is symmetric. A pair of an image
    with itself (1) would raise the mean towards 1, reading as mode collapse."""
    from evaluation.metrics import ms_ssim_metric
    pair = ellipses(2, size=32, seed=3)
    alone = ms_ssim_metric(32)(pair[:1], pair[1:]).item()
    assert alone < 0.9 and ms_ssim_diversity(pair, pairs=16) == pytest.approx(alone, abs=1e-5)


def test_ms_ssim_diversity_is_one_for_copies_and_lower_for_varied_images():
    varied = ellipses(40, size=64)
    assert ms_ssim_diversity(varied[:1].repeat(40, 1, 1, 1), pairs=50) == pytest.approx(1.0, abs=1e-4)
    assert ms_ssim_diversity(varied, pairs=200) < 0.9


def test_evaluation_split_keeps_every_subject_on_one_side():
    paths = [f"/d/train/AD/s{s:02d}_{k}.jpeg" for s in range(30) for k in range(5)]
    train, ref, floor = evaluation_split(paths, holdout=0.2, seed=3)
    sides = [{subject_id(paths[i]) for i in part} for part in (train, ref, floor)]
    assert sorted(train + ref + floor) == list(range(len(paths)))
    assert not (sides[0] & sides[1]) and not (sides[0] & sides[2]) and not (sides[1] & sides[2])
    assert len(sides[1]) == 3 and len(sides[2]) == 3
    assert evaluation_split(paths, 0.2, 3) == (train, ref, floor)  # seeded
    assert evaluation_split(paths, 0.2, 4)[1] != ref


def test_evaluation_halves_are_drawn_within_classes_where_the_run_s_layout_says_so():
    """Layout version 5 deals each class's held-out subjects to the halves in turn: their class mixes differ by one
    subject at most, where halving by subject alone gave the ADNI subset's NC 40% of A and 75% of B."""
    paths = [f"/d/{c}/{c}{s:02d}_{k}.png" for c, n in (("AD", 30), ("NC", 30)) for s in range(n) for k in range(2)]
    labels = [p.split("/")[2] for p in paths]
    spread = []
    for seed in range(10):
        train, ref, floor = evaluation_split(paths, 0.3, seed, labels=labels)
        mixes = [Counter(labels[i] for i in half) for half in (ref, floor)]
        assert abs(mixes[0]["AD"] - mixes[1]["AD"]) <= 2 and abs(mixes[0]["NC"] - mixes[1]["NC"]) <= 2  # 2 images
        assert sorted(train + ref + floor) == list(range(len(paths)))
        by_subject = [Counter(labels[i] for i in half) for half in evaluation_split(paths, 0.3, seed)[1:]]
        spread.append(abs(by_subject[0]["AD"] - by_subject[1]["AD"]))
    assert max(spread) > 2                                                   # by subject alone, mixes drift apart


def test_format_table_states_the_ratio_to_the_floor():
    row = lambda fid: {"fid": fid, "kid": 0.01, "kid_std": 0.001, "swd": 20.0, "ms_ssim": 0.3, "count": 10}  # noqa: E731
    table = format_table({"samples": row(8.0), "real (training)": row(1.0), "real (floor)": row(2.0)})
    assert "| samples | 10 | 8.000 (8.0x / 4.0x) |" in table and "| 20.0 (1.0x / 1.0x) |" in table
    assert "| real (floor) | 10 | 2.000 |" in table
    # a real row's KID at or below 0 gives no ratio; its place keeps a dash, so the other one is not read as it
    kid = lambda k: {**row(1.0), "kid": k}  # noqa: E731
    table = format_table({"samples": kid(0.02), "real (training)": kid(-0.001), "real (floor)": kid(0.01)})
    assert "| 20.00 ± 1.00 (– / 2.0x) |" in table


def test_evaluate_end_to_end_writes_metrics_and_report(trained_run, tmp_path, capsys):
    run, data = trained_run
    out = tmp_path / "eval"
    driver.main(["evaluate", "--run", str(run), "--out", str(out), "--holdout", "0.5", "--features", "domain",
                 "--classifier-steps", "0", "--steps", "5", "--seed", "3", "--batch-size", "4"])
    printed = capsys.readouterr().out
    assert "trained on all subjects" in printed and "| samples |" in printed
    metrics = json.loads((out / "metrics.json").read_text())
    mix = metrics["split"].pop("class_mix")   # the halves are drawn by subject: each one's classes, in view
    assert metrics["split"] == {"holdout": 0.5, "seed": 0, "seen_in_training": True, "subjects_per_half": 2,
                                "train": 12, "reference": 6, "floor": 6}
    assert {part: sum(counts.values()) for part, counts in mix.items()} == {"training": 12, "reference": 6, "floor": 6}
    assert set(mix["floor"]) == {"AD", "NC"} and f"floor AD {mix['floor']['AD']}, NC {mix['floor']['NC']}" in printed
    assert "only 2 subjects in a held-out half" in printed
    assert set(metrics["scores"]) == {"samples", "reconstructions", "real (training)", "real (floor)"}
    for row in metrics["scores"].values():
        assert row["count"] == 6 and all(k in row for k in ("fid", "kid", "kid_std", "swd", "ms_ssim"))
    assert metrics["sampling"]["sampler"] == "dpmpp-sde" and metrics["sampling"]["steps"] == 5
    model = load_run(run, "cpu")  # what decides the samples, as a sample set records it
    recorded = ("seed", "batch_size", "device", "unet_fingerprint", "posthoc_ema_sigma_rel")
    assert {k: metrics["sampling"][k] for k in recorded} == {
        "seed": 3, "batch_size": 4, "device": "cpu", "unet_fingerprint": model.fingerprint, "posthoc_ema_sigma_rel": None}
    assert "seed 3, seconds_per_image" in (out / "report.md").read_text()
    classifier = torch.load(run / "classifier.pt", weights_only=True)           # what FID and KID were measured in
    assert metrics["features"] == (f"domain classifier (240 features, 0 training steps, weights "
                                   f"{fingerprint(classifier['model'])})") and classifier["key"]["steps"] == 0
    assert 0 < metrics["vqvae"]["psnr"] < 100 and 0 < metrics["vqvae"]["codebook_used"] <= 1
    report = (out / "report.md").read_text()
    assert "seen in training" in report and "not reliable" in report and "eval_samples.png" in report
    assert all((out / f"eval_{n}.png").exists() for n in ("real", "reconstructions", "samples"))
    # SWD per pyramid level, from the run's 32 px down to 16: in the report, printed, and in metrics.json
    level_header = "| images | 32 px (finest band) | 16 px (low-pass) |"
    assert level_header in report and level_header in printed
    assert all(f"| {name} | " in report.split(level_header)[1] for name in metrics["scores"])
    assert metrics["swd_per_level"]["samples"] == {"32": metrics["scores"]["samples"]["swd_32"],
                                                   "16": metrics["scores"]["samples"]["swd_16"]}
    assert metrics["features_input_size"] == 32 and "resized to 32x32" in report
    # full-resolution central crops: 3 rows (real, reconstructions, samples) of 4, each 32 px (the whole image here)
    from PIL import Image
    assert "![](eval_crops.png)" in report and metrics["crops"]["size"] == 32 and metrics["crops"]["per_row"] == 4
    assert Image.open(out / "eval_crops.png").size == (4 * (32 + 2) + 2, 3 * (32 + 2) + 2)  # 2-px grid padding
    # no memorisation check: its yardstick, subjects the run never saw, is missing (the next test has one)
    assert "memorisation" not in metrics and "## Memorisation" not in report and "not checked" in printed
    assert "not checked for copies of training images" in report

    # the same images read back with --samples give the same sample row as a folder of PNGs would
    folder = tmp_path / "pngs"
    folder.mkdir()
    for i in range(7):
        save_image(ellipses(1, seed=i)[0], folder / f"{i}.png", normalize=True, value_range=(-1, 1))
    driver.main(["evaluate", "--run", str(run), "--out", str(out), "--holdout", "0.5", "--features", "domain",
                 "--classifier-steps", "0", "--samples", str(folder)])
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["scores"]["samples"]["count"] == 7 and metrics["sampling"] == {"from": str(folder)}


def test_evaluate_writes_each_figure_whole_or_leaves_the_one_before(trained_run, tmp_path, monkeypatch):
    """A figure written in place and cut short (a full disk, a kill) was a broken PNG beside a whole report.md of the
    evaluation before; now each is written beside itself and renamed over the old one, as report.md and metrics.json."""
    import errno
    import os
    from PIL import Image
    run, _ = trained_run
    folder, out = tmp_path / "pngs", tmp_path / "eval"
    folder.mkdir()
    for i in range(4):
        save_image(ellipses(1, seed=i)[0], folder / f"{i}.png", normalize=True, value_range=(-1, 1))
    flags = ["evaluate", "--run", str(run), "--out", str(out), "--holdout", "0.5", "--features", "domain",
             "--classifier-steps", "0", "--samples", str(folder)]
    driver.main(flags)
    figures = {p.name: p.read_bytes() for p in out.glob("eval_*.png")}
    assert set(figures) == {"eval_real.png", "eval_reconstructions.png", "eval_samples.png", "eval_crops.png"}

    def disk_full(self, fp, format=None, **kwargs):
        f = open(fp, "wb") if isinstance(fp, (str, os.PathLike)) else fp   # as Image.save opens a path itself
        f.write(b"half a PNG")
        f.flush()
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(Image.Image, "save", disk_full)
    message = error_of(driver.main, flags)
    assert f"could not write {out / 'eval_real.png'} (No space left on device); the previous file is unchanged" \
        in message
    assert {p.name: p.read_bytes() for p in out.glob("eval_*.png")} == figures and not list(out.glob(".*tmp*"))


def test_the_memorisation_check_of_a_run_with_held_out_subjects_measures_every_sample_and_held_out_image(
        conditioned_run, tmp_path):
    from PIL import Image
    run, _ = conditioned_run                  # 8 subjects of 3 images, 2 held out: 18 training images, A and B of 3
    out = tmp_path / "eval"
    driver.main(["evaluate", "--run", str(run), "--out", str(out), "--features", "domain", "--classifier-steps", "0",
                 "--steps", "2", "--num", "4", "--guidance", "0"])
    metrics, report = json.loads((out / "metrics.json").read_text()), (out / "report.md").read_text()
    check = metrics["memorisation"]
    # the batch size the samples were drawn in, resolved: which images a seed gives depends on it
    assert metrics["sampling"]["batch_size"] == predict.DEFAULT_BATCH["cpu"] and "batch_seeds" in metrics["sampling"]
    assert [(name, row["count"]) for name, row in check["rows"].items()] == [
        ("samples", 4), ("real (held out, A)", 3), ("real (held out, B)", 3)]
    assert len(check["closest_pairs"]) == 4 and "## Memorisation" in report and "![](eval_memorisation.png)" in report
    assert Image.open(out / "eval_memorisation.png").size == (4 * (32 + 2) + 2, 2 * (32 + 2) + 2)
    assert "seen in training" not in report
    # every sample's verdict: by its place among the samples drawn, its nearest training images named
    each = list(csv.DictReader((out / "eval_memorisation.csv").open()))
    training_images = {str(p) for p in (run.parent / "data").rglob("*.jpeg")}
    assert [row["sample"] for row in each] == ["0", "1", "2", "3"]
    assert all({row["nearest_by_features"], row["nearest_by_pixels"]} <= training_images for row in each)
    flagged = sum(row["flagged_features"] == "1" or row["flagged_pixels"] == "1" for row in each)
    assert f"{flagged} of 4 samples flagged by either measure: eval_memorisation.csv names them" in report
    # a set scored with --samples: its files, as its manifest names them
    driver.main(["sample", "--run", str(run), "--num", "3", "--steps", "2", "--class", "AD", "--set", "age=60",
                 "--out", str(tmp_path / "set")])
    driver.main(["evaluate", "--run", str(run), "--out", str(out), "--features", "domain", "--classifier-steps", "0",
                 "--samples", str(tmp_path / "set")])
    manifest = list(csv.DictReader((tmp_path / "set" / "samples" / "manifest.csv").open()))
    assert [row["sample"] for row in csv.DictReader((out / "eval_memorisation.csv").open())] == [
        row["file"] for row in manifest] == [f"AD/sub-{k:06d}.png" for k in range(3)]
    pairs = json.loads((out / "metrics.json").read_text())["memorisation"]["closest_pairs"]
    assert sorted(pair["sample"] for pair in pairs) == [row["file"] for row in manifest]   # named as the set names them
    # a training image put in the set in place of sample 1 is flagged, and --withhold-flagged leaves it out
    copy = tmp_path / "set" / "samples" / "AD" / "sub-000001.png"
    Image.open(each[0]["nearest_by_pixels"]).resize((32, 32)).save(copy)
    driver.main(["evaluate", "--run", str(run), "--out", str(out), "--features", "domain", "--classifier-steps", "0",
                 "--samples", str(tmp_path / "set"), "--withhold-flagged"])
    each = {row["sample"]: row for row in csv.DictReader((out / "eval_memorisation.csv").open())}
    withheld = list(csv.DictReader((tmp_path / "set" / "samples" / "withheld.csv").open()))
    assert each["AD/sub-000001.png"]["flagged_pixels"] == "1" and float(each["AD/sub-000001.png"]["correlation"]) > 0.99
    assert [row["file"] for row in withheld] == [f for f, row in each.items() if "1" in (row["flagged_features"],
                                                                                         row["flagged_pixels"])]
    assert "AD/sub-000001.png" in [row["file"] for row in withheld] and "pixels" in withheld[0]["flagged_by"]
    assert not copy.exists()
    assert json.loads((out / "metrics.json").read_text())["memorisation"]["withheld"] == len(withheld)
    assert f"now left out of the set ({len(withheld)} withheld in all" in (out / "report.md").read_text()
    # the table's conditions read back from what the set keeps, at the values it was drawn at: age 60, sex not given
    read = [(r["condition"], r["images"], r["count"]) for r in json.loads((out / "metrics.json").read_text())[
        "per_condition"] if r["images"] == "the set"]
    assert read == [("age", "the set", 3 - len(withheld)), ("sex", "the set", 0)]
    assert "## Do the images show the values they were drawn at?" in (tmp_path / "set" / "samples" /
                                                                       "dataset_card.md").read_text()
    driver.main(["evaluate", "--run", str(run), "--out", str(out), "--features", "domain", "--classifier-steps", "0",
                 "--samples", str(tmp_path / "set")])          # the set, whole less what it withheld, scores again
    assert json.loads((out / "metrics.json").read_text())["memorisation"]["rows"]["samples"]["count"] == \
        3 - len(withheld)


def test_a_set_screened_by_withhold_flagged_is_locked_from_its_reading_to_its_withholding(conditioned_run, tmp_path,
                                                                                          monkeypatch):
    """A new `sample` into the set while evaluate --withhold-flagged scores it is refused: the verdicts, applied by
    file name, would delete samples of the new set that were never checked (and leave its copies in)."""
    from PIL import Image
    import evaluation.evaluate as evaluation_module
    run, _ = conditioned_run
    folder, out = tmp_path / "set" / "samples", tmp_path / "eval"
    sample = ["sample", "--run", str(run), "--num", "3", "--steps", "2", "--class", "AD", "--set", "age=60",
              "--out", str(tmp_path / "set")]
    score = ["evaluate", "--run", run.name, "--out", str(out), "--features", "domain", "--classifier-steps", "0",
             "--samples", str(tmp_path / "set")]
    driver.main(sample)
    monkeypatch.chdir(run.parent)                                     # --run as a relative path
    driver.main(score)
    copied = next(csv.DictReader((out / "eval_memorisation.csv").open()))["nearest_by_pixels"]
    Image.open(copied).resize((32, 32)).save(folder / "AD" / "sub-000001.png")   # a training image as sample 1
    drawn = {p.name: p.read_bytes() for p in (folder / "AD").iterdir()}
    feature_network, refused = evaluation_module.feature_network, []

    def meanwhile(*args, **kwargs):                                   # another terminal: a new set into the same --out
        refused.append(error_of(driver.main, sample + ["--seed", "7"]))
        return feature_network(*args, **kwargs)

    monkeypatch.setattr(evaluation_module, "feature_network", meanwhile)
    driver.main(score + ["--withhold-flagged"])
    assert "another command is writing a sample set into" in refused[0]
    withheld = list(csv.DictReader((folder / "withheld.csv").open()))
    assert "AD/sub-000001.png" in [row["file"] for row in withheld]
    assert all(row["checked_against"] == str(run.resolve()) for row in withheld)
    assert {p.name: p.read_bytes() for p in (folder / "AD").iterdir()} == {
        name: data for name, data in drawn.items() if f"AD/{name}" not in [row["file"] for row in withheld]}


def test_utility_of_a_sample_set_trains_on_its_own_images_less_those_it_withholds(conditioned_run, tmp_path, capsys,
                                                                                   monkeypatch):
    """evaluate --samples SET --utility N: the rows real, synthetic and real + synthetic, the synthetic images the
    set's (as many per class as its smallest class keeps once a planted copy of a training image is withheld)."""
    from PIL import Image
    run, _ = conditioned_run
    folder, out = tmp_path / "set" / "samples", tmp_path / "eval"
    driver.main(["sample", "--run", str(run), "--num", "3", "--steps", "2", "--class", "all", "--out",
                 str(tmp_path / "set")])
    score = ["evaluate", "--run", str(run), "--out", str(out), "--features", "domain", "--classifier-steps", "2",
             "--samples", str(tmp_path / "set")]
    driver.main(score)
    copied = next(csv.DictReader((out / "eval_memorisation.csv").open()))["nearest_by_pixels"]
    Image.open(copied).resize((32, 32)).save(folder / "AD" / "sub-000001.png")   # a training image as an AD sample
    from export.sample_set import read_sample
    planted = read_sample(folder / "AD" / "sub-000001.png")[0]
    import evaluation.evaluate as evaluation_module
    trained_on, set_samples_of = [], evaluation_module.set_samples_of
    monkeypatch.setattr(evaluation_module, "set_samples_of", lambda samples, *a: trained_on.append(samples) or
                        set_samples_of(samples, *a))
    utility = evaluation_module.utility

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(evaluation_module, "utility", interrupted)             # Ctrl-C while the classifiers train
    with pytest.raises(SystemExit):
        driver.main(score + ["--utility", "3", "--withhold-flagged"])
    card = (folder / "dataset_card.md").read_text()                            # the set changed, and its card says so
    assert "AD/sub-000001.png" in [row["file"] for row in csv.DictReader((folder / "withheld.csv").open())]
    assert "## Screened for copies of training patients" in card and "## Usefulness not measured" in card
    assert "utility" not in json.loads((folder / "checks.json").read_text())
    monkeypatch.setattr(evaluation_module, "utility", utility)
    trained_on.clear()
    capsys.readouterr()
    driver.main(score + ["--utility", "3", "--withhold-flagged"])
    metrics = json.loads((out / "metrics.json").read_text())
    kept = Counter(row["file"].split("/")[0] for row in csv.DictReader((folder / "manifest.csv").open()))
    assert "AD/sub-000001.png" in [row["file"] for row in csv.DictReader((folder / "withheld.csv").open())]
    per_class = min(kept["AD"], kept["NC"])
    assert kept["AD"] <= 2 and metrics["utility_per_class"] == per_class and metrics["utility_of"] == str(
        tmp_path / "set")
    assert [(r["training set"], r["images"]) for r in metrics["utility"]] == [
        ("real", 2 * per_class), ("synthetic, the set", 2 * per_class), ("real + synthetic, the set", 4 * per_class)]
    assert f"the set's smallest class has {per_class} images it keeps" in capsys.readouterr().out
    assert len(trained_on[0]) == kept["AD"] + kept["NC"]                      # the copy withheld is not trained on
    assert not any((image[0] - planted).abs().max() < 1e-3 for image in trained_on[0])
    assert "The synthetic images are the set's own" in (out / "report.md").read_text()
    # the set's record: checks.json, and its card shows the screen and the table (no training image named)
    checks = json.loads((folder / "checks.json").read_text())
    assert checks["screen"]["withheld"] == metrics["memorisation"]["withheld"] >= 1
    assert checks["screen"]["thresholds"] == metrics["memorisation"]["thresholds"]
    assert checks["screen"]["checked_against"] == str(run.resolve()) and checks["utility"]["rows"] == metrics["utility"]
    card = (folder / "dataset_card.md").read_text()
    assert "## Screened for copies of training patients" in card and f"{checks['screen']['withheld']} withheld" in card
    assert "## Train on this set, test on real subjects" in card and "| synthetic, the set |" in card
    assert copied not in card and copied.split("/")[-1] not in card


def test_a_set_drawn_at_a_table_value_alone_is_checked_on_it_and_a_run_whose_table_moved_skips_it(conditioned_run,
                                                                                                   tmp_path, capsys):
    """`sample --set age=60` writes its set in all/: --utility trains no classifier of the classes on it, the
    condition network learns age from it (as many real images as set images), and nothing of sex (not given)."""
    from runtime.checkpoint import atomic_save
    run = shutil.copytree(conditioned_run[0], tmp_path / "run")
    driver.main(["sample", "--run", str(run), "--num", "3", "--steps", "2", "--set", "age=60", "--out",
                 str(tmp_path / "set")])
    score = ["evaluate", "--run", str(run), "--out", str(tmp_path / "eval"), "--features", "domain",
             "--classifier-steps", "0", "--samples", str(tmp_path / "set")]
    driver.main(score + ["--utility", "2"])
    metrics = json.loads((tmp_path / "eval" / "metrics.json").read_text(),
                         parse_constant=lambda c: pytest.fail(f"a bare {c} in metrics.json: not JSON (jq refuses it)"))
    assert "utility" not in metrics and "no class folders" in capsys.readouterr().out
    read_age = next(r for r in metrics["per_condition"] if (r["condition"], r["images"]) == ("age", "the set"))
    assert read_age["r"] is None                                    # one value: no correlation, written null
    rows = {(r["condition"], r["training set"]): r for r in metrics["utility_conditions"]}
    assert rows["age", "real"]["images"] == rows["age", "synthetic, the set"]["images"] == 2
    assert "mae" in rows["age", "synthetic, the set"]
    assert rows["sex", "synthetic, the set"]["images"] == 0 and "recognised" not in rows["sex", "synthetic, the set"]
    assert [(r["condition"], r["count"]) for r in metrics["per_condition"] if r["images"] == "the set"] == [
        ("age", 3), ("sex", 0)]
    saved = torch.load(run / "unet.pt", weights_only=True)
    saved["labels"] = {**saved["labels"], "file": str(tmp_path / "gone.csv")}  # the run's table, not found now
    atomic_save(saved, run / "unet.pt")
    driver.main(score)
    assert "warning: the set's values are not read back" in capsys.readouterr().out
    assert "per_condition" not in json.loads((tmp_path / "eval" / "metrics.json").read_text())


def test_a_set_s_images_are_told_by_their_class_folders_and_drawn_from_their_own_class():
    from evaluation.utility import set_samples_of
    from evaluation.utility import set_labels
    from runtime.errors import BadInputError
    names = ["NC/sub-000003.png", "AD/sub-000000.png", "NC/sub-000004.png", "AD/sub-000001.png", "AD/sub-000002.png"]
    labels = set_labels(names, ["AD", "NC"], "SET")
    assert labels == [1, 0, 1, 0, 0]
    samples = torch.tensor(labels, dtype=torch.float)[:, None, None, None].expand(-1, 1, 4, 4)  # each its class
    of_class = set_samples_of(samples, labels, seed=0)["the set"]
    assert (of_class(0, 2) == 0).all() and len(of_class(0, 2)) == 2 and (of_class(1, 5) == 1).all()
    assert len(of_class(1, 5)) == 2 and torch.equal(of_class(0, 2), set_samples_of(samples, labels, 0)["the set"](0, 2))
    with pytest.raises(BadInputError, match="none of NC"):
        set_labels(names[1:2], ["AD", "NC"], "SET")
    with pytest.raises(BadInputError, match="has images in 'all'"):
        set_labels(["all/sub-000000.png"], ["AD", "NC"], "SET")
    # what the set keeps to train on, decided from the verdicts before anything is withheld
    from evaluation.utility import kept_for_utility
    each = [{"flagged_features": 0, "flagged_pixels": int(k == 1)} for k in range(5)]
    assert kept_for_utility(each, labels, 2, 4, withholding=True) == ([0, 2, 3, 4], 2)   # NC 2, AD 2 kept
    assert kept_for_utility(each, labels, 2, 1, withholding=False) == ([0, 1, 2, 3, 4], 1)
    every_ad = [{"flagged_features": 1, "flagged_pixels": 0} if c == 0 else each[0] for c in labels]
    with pytest.raises(BadInputError, match="every image of a class of the set is flagged"):
        kept_for_utility(every_ad, labels, 2, 2, withholding=True)


def test_a_sample_set_scored_with_samples_brings_its_record_and_other_folders_say_what_they_lack(trained_run,
                                                                                                   tmp_path, capsys):
    run, _ = trained_run
    base = ["evaluate", "--run", str(run), "--out", str(tmp_path / "eval"), "--holdout", "0.5", "--features", "domain",
            "--classifier-steps", "0"]
    driver.main(["sample", "--run", str(run), "--num", "4", "--steps", "2", "--seed", "5",
                 "--out", str(tmp_path / "set")])
    capsys.readouterr()
    driver.main([*base, "--samples", str(tmp_path / "set")])
    sampling = json.loads((tmp_path / "eval" / "metrics.json").read_text())["sampling"]
    assert sampling["from"] == str(tmp_path / "set") and sampling["seed"] == 5 and sampling["num"] == 4
    assert sampling["vqvae_fingerprint"] == load_run(run, "cpu").vqvae_fingerprint and "rows" not in sampling
    assert "another VQ-VAE" not in capsys.readouterr().out
    (tmp_path / "big").mkdir()                                     # another tool's 48-px images, no record
    for i in range(3):
        save_image(ellipses(1, size=48, seed=i)[0], tmp_path / "big" / f"{i}.png")
    driver.main([*base, "--samples", str(tmp_path / "big")])
    printed = capsys.readouterr().out
    assert "3 of 3 images" in printed and "are not 32x32" in printed and "not a sample set" in printed


def test_withholding_refuses_a_set_drawn_by_another_runs_stage_1(conditioned_run, tmp_path):
    """--withhold-flagged screens a set for copies of --run's training patients, and its card then says so: a set
    drawn with another stage 1 (the fingerprint its sampling.json names) is refused, naming the run that drew it
    (found by review: screened and carded against a run that did not make it); the set is left as it was."""
    from runtime.checkpoint import atomic_save
    run, _ = conditioned_run
    driver.main(["sample", "--run", str(run), "--num", "2", "--steps", "2", "--out", str(tmp_path / "set")])
    other = tmp_path / "other"
    shutil.copytree(run, other)
    vq = torch.load(other / "vqvae.pt", weights_only=True)
    name = next(iter(vq["model"]))
    vq["model"][name] = vq["model"][name] + 1                       # another stage 1
    atomic_save(vq, other / "vqvae.pt")
    before = sorted(p.name for p in (tmp_path / "set" / "samples").rglob("*"))
    message = error_of(driver.main, ["evaluate", "--run", str(other), "--samples", str(tmp_path / "set"),
                                     "--withhold-flagged", "--features", "domain", "--out", str(tmp_path / "ev")])
    assert f"was drawn with another VQ-VAE than {other}'s (its manifest names {run.resolve()})" in message
    assert sorted(p.name for p in (tmp_path / "set" / "samples").rglob("*")) == before


def test_evaluate_bad_inputs_give_one_line_errors(trained_run, tmp_path):
    run, _ = trained_run
    base = ["evaluate", "--run", str(run), "--features", "domain", "--classifier-steps", "0", "--out", str(tmp_path),
            "--holdout", "0.5"]
    assert "does not exist" in error_of(driver.main, base + ["--samples", str(tmp_path / "missing")])
    (tmp_path / "empty").mkdir()
    assert "no images" in error_of(driver.main, base + ["--samples", str(tmp_path / "empty")])
    (tmp_path / "one").mkdir()
    save_image(ellipses(1)[0], tmp_path / "one" / "0.png")
    assert "the --samples folder has 1 image(s)" in error_of(driver.main, base + ["--samples", str(tmp_path / "one")])
    assert "--num sets how many samples evaluate draws" in error_of(
        driver.main, base + ["--samples", str(tmp_path / "one"), "--num", "5"])
    assert "held-out subject" in error_of(driver.main, base + ["--holdout", "0.01"])
    assert "--num must be 2 or more" in error_of(driver.main, base + ["--num", "1"])
    assert "--classifier-steps must be 0 or more" in error_of(driver.main, base + ["--classifier-steps", "-1"])
    assert "trained without --conditional" in error_of(driver.main, base + ["--utility", "2"])
    assert "--withhold-flagged leaves the samples the memorisation check flags out of a sample set" in error_of(
        driver.main, base + ["--withhold-flagged"])
    for folder in ("big", "empty"):                            # no set: another folder's images are left as they are
        (tmp_path / folder).mkdir(exist_ok=True)
        assert "as `sample --out DIR` wrote it" in error_of(
            driver.main, base + ["--samples", str(tmp_path / folder), "--withhold-flagged"])
    driver.main(["sample", "--run", str(run), "--num", "2", "--steps", "2", "--out", str(tmp_path / "set")])
    assert "was trained on every subject, and the memorisation check needs subjects it never saw" in error_of(
        driver.main, base + ["--samples", str(tmp_path / "set"), "--withhold-flagged"])
    assert len(list((tmp_path / "set" / "samples" / "all").iterdir())) == 2
    (tmp_path / "begun" / "samples").mkdir(parents=True)       # a set killed as it began: its settings, no manifest
    (tmp_path / "begun" / "samples" / "sampling.json").write_text("{}")
    assert "has no manifest.csv (a set stopped as it began)" in error_of(
        driver.main, base + ["--samples", str(tmp_path / "begun"), "--withhold-flagged"])
    assert "is inside the sample set" in error_of(driver.main, [*base[:-3], str(tmp_path / "set" / "samples" / "eval"),
                                                                "--holdout", "0.5", "--samples", str(tmp_path / "set")])
    assert "--utility N trains on N >= 1" in error_of(driver.main, base + ["--utility", "0"])
    assert "--utility N trains on N >= 1" in error_of(driver.main, base + ["--utility", "2", "--guidance", "0"])
    assert "this run was trained on all subjects" in error_of(   # the set's samples would carry the test subjects
        driver.main, base + ["--utility", "2", "--samples", str(tmp_path / "set"), "--guidance", "0"])
    from types import SimpleNamespace
    from conditions.table import Condition
    from evaluation.utility import class_column
    from runtime.errors import BadInputError
    one_class = SimpleNamespace(conditions=[Condition("class", "category", ["all"])])  # one class folder, no table
    with pytest.raises(BadInputError, match="is one class"):
        class_column(one_class, ["all"], tmp_path)
    # a BIDS tree (one class) with a diagnosis in its table: no classifier of classes; the table's conditions checked
    bids = SimpleNamespace(conditions=[Condition("diagnosis", "category", ["AD", "CN"])])
    assert class_column(bids, ["all"], tmp_path) is None
    assert "--steps must be positive" in error_of(driver.main, base + ["--steps", "0"])
    assert "no vqvae checkpoint" in error_of(driver.main, ["evaluate", "--run", str(tmp_path / "none")])


def test_class_scores_count_a_sample_as_recognised_only_when_the_classifier_names_its_class(tmp_path):
    """AD slices bright, NC dark, a classifier that reads brightness; samples of the wrong class at w=0 only."""
    import argparse
    import numpy as np
    from PIL import Image
    from dataset import load_slices
    rng = np.random.default_rng(0)
    for label, level in (("AD", 200), ("NC", 40)):
        (tmp_path / "train" / label).mkdir(parents=True)
        for s in range(4):
            for k in range(3):
                img = (level + rng.normal(0, 5, (32, 32))).clip(0, 255).astype(np.uint8)
                Image.fromarray(img).save(tmp_path / "train" / label / f"{label}{s}_{k}.png")
    dataset = load_slices(str(tmp_path), 32, 1)
    assert dataset.classes == ["AD", "NC"]
    train_idx, ref_idx, floor_idx = evaluation_split([p for p, _ in dataset.samples], 0.5, 0)

    class Brightness(nn.Module):   # logits (AD, NC) = (mean, -mean), and no rotation head
        def forward(self, x):
            m = x.mean(dim=(1, 2, 3))
            return torch.stack([m, -m], 1), None

    def generate(c, num, guidance):
        bright = (c == 0) if guidance > 0 else (c == 1)   # w = 0: every sample of the other class
        return (0.5 if bright else -0.7) + 0.05 * torch.randn(num, 1, 32, 32)

    features = ClassifierFeatures(SliceClassifier(ClassifierConfig(in_channels=1, input_size=32)))
    args = argparse.Namespace(guidance=[0.0, 2.0], num=None)
    held = ref_idx + floor_idx
    rows, grid = class_scores(args, dataset, train_idx, held, [0, 1], generate, Brightness(), features, "cpu", 0)
    got = {(r["class"], r["images"]): r for r in rows}
    for name, c in (("AD", 0), ("NC", 1)):
        n_held = sum(dataset.labels[i] == c for i in held)
        assert got[name, "samples, w=0"]["recognised"] == 0.0 and got[name, "samples, w=2"]["recognised"] == 1.0
        assert got[name, "real (held out)"]["recognised"] == 1.0 and got[name, "real (held out)"]["count"] == n_held
        floor = got[name, "real (floor)"]
        assert got[name, "samples, w=2"]["count"] == floor["count"] < n_held   # as many samples as the class's floor half
        # the right class is closer to that class's reference than the wrong one
        assert got[name, "samples, w=2"]["fid"] < got[name, "samples, w=0"]["fid"]
    assert grid.shape[0] == sum(min(8, got[n, "real (floor)"]["count"]) for n in ("AD", "NC") for _ in range(2))


def test_evaluate_a_run_with_stage_1_alone_scores_its_reconstructions_without_samples(trained_run, tmp_path, capsys,
                                                                                      monkeypatch):
    import evaluation.evaluate
    run, _ = trained_run
    stage1 = tmp_path / "stage1"
    stage1.mkdir()
    shutil.copy(run / "vqvae.pt", stage1 / "vqvae.pt")
    out = tmp_path / "eval"
    written, atomic_write = [], evaluation.evaluate.atomic_write
    monkeypatch.setattr(evaluation.evaluate, "atomic_write", lambda path, write: (written.append(path.name),
                                                                                 atomic_write(path, write)))
    driver.main(["evaluate", "--run", str(stage1), "--out", str(out), "--holdout", "0.5", "--features", "domain",
                 "--classifier-steps", "0"])
    assert written == ["report.md", "metrics.json"]  # each whole, metrics.json last: what `ema` reads is complete
    from runtime.checkpoint import run_lock
    with run_lock(out, lock=driver.EVALUATE_LOCK):      # another evaluate into the same folder: refused, not mixed
        assert "another command is evaluating into" in error_of(driver.main, [
            "evaluate", "--run", str(stage1), "--out", str(out), "--holdout", "0.5"])
    assert "scoring stage 1 alone" in capsys.readouterr().out
    metrics = json.loads((out / "metrics.json").read_text())
    assert set(metrics["scores"]) == {"reconstructions", "real (training)", "real (floor)"}
    assert set(metrics["swd_per_level"]["reconstructions"]) == {"32", "16"}
    assert metrics["crops"]["rows"] == ["real (B)", "reconstructions of the same images"]
    from PIL import Image
    assert Image.open(out / "eval_crops.png").size == (4 * (32 + 2) + 2, 2 * (32 + 2) + 2)  # two rows of crops
    assert not (out / "eval_samples.png").exists()
    report = (out / "report.md").read_text()
    assert "stage 1 alone" in report and "eval_samples.png" not in report and "| samples |" not in report
    assert "memorisation" not in metrics and not (out / "eval_memorisation.png").exists()
    # the same run's reconstruction row matches that of the whole run (stage 1 is the same)
    driver.main(["evaluate", "--run", str(run), "--out", str(tmp_path / "whole"), "--holdout", "0.5",
                 "--features", "domain", "--classifier-steps", "0", "--steps", "5"])
    whole = json.loads((tmp_path / "whole" / "metrics.json").read_text())
    assert whole["vqvae"]["psnr"] == metrics["vqvae"]["psnr"]
    assert whole["swd_per_level"]["reconstructions"] == metrics["swd_per_level"]["reconstructions"]
    # stage 1 alone evaluated into the whole run's folder: its sample grid, shown by no report there now, is removed
    # (found by review: it stayed beside the new report)
    assert (tmp_path / "whole" / "eval_samples.png").exists()
    shutil.copy(tmp_path / "whole" / "eval_samples.png", tmp_path / "whole" / "eval_samples_kept.png")  # the user's
    driver.main(["evaluate", "--run", str(stage1), "--out", str(tmp_path / "whole"), "--holdout", "0.5",
                 "--features", "domain", "--classifier-steps", "0"])
    assert sorted(p.name for p in (tmp_path / "whole").glob("eval_*")) == [
        "eval_crops.png", "eval_real.png", "eval_reconstructions.png", "eval_samples_kept.png"]  # none but the report's
    assert "--class scores the run's samples" in error_of(driver.main, ["evaluate", "--run", str(stage1), "--class",
                                                                         "all", "--holdout", "0.5", "--out", str(out)])


# ----------------------------------------------------------------------------- memorisation

def test_the_memorisation_check_flags_copies_of_training_images_and_neither_noise_nor_new_subjects(tmp_path):
    """A "model" that returns training images (slightly perturbed) is flagged almost entirely, by both measures;
    real held-out images near the chosen percentile; random noise never."""
    import numpy as np
    from conftest import write_blob_images
    from dataset import load_slices
    from evaluation.evaluate import stack
    from evaluation.memorisation import format_memorisation_table, memorisation_check
    write_blob_images(tmp_path / "AD", [f"s{i}" for i in range(60)], 2, np.random.default_rng(0), size=(32, 32))
    dataset = load_slices(str(tmp_path), 32, 1)
    train_idx, ref_idx, floor_idx = evaluation_split([p for p, _ in dataset.samples], 0.5, 0)
    reference, _ = stack(dataset, ref_idx)
    floor, _ = stack(dataset, floor_idx)
    training, _ = stack(dataset, train_idx[:40])
    torch.manual_seed(0)
    features = ClassifierFeatures(SliceClassifier(ClassifierConfig(input_size=32)))   # untrained: any fixed features
    copies = training + 0.01 * torch.randn_like(training)

    def check(samples):
        result, closest, each = memorisation_check(samples, reference, floor, dataset, train_idx, features, "cpu")
        assert [row["sample"] for row in each] == list(range(len(samples)))   # unnamed: by their place
        return result, closest, result["rows"]["samples"]

    result, closest, copied = check(copies)
    assert copied["flagged_features"] >= 0.95 and copied["flagged_pixels"] >= 0.95 and copied["correlation_max"] > 0.99
    # each sample's verdict names the training image it copies, by either measure, and agrees with the summary
    names = [f"AD/sub-{k:06d}.png" for k in range(len(copies))]
    _, _, each = memorisation_check(copies, reference, floor, dataset, train_idx, features, "cpu", names)
    copied_paths = [dataset.samples[i][0] for i in train_idx[:40]]
    assert [row["sample"] for row in each] == names
    assert sum(row["nearest_by_pixels"] == path for row, path in zip(each, copied_paths)) >= 38
    assert sum(row["nearest_by_features"] == path for row, path in zip(each, copied_paths)) >= 38
    assert sum(row["flagged_pixels"] for row in each) / len(each) == copied["flagged_pixels"]
    assert sum(row["flagged_features"] for row in each) / len(each) == copied["flagged_features"]
    # the figure: the closest samples over the training images they copy (the same images, up to the noise added)
    assert closest.shape == (16, 1, 32, 32) and (closest[:8] - closest[8:]).abs().max() < 0.1
    assert all(p["training_image"] in [path for path, _ in dataset.samples] for p in result["closest_pairs"])
    from types import SimpleNamespace
    from evaluation.memorisation import _slice_of                  # of a volume, the pair names the slice too
    assert _slice_of(dataset, 0) == {} and _slice_of(SimpleNamespace(slice_numbers=[40, 41]), 1) == {"slice": 41}
    assert result["rows"]["real (held out, B)"]["flagged_pixels"] <= 0.1        # new subjects: near the 1% chosen
    assert result["rows"]["real (held out, B)"]["flagged_features"] <= 0.1
    _, _, noise = check(torch.rand_like(floor) * 2 - 1)
    assert noise["flagged_features"] == noise["flagged_pixels"] == 0.0 and noise["correlation_median"] < 0.3
    assert "| samples | 40 |" in format_memorisation_table(result)


class Images(list):
    """A dataset of (image, label) pairs, with the paths `memorisation_check` names the training images by."""

    def __init__(self, images):
        super().__init__((x, 0) for x in images)
        self.samples = [(f"/d/AD/s{i}_0.png", 0) for i in range(len(images))]


def test_the_nearest_training_image_is_found_in_any_batch_and_named_by_its_place_in_train_idx():
    from evaluation.memorisation import nearest_training
    g = torch.Generator().manual_seed(0)
    dataset = Images(torch.rand(8, 1, 4, 4, generator=g) * 2 - 1)
    train_idx = [7, 2, 5, 0, 3]                       # read in batches of 2: the third batch holds train_idx[4]
    picked = [4, 0, 2, 3]
    queries = torch.stack([dataset[train_idx[k]][0] for k in picked])
    found = nearest_training(queries, dataset, train_idx, lambda x: x.flatten(1), "cpu", batch_size=2)
    assert found["distance_at"].tolist() == picked and found["correlation_at"].tolist() == picked
    assert found["distance"].abs().max() < 1e-3 and found["correlation"].min() > 0.999


def test_the_memorisation_threshold_is_the_percentile_of_the_reference_half_a_and_the_floor_b_is_scored_by_it():
    """Identity features: each held-out image is a training image moved by a known distance, A by 0.1, 0.2, 0.4,
    B by 1, 2, 3. The threshold is A's 1st percentile, 0.1 + 0.02 (0.2 - 0.1) = 0.102 (linear interpolation): it
    flags one image of A and none of B; B's would be 1.02, flagging all of A. A training image itself in A and in B
    (a split that leaks) is counted and left out: with it, A's percentile would be 0.003, which only a copy passes."""
    from evaluation.memorisation import format_memorisation_table, memorisation_check
    g = torch.Generator().manual_seed(0)
    training = 0.05 * torch.sign(torch.randn(4, 1, 8, 8, generator=g))   # corners of a cube: 0.45 or more apart
    dataset, train_idx = Images(training), [0, 1, 2, 3]
    unit = torch.zeros(1, 8, 8)
    unit[0, 0, 0] = 1.0
    moved = lambda image, distances: torch.stack([training[image] + d * unit for d in distances])  # noqa: E731
    reference, floor = moved(0, (0.1, 0.2, 0.4, 0.0)), moved(1, (1.0, 2.0, 3.0, 0.0))   # r < 0.98, then r = 1
    samples = torch.stack([training[2], training[3] + 0.11 * unit, training[3] + 0.5 * unit])
    result, _, each = memorisation_check(samples, reference, floor, dataset, train_idx, lambda x: x.flatten(1), "cpu")
    assert result["thresholds"]["distance"] == pytest.approx(0.102, rel=1e-3)
    a, b = result["rows"]["real (held out, A)"], result["rows"]["real (held out, B)"]
    assert (a["count"], a["duplicates"], b["count"], b["duplicates"]) == (3, 1, 3, 1)
    assert "Left out of the rows and the threshold: 1 of real (held out, A) and 1 of real (held out, B)" in \
        format_memorisation_table(result)
    # by subject: the image at 0.1 is of the leaked subject too (another slice of the same brain), and goes with it
    by_subject, _, _ = memorisation_check(samples, reference, floor, dataset, train_idx, lambda x: x.flatten(1), "cpu",
                                          subjects=(["s1", "s2", "s3", "s1"], ["s5", "s6", "s7", "s8"],
                                                    ["t0", "t1", "t2", "t3"]))
    assert by_subject["rows"]["real (held out, A)"]["duplicates"] == 2
    assert by_subject["thresholds"]["distance"] == pytest.approx(0.2 + 0.01 * 0.2, rel=1e-3)
    # each sample by its own distance: 0 and 0.11 from training images 2 and 3, either side of the threshold
    assert [(row["nearest_by_features"], row["feature_distance"], row["flagged_features"]) for row in each] == [
        ("/d/AD/s2_0.png", pytest.approx(0, abs=1e-3), 1), ("/d/AD/s3_0.png", pytest.approx(0.11, abs=1e-3), 0),
        ("/d/AD/s3_0.png", pytest.approx(0.5, abs=1e-3), 0)]
    assert result["rows"]["real (held out, A)"]["flagged_features"] == pytest.approx(1 / 3)
    assert result["rows"]["real (held out, B)"]["flagged_features"] == 0.0
    assert result["rows"]["samples"]["flagged_features"] == pytest.approx(1 / 3)      # the copy, at distance 0


def test_a_held_out_half_all_of_leaked_subjects_is_kept_and_said_so_not_counted_as_left_out(capsys):
    """Every image of A is of a subject one of whose images is a training image: there is nothing else to measure
    against, so they stay; the table must not say they were left out of the threshold, and says what it then is."""
    from evaluation.memorisation import format_memorisation_table, memorisation_check
    g = torch.Generator().manual_seed(0)
    training = 0.05 * torch.sign(torch.randn(4, 1, 8, 8, generator=g))
    dataset, train_idx = Images(training), [0, 1, 2, 3]
    unit = torch.zeros(1, 8, 8)
    unit[0, 0, 0] = 1.0
    moved = lambda image, distances: torch.stack([training[image] + d * unit for d in distances])  # noqa: E731
    reference, floor = moved(0, (0.0, 0.1)), moved(1, (1.0, 2.0, 3.0))     # A: one subject, one slice a copy
    result, _, _ = memorisation_check(training[2:], reference, floor, dataset, train_idx, lambda x: x.flatten(1), "cpu",
                                      subjects=(["s1", "s1"], ["s5", "s6", "s7"], ["t0", "t1", "t2", "t3"]))
    a = result["rows"]["real (held out, A)"]
    assert (a["count"], a["duplicates"], a["leaked_kept"]) == (2, 0, 2)
    table = format_memorisation_table(result)
    assert "Left out of the rows" not in table and "Kept, for want of others: all 2 of real (held out, A)" in table
    assert "they are kept, for want of others" in capsys.readouterr().out


def test_half_b_s_flagged_images_are_told_by_subject_with_the_training_subject_nearest_to_each():
    """Identity features; A's images 0.5 from training subjects' images (the threshold: 0.5 and r just below 1).
    B: subject "again" is training subject t1 scanned again, its two images 0.1 from t1's (both flagged, both
    nearest t1); subject "new" has one image 0.2 from t0's (flagged) and one 0.6 from t3's (not); "far" is far. The row
    lists "again" then "new", and not "far"; the table says who is flagged and who is nearest."""
    from evaluation.memorisation import format_memorisation_table, memorisation_check
    g = torch.Generator().manual_seed(0)
    training = 0.05 * torch.sign(torch.randn(4, 1, 8, 8, generator=g))   # corners of a cube: 0.45 or more apart
    dataset, train_idx = Images(training), [0, 1, 2, 3]
    unit = torch.zeros(1, 8, 8)
    unit[0, 0, 0] = 1.0
    reference = torch.stack([training[k] + 0.5 * unit for k in (0, 1, 2, 3)])
    floor = torch.stack([training[1] + 0.1 * unit, training[1] - 0.1 * unit, training[0] + 0.2 * unit,
                         training[3] + 0.6 * unit, training[2] + 3 * unit])
    result, _, _ = memorisation_check(reference[:1], reference, floor, dataset, train_idx, lambda x: x.flatten(1),
                                      "cpu", subjects=(["a0", "a1", "a2", "a3"], ["again", "again", "new", "new",
                                                                                  "far"], ["t0", "t1", "t1", "t3"]))
    assert result["rows"]["real (held out, B)"]["flagged_subjects"] == [
        {"subject": "again", "flagged": 2, "images": 2, "nearest_training_subject": "t1", "nearest_count": 2},
        {"subject": "new", "flagged": 1, "images": 2, "nearest_training_subject": "t0", "nearest_count": 1}]
    assert ("Half B's flagged images are of 2 subjects: again (2 of its 2 images flagged; 2 of the 2 nearest by "
            "pixels to training subject t1), new (1 of its 2 images flagged; 1 of the 2 nearest by pixels to training "
            "subject t0). A subject") in format_memorisation_table(result)
    blind, _, _ = memorisation_check(reference[:1], reference, floor, dataset, train_idx,   # features that see nothing
                                     lambda x: torch.zeros(len(x), 1), "cpu", subjects=(
                                         ["a0", "a1", "a2", "a3"], ["again", "again", "new", "new", "far"],
                                         ["t0", "t1", "t1", "t3"]))
    assert [(r["subject"], r["flagged"], r["nearest_training_subject"])                # flagged by pixels alone, and
            for r in blind["rows"]["real (held out, B)"]["flagged_subjects"]] == [     # nearest by pixels, not features
        ("again", 2, "t1"), ("new", 1, "t0")]
    from evaluation.memorisation import _flagged_subjects_line
    line = _flagged_subjects_line(result["rows"]["real (held out, B)"]["flagged_subjects"], shown=1)[0]
    assert "training subject t1) and 1 more. A subject" in line and "new (" not in line
    unnamed, _, _ = memorisation_check(reference[:1], reference, floor, dataset, train_idx, lambda x: x.flatten(1),
                                       "cpu")
    assert "flagged_subjects" not in unnamed["rows"]["real (held out, B)"]
    assert "Half B's flagged" not in format_memorisation_table(unnamed)


# ----------------------------------------------------------------------------- train on synthetic, test on real

def test_train_on_synthetic_scores_samples_by_what_they_teach_a_classifier_about_real_subjects():
    """AD bright, NC dark (textured ellipses): samples of the right class teach the classifier as well as real
    images, samples with the classes swapped teach it the opposite, noise teaches nothing."""
    from evaluation.utility import UTILITY_SEEDS, format_utility_table, utility_check

    def of_class(c, n, seed):
        return (ellipses(n, seed=seed) + (0.5 if c == 0 else -0.5)).clamp(-1, 1)

    test = (torch.cat([of_class(0, 20, 100), of_class(1, 20, 101)]), torch.tensor([0] * 20 + [1] * 20))
    cfg = ClassifierConfig(input_size=32, width=8)
    kinds = {1.0: lambda c, n: of_class(c, n, 10 + c),        # w = 1: the right class
             2.0: lambda c, n: of_class(1 - c, n, 20 + c),    # w = 2: the other class
             3.0: lambda c, n: torch.rand(n, 1, 32, 32) * 2 - 1}
    rows = utility_check(lambda c, n: of_class(c, n, c), {f"w={w:g}": kind for w, kind in kinds.items()}, [0, 1], 16,
                         test, cfg, 40, "cpu")
    got = {r["training set"]: r for r in rows}
    assert list(got) == ["real", "synthetic, w=1", "real + synthetic, w=1", "synthetic, w=2", "real + synthetic, w=2",
                         "synthetic, w=3", "real + synthetic, w=3"]
    assert got["real"]["images"] == 32 and got["real"]["per_class"] == [16, 16] and got["real + synthetic, w=1"]["images"] == 64
    assert got["real"]["accuracy"] > 0.9 and got["synthetic, w=1"]["accuracy"] > 0.9 and got["real"]["auc"] > 0.95
    assert got["synthetic, w=2"]["accuracy"] < 0.1 and got["synthetic, w=2"]["auc"] < 0.05    # taught the opposite
    assert 0.2 < got["synthetic, w=3"]["accuracy"] < 0.8                                    # taught nothing
    assert got["real + synthetic, w=3"]["accuracy"] > 0.9                                   # the real half still teaches
    assert UTILITY_SEEDS == 3 and all(r["accuracy_std"] >= 0 for r in rows)
    assert "| synthetic, w=2 | 32 |" in format_utility_table(rows)


def test_every_training_set_of_the_utility_check_trains_its_classifier_from_each_of_the_seeds(monkeypatch):
    """The spread the table reports is over UTILITY_SEEDS classifiers drawn from seeds 0, 1, ...: the same seed each
    time would train one classifier UTILITY_SEEDS times and report a spread of 0."""
    import evaluation.utility as utility
    seeds = []
    monkeypatch.setattr(utility, "fit_classifier", lambda images, labels, cfg, steps, device, seed: seeds.append(
        (len(images), seed)))
    monkeypatch.setattr(utility, "scores", lambda *_: {"accuracy": 0.5, "auc": 0.5})
    test = (torch.zeros(4, 1, 8, 8), torch.tensor([0, 0, 1, 1]))
    utility.utility_check(lambda c, n: torch.zeros(n, 1, 8, 8), {"w=1": lambda c, n: torch.zeros(n, 1, 8, 8)}, [0, 1],
                          2, test, ClassifierConfig(input_size=8), 1, "cpu")
    # the rows real, synthetic, real + synthetic: 4, 4 and 8 images
    assert seeds == [(n, seed) for n in (4, 4, 8) for seed in range(utility.UTILITY_SEEDS)]
    assert utility.UTILITY_SEEDS > 1


def test_train_on_synthetic_scores_a_table_s_conditions_by_what_samples_teach_about_real_subjects():
    """Age brightens the upper half, sex the lower (values in [0, 1] to [-1, 1]): samples drawn at the real images'
    values that show them teach the condition network to read real held-out images as the real ones do; noise
    teaches nothing; a run's `class` is the classifier's to check, and an image without a value trains no head."""
    from conditions.table import CLASS, Condition
    from evaluation.utility import condition_utility, format_condition_utility_table
    conditions = [Condition(CLASS, "category", ["AD", "NC"]), Condition("age", "continuous", low=60.0, high=80.0),
                  Condition("sex", "category", ["F", "M"])]

    def values(n, seed):
        g = torch.Generator().manual_seed(seed)
        return torch.stack([torch.zeros(n), torch.rand(n, generator=g), torch.randint(0, 2, (n,), generator=g)], 1)

    def showing(y, seed):
        x = torch.randn(len(y), 1, 16, 16, generator=torch.Generator().manual_seed(seed)) * 0.05
        x[:, :, :8] += (y[:, 1] * 2 - 1).nan_to_num(0)[:, None, None, None]
        x[:, :, 8:] += (y[:, 2] * 2 - 1)[:, None, None, None]
        return x

    train, test = values(48, 1), values(40, 2)
    train[:4, 1] = test[:3, 1] = math.nan                                # no age given: no age head trained or read
    drawn = []

    def generate(y, w):
        drawn.append(y.clone())
        noise = torch.rand(len(y), 1, 16, 16, generator=torch.Generator().manual_seed(8)) * 2 - 1  # the same each run
        return showing(y, 7) if w == 2 else noise

    rows = condition_utility((showing(train, 3), train), generate, [1.0, 2.0], (showing(test, 4), test), conditions,
                             25, "cpu")
    assert all(torch.equal(y.nan_to_num(-1), train.nan_to_num(-1)) for y in drawn)  # at the real images' own values
    got = {(r["condition"], r["training set"]): r for r in rows}
    assert {c for c, _ in got} == {"age", "sex"} and len(rows) == 2 * 5             # no row for `class`
    assert got["age", "real"]["images"] == 44 and got["age", "real"]["tested"] == 37
    assert got["age", "real + synthetic, w=2"]["images"] == 88 and got["sex", "real"]["images"] == 48
    for name in ("real", "synthetic, w=2", "real + synthetic, w=1"):
        assert got["age", name]["r"] > 0.8 and got["age", name]["mae"] < 3 and got["sex", name]["recognised"] > 0.9
    assert got["age", "synthetic, w=1"]["mae"] > 2 * got["age", "real"]["mae"]     # noise teaches nothing
    assert got["sex", "synthetic, w=1"]["recognised"] < 0.8
    assert "| age | synthetic, w=2 | 44 |" in format_condition_utility_table(rows)
    # a sample set's own images, at the values its manifest gives them (not the real images'): so read, they teach
    own = values(30, 5)
    for labelled, teaches in ((own, True), (own.flip(0), False)):       # its rows' values, or another image's
        rows = condition_utility((showing(train, 3), train), None, [], (showing(test, 4), test), conditions, 25,
                                 "cpu", drawn=(showing(own, 6), labelled))
        got = {(r["condition"], r["training set"]): r for r in rows}
        assert [name for c, name in got if c == "age"] == ["real", "synthetic, the set", "real + synthetic, the set"]
        assert got["age", "synthetic, the set"]["images"] == 30
        assert got["age", "real + synthetic, the set"]["images"] == 74
        assert (got["age", "synthetic, the set"]["r"] > 0.8) == teaches


def test_the_table_s_utility_leaves_the_class_column_to_the_classifier_and_trains_nothing_it_cannot_test(
        monkeypatch, capsys):
    import evaluation.utility as utility
    from conditions.table import Condition
    trained = []
    monkeypatch.setattr(utility, "train_condition_net", lambda *a, **k: trained.append(1))
    monkeypatch.setattr(utility, "read_back", lambda net, images, conditions, k, device: torch.zeros(len(images)))
    group, age = Condition("group", "category", ["AD", "NC"]), Condition("age", "continuous", low=60, high=80)
    real = (torch.zeros(4, 1, 8, 8), torch.tensor([[0.0, 0.5]] * 4))
    test = (torch.zeros(3, 1, 8, 8), torch.tensor([[0.0, 0.1], [1.0, 0.9], [1.0, 0.5]]))
    rows = utility.condition_utility(real, lambda y, w: torch.zeros(len(y), 1, 8, 8), [1.0], test, [group, age], 1,
                                     "cpu", classes=0)                # group names the class folders: not here
    assert {r["condition"] for r in rows} == {"age"} and len(trained) == 3 * utility.UTILITY_SEEDS
    untested = (test[0], torch.tensor([[0.0, math.nan]] * 3))
    assert utility.condition_utility(real, None, [1.0], untested, [group, age], 1, "cpu", classes=0) == []
    assert len(trained) == 3 * utility.UTILITY_SEEDS                  # nothing trained for a check that cannot run
    assert "0 held-out images have a value of age; it is not read back" in capsys.readouterr().out
    sex = Condition("sex", "category", ["F", "M"])                    # held-out: all F, one age
    one_value = (test[0], torch.tensor([[0.0, 0.5, 0.0]] * 3))
    utility.condition_utility((real[0], torch.tensor([[0.0, 0.5, 1.0]] * 4)), lambda y, w: torch.zeros(len(y), 1, 8, 8),
                              [1.0], one_value, [group, age, sex], 1, "cpu", classes=0)
    printed = capsys.readouterr().out
    assert "every held-out image with a value of sex has the same one (F): 'recognised' is the share read as it" \
        in printed
    assert "every held-out image with a value of age has the same one (70): its r is undefined" in printed


def test_utility_is_refused_where_it_cannot_mean_what_it_says_and_trains_every_row_on_as_many_images(capsys):
    from evaluation.utility import images_per_class
    from runtime.errors import BadInputError
    train, test = [0] * 9 + [1] * 12, [0, 0, 1]
    assert images_per_class(5, ["AD", "NC"], train, test, seen=False) == 5
    assert images_per_class(20, ["AD", "NC"], train, test, seen=False) == 9      # the real row has no more of AD
    assert "every row trains on 9 per class" in capsys.readouterr().out
    for classes, train_labels, test_labels, seen, message in (
            (["AD", "NC"], train, test, True, "trained on all subjects"),        # its samples carry the test subjects
            (["AD"], [0] * 9, [0, 0], False, "it has one (AD)"),
            (["AD", "NC"], train, [1, 1], False, "AD is missing"),               # AUC undefined on one class
            (["AD", "NC", "MCI"], train, [0, 1, 2], False, "MCI is missing")):
        assert message in str(pytest.raises(BadInputError, images_per_class, 5, classes, train_labels, test_labels,
                                            seen).value)


def test_utility_draws_each_class_with_the_condition_that_names_the_class_folders(tmp_path):
    from types import SimpleNamespace

    from conditions.table import Condition
    from evaluation.utility import class_column
    from runtime.errors import BadInputError
    age, group = Condition("age", "continuous", low=55, high=90), Condition("group", "category", ["AD", "NC"])
    assert class_column(SimpleNamespace(conditions=[age, Condition("class", "category", ["AD", "NC"])]), ["AD", "NC"], tmp_path) == 1
    assert class_column(SimpleNamespace(conditions=[age, Condition("sex", "category", ["F", "M"]), group]),
                        ["AD", "NC"], tmp_path) == 2                      # a table column of the same classes
    # no condition of the classes: the table's conditions are checked alone; neither: refused
    assert class_column(SimpleNamespace(conditions=[age, Condition("sex", "category", ["F", "M"])]), ["AD", "NC"],
                        tmp_path) is None
    assert class_column(SimpleNamespace(conditions=[age]), ["all"], tmp_path) is None       # a BIDS tree: one class
    with pytest.raises(BadInputError, match="without --conditional"):
        class_column(SimpleNamespace(conditions=[]), ["AD", "NC"], tmp_path)


def test_a_cached_feature_network_is_keyed_on_the_images_its_split_trains_on(tmp_path):
    """Another split of as many images (other subject rules, another slicing) must not find the feature network
    trained on this one: it would know subjects now held out."""
    from types import SimpleNamespace
    from evaluation.evaluate import feature_key
    from volumes.run_data import DataConfig
    data = DataConfig(root=str(tmp_path), image_size=32, holdout=0.5)
    dataset = SimpleNamespace(samples=[(f"/d/AD/s{i}_{k}.png", 0) for i in range(4) for k in range(2)],
                              slice_numbers=None)
    key = feature_key(data, dataset, [0, 1, 2, 3], 0.5, 0)
    assert feature_key(data, dataset, [3, 2, 1, 0], 0.5, 0) == key                  # the same images, in any order
    assert feature_key(data, dataset, [0, 1, 4, 5], 0.5, 0) != key                  # as many, others
    volumes = SimpleNamespace(samples=[("/d/AD/s0.nii.gz", 0)] * 4, slice_numbers=[10, 11, 12, 13])
    assert feature_key(data, volumes, [0, 1], 0.5, 0) != feature_key(data, volumes, [2, 3], 0.5, 0)  # other slices
