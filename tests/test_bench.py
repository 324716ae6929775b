"""bench/gpu_check.py and bench/time_to_quality.sh: the commands a GPU's few minutes are spent on, proved on the CPU
first (dry runs with tiny shapes take every part and flag path), and the check's record of a part that fails or runs
out of time; the other benchmarks' own logic (quality.py's split and reuse, seed_spread.py, memorisation_screen.py)."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))
import gpu_check  # noqa: E402


def test_the_gpu_check_runs_every_part_on_the_cpu_and_writes_its_record(tmp_path):
    done = subprocess.run([sys.executable, "bench/gpu_check.py", "--dry-run", "--device", "cpu", "--out", str(tmp_path)],
                          cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    report = json.loads((tmp_path / "gpu_check.json").read_text())
    parts = report["parts"]
    assert list(parts) == ["cuda_tests", "training", "samplers", "profile"] and all(p["ok"] for p in parts.values())
    tests = parts["cuda_tests"]["results"]
    assert tests["tests"] >= 8 and tests["tests"] == tests["skipped"] and tests["failed"] == []   # no GPU here
    training = parts["training"]["results"]
    assert {r["case"] for r in training["models"]} == {"VQ-VAE 64x64", "UNet 4x16x16"}
    assert [(r["stage"], r["batch"]) for r in training["batches"]] == [("vqvae", 2), ("vqvae", 4), ("unet", 4), ("unet", 8)]
    assert [(r["sampler"], r["batch"]) for r in parts["samplers"]["results"]["samplers"]] == [
        ("ddim-50", 2), ("dpmpp-sde-20", 2), ("dpmpp-sde-20", 3)]
    assert parts["profile"]["results"]["top_kernels"] and parts["profile"]["results"]["step_ms"] > 0
    table = (tmp_path / "gpu_check.md").read_text()
    assert all(f"| {name} | yes |" in table for name in parts)


def test_a_part_that_fails_or_runs_out_of_time_is_recorded_and_the_next_one_runs(tmp_path):
    failing = gpu_check.run_part("x", [[sys.executable, "-c", "print('partial'); raise SystemExit(3)"]], 60)
    assert not failing["ok"] and failing["returncodes"] == [3] and "partial" in failing["output_tail"]
    slow = gpu_check.run_part("x", [[sys.executable, "-c", "import time; print('started', flush=True); time.sleep(60)"],
                                    [sys.executable, "-c", "pass"]], 3)
    assert not slow["ok"] and slow["returncodes"][0].startswith("timed out") and slow["seconds"] < 10
    assert slow["returncodes"][1] == "no time left"
    report = {"started": "now", "device": "CPU", "torch": "x", "dry_run": True,
              "parts": {"cuda_tests": {**failing, "results": {}}, "training": {**slow, "results": {}}}}
    gpu_check.write_report(report, tmp_path)
    assert "| cuda_tests | NO |" in (tmp_path / "gpu_check.md").read_text()
    assert json.loads((tmp_path / "gpu_check.json").read_text())["parts"]["training"]["ok"] is False


def test_time_to_quality_trains_both_stages_evaluates_and_writes_the_finest_band_on_the_cpu(tmp_path):
    """bench/time_to_quality.sh with the `tiny` preset and small shapes: the same script a GPU's minutes run, whole and
    with stage 1 alone (UNET_MINUTES 0); what comes back is at most 8 files, the run kept elsewhere."""
    import numpy as np
    from conftest import SMALL_UNET, SMALL_VQ, write_blob_images

    rng = np.random.default_rng(0)
    for label in ("AD", "NC"):
        write_blob_images(tmp_path / "data" / "train" / label, [f"{label}{i}" for i in range(10)], 4, rng, size=(64, 64))
    env = {**os.environ, "PRESET": "tiny", "VQ_FLAGS": " ".join(SMALL_VQ), "UNET_FLAGS": " ".join(SMALL_UNET),
           "EVALUATE_FLAGS": "--classifier-steps 2 --num 8 --batch-size 8"}

    def time_to_quality(name: str, unet_minutes: str) -> Path:
        out = tmp_path / name
        done = subprocess.run(["bash", "bench/time_to_quality.sh", str(tmp_path / "data"), str(out), "0.02", unet_minutes],
                              cwd=ROOT, env={**env, "RUN_DIR": str(tmp_path / f"{name}_run")}, capture_output=True,
                              text=True, timeout=600)
        assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
        return out

    out = time_to_quality("whole", "0.02")
    assert [line.split()[0] for line in (out / "times.txt").read_text().splitlines()] == ["vqvae", "unet", "evaluate"]
    assert sorted(p.name for p in out.iterdir()) == ["eval_crops.png", "eval_samples.png", "finest_band.md", "log.txt",
                                                     "metrics.json", "report.md", "times.txt"]
    table = (out / "finest_band.md").read_text()
    assert "finest band (32 px)" in table and "| real (training) |" in table and "| 1.00x |" in table
    assert "| samples |" in table and "| reconstructions |" in table

    out = time_to_quality("stage1", "0")
    assert [line.split()[0] for line in (out / "times.txt").read_text().splitlines()] == ["vqvae", "evaluate"]
    table = (out / "finest_band.md").read_text()
    assert "| reconstructions |" in table and "| samples |" not in table


def test_the_brightness_distance_of_latent_means_is_the_1d_wasserstein_distance():
    import torch
    from latent_means import wasserstein_1d
    a = torch.randn(400, generator=torch.Generator().manual_seed(0))
    assert abs(wasserstein_1d(a, a + 0.3) - 0.3) < 1e-6                              # a shift moves every quantile
    assert abs(wasserstein_1d(a, 2 * a) - a.abs().mean().item()) < 5e-3             # |2a - a| on average
    assert wasserstein_1d(a, a[torch.randperm(400)]) < 1e-9                          # order does not matter


def test_the_benchmarks_key_their_feature_network_on_the_folder_not_on_how_it_was_spelled(adni_folder, monkeypatch):
    """quality.py, seed_spread.py ... keep one domain feature network per OUT, reused while the key is equal: a
    relative path, an absolute one and a link to the folder are the same data, so the same network and FIDs."""
    from quality import held_out_split
    monkeypatch.chdir(adni_folder.parent)
    link = adni_folder.parent / "link"
    link.symlink_to(adni_folder)
    keys = [held_out_split(spelling, 0.5)[2] for spelling in (str(adni_folder), "adni", "./adni/", str(link))]
    assert all(key == keys[0] for key in keys) and keys[0]["data"] == str(adni_folder.resolve())
    assert held_out_split("adni", 0.25)[2] != keys[0]                                 # another split is another key


@pytest.mark.parametrize("version", [4, 5, 6])
def test_quality_scores_its_rows_on_the_subjects_their_training_left_out(tmp_path, version):
    """quality.py splits the data before its rows train, by the rules of their data layout: its training part is
    exactly the files train-vqvae --holdout trains on (version 5 draws the hold-out within classes, 4 from all of
    them at once), so that reference A and floor B hold no subject a row trained on."""
    import numpy as np
    from conftest import write_blob_images
    from quality import held_out_split
    from volumes.layouts import Layout
    from volumes.run_data import DataConfig, training_files
    rng = np.random.default_rng(0)
    for label, subjects in (("AD", 9), ("NC", 3)):
        write_blob_images(tmp_path / "data" / label, [f"{label}{i}" for i in range(subjects)], 2, rng, size=(16, 16))
    dataset, (train_idx, ref_idx, floor_idx), key = held_out_split(str(tmp_path / "data"), 0.25, version)
    trained, _ = training_files(DataConfig(root=str(tmp_path / "data"), image_size=64, holdout=0.25,
                                           layout=Layout(version=version)))
    assert sorted(dataset.samples[i][0] for i in train_idx) == sorted(p for p, _ in trained)
    assert len(ref_idx) + len(floor_idx) == len(dataset) - len(trained)
    assert key.get("layout") == (version if version >= 5 else None)


def test_a_reused_row_agrees_with_the_call_that_would_have_trained_it_or_is_refused(trained_run):
    """quality.py scores a row already in OUT as it is: another seed, hold-out or flag of the call would label it
    with settings it was not trained with (another hold-out: scored on subjects it trained on)."""
    from conftest import SMALL_VQ
    from quality import train_or_reuse
    run, data = trained_run
    command = ["--run", str(run), "--data", str(data), "--preset", "tiny", "--seed", "0", "--max-steps", "8", *SMALL_VQ]
    assert train_or_reuse("vqvae", command, run) == {"reused": {"max_steps": 4, "max_minutes": None, "seed": 0}}
    for other, said in ((["--seed", "1"], "--seed 1 differs"), (["--holdout", "0.3"], "--holdout 0.3 differs"),
                        (["--codebook-size", "64"], "--codebook-size 64 differs")):
        with pytest.raises(SystemExit) as e:
            train_or_reuse("vqvae", [*command, *other], run)
        assert said in str(e.value) and f"{run} is reused" in str(e.value)


def test_seed_spread_takes_the_quality_folders_split_and_feature_network(tmp_path):
    """Another --holdout would score rows on subjects they trained on; another --classifier-steps would train a
    feature network over OUT's, moving its every FID."""
    from argparse import Namespace
    from seed_spread import quality_settings
    key = {"data": str(tmp_path / "adni"), "image_size": 64, "channels": 1, "holdout": 0.2, "holdout_seed": 0,
           "count": 10, "steps": 20}
    torch.save({"kind": "classifier", "key": key}, tmp_path / "classifier.pt")
    (tmp_path / "quality.json").write_text(json.dumps({"info": {"samples": 16}}))
    unset = Namespace(data=None, holdout=None, classifier_steps=None)
    assert quality_settings(tmp_path, unset, "ours") == (key["data"], 0.2, 20, 16)
    assert quality_settings(tmp_path, Namespace(data=str(tmp_path / "adni/"), holdout=0.2, classifier_steps=20),
                            "ours")[:3] == (key["data"], 0.2, 20)
    for name, value in (("holdout", 0.1), ("classifier_steps", 1000), ("data", str(tmp_path))):
        with pytest.raises(SystemExit, match=f"--{name.replace('_', '-')} .* is not OUT's"):
            quality_settings(tmp_path, Namespace(**{**vars(unset), name: value}), "ours")


def test_seed_spread_falls_back_on_the_rows_own_split_in_an_older_quality_folder(trained_run, tmp_path):
    """An OUT with Inception features (no classifier.pt) and a quality.json from before it recorded the hold-out."""
    from argparse import Namespace
    from seed_spread import quality_settings
    run, data = trained_run
    (tmp_path / "ours").symlink_to(run)
    (tmp_path / "quality.json").write_text(json.dumps({"info": {"samples": 8}}))
    unset = Namespace(data=None, holdout=None, classifier_steps=None)
    assert quality_settings(tmp_path, unset, "ours") == (str(data.resolve()), 0.0, 1000, 8)   # trained holding none


def test_the_memorisation_screen_withholds_the_exact_copies_it_planted(conditioned_run, tmp_path, monkeypatch):
    """bench/memorisation_screen.py on a tiny held-out run: 2 training slices planted as exact copies (and 2 as the
    VQ-VAE reconstructs them) in a set of 8; the exact copies are withheld, and the table counts every sample."""
    import memorisation_screen as screen
    run, _ = conditioned_run
    monkeypatch.setattr(sys, "argv", ["memorisation_screen.py", "--run", str(run), "--num", "8", "--plant", "2",
                                      "--out", str(tmp_path), "--evaluate-flags",
                                      "--features domain --classifier-steps 0"])
    screen.main()
    rows = {r["images"]: r for r in json.loads((tmp_path / "screen.json").read_text())["rows"]}
    assert rows["exact copy"]["n"] == 2 and rows["exact copy"]["withheld"] == 2 and rows["exact copy"]["by pixels"] == 2
    assert sum(r["n"] for r in rows.values()) == 8 and (tmp_path / "screen.md").read_text().count("\n") == 5
