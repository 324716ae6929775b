"""The commands end to end on a miniature folder: files written, resume, and every bad input's one-line error."""
import csv
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image

import driver
from conftest import SMALL_UNET, SMALL_VQ, ckpt, error_of, unet, vqvae  # noqa: F401  (trained_run is a conftest fixture)

REPO = Path(__file__).resolve().parents[1]
def test_train_vqvae_writes_checkpoint_grid_log_and_plot(trained_run):
    run, _ = trained_run
    for name in ("vqvae.pt", "recon_vqvae.png", "recon_step0000002.png", "log_vqvae.csv", "loss_vqvae.png", "config.json"):
        assert (run / name).exists(), name
    c = ckpt(run / "vqvae.pt")
    assert c["kind"] == "vqvae" and c["step"] == 4 and {"model", "optimizer", "config"} <= set(c)
    rows = list(csv.DictReader(open(run / "log_vqvae.csv")))
    assert [int(r["step"]) for r in rows] == [2, 4]
    grid = Image.open(run / "recon_vqvae.png")
    assert grid.height > 2 * 32 and grid.height < 3 * 32   # originals above, reconstructions below


def test_train_unet_writes_checkpoint_with_scale_and_cache(trained_run):
    run, _ = trained_run
    c = ckpt(run / "unet.pt")
    assert c["kind"] == "unet" and c["step"] == 4
    z = ckpt(run / "latents.pt")["z"]
    assert z.shape == (24, 4, 16, 16)
    assert c["latent_scale"] == pytest.approx(1 / z.std().item(), rel=1e-5)
    assert {"ema", "latent_shape", "vqvae_fingerprint", "diffusion"} <= set(c)
    assert (run / "samples_step0000004.png").exists() and (run / "loss_unet.png").exists()


def test_predict_writes_grid_images_and_gif(trained_run, tmp_path):
    run, _ = trained_run
    from predict import main as predict_main
    predict_main(["--run", str(run), "--out", str(tmp_path), "--num", "3", "--sampler", "ddim", "--steps", "10",
                  "--repeat-times", "2", "--repeat-last", "5", "--gif-frames", "6", "--gif-xt"])
    assert (tmp_path / "samples.png").exists()
    assert sorted(p.name for p in (tmp_path / "samples").iterdir()) == ["0000.png", "0001.png", "0002.png"]
    assert Image.open(tmp_path / "samples" / "0000.png").size == (32, 32)
    gif = Image.open(tmp_path / "denoise.gif")
    assert gif.n_frames == 6 + 2                          # main pass frames + one per repeat


def test_predict_every_sampler_and_eta_reach_the_images(trained_run, tmp_path):
    import predict
    run, _ = trained_run
    outputs = {}
    for name, flags in {"dpmpp": ["--sampler", "dpmpp", "--steps", "10"], "ddim": ["--sampler", "ddim", "--steps", "10"],
                        "ddim-eta1": ["--sampler", "ddim", "--steps", "10", "--eta", "1"]}.items():
        outputs[name] = predict.predict(predict.parse_args(["--run", str(run), "--out", str(tmp_path / name), "--num", "2",
                                                            "--repeat-times", "0", "--gif-frames", "3", *flags]))
        assert outputs[name].shape == (2, 1, 32, 32) and (tmp_path / name / "denoise.gif").exists()
    assert not torch.equal(outputs["ddim"], outputs["ddim-eta1"])  # --eta reaches the sampler
    assert not torch.equal(outputs["ddim"], outputs["dpmpp"])


def test_predict_ddpm_default_runs_the_full_chain(trained_run, tmp_path):
    run, _ = trained_run
    from predict import main as predict_main
    predict_main(["--run", str(run), "--out", str(tmp_path), "--num", "1", "--repeat-times", "1", "--gif-frames", "3"])
    assert Image.open(tmp_path / "denoise.gif").n_frames == 3 + 1


def test_resume_continues_from_the_saved_step(trained_run, tmp_path):
    run, data = trained_run
    import shutil
    copy = tmp_path / "run"
    shutil.copytree(run, copy)
    vqvae(copy, data, "--max-steps", "6", "--resume")
    assert ckpt(copy / "vqvae.pt")["step"] == 6
    assert [int(r["step"]) for r in csv.DictReader(open(copy / "log_vqvae.csv"))] == [2, 4, 6]
    # the UNet learned the old VQ-VAE's latents: resuming it on the new one is refused
    assert "another VQ-VAE" in error_of(unet, copy, "--max-steps", "6", "--resume")
    shutil.copy(run / "vqvae.pt", copy / "vqvae.pt")
    unet(copy, "--max-steps", "6", "--resume")
    assert ckpt(copy / "unet.pt")["step"] == 6
    assert [int(r["step"]) for r in csv.DictReader(open(copy / "log_unet.csv"))] == [2, 4, 6]


def test_min_snr_gamma_is_saved_in_the_checkpoint_and_used_when_sampling(trained_run, tmp_path):
    import shutil
    import predict
    run, _ = trained_run
    copy = tmp_path / "run"
    shutil.copytree(run, copy)
    (copy / "unet.pt").unlink()
    unet(copy, "--max-steps", "2", "--min-snr-gamma", "5")
    assert ckpt(copy / "unet.pt")["diffusion"]["min_snr_gamma"] == 5.0
    assert predict.load_models(copy, "cpu")[2].min_snr_gamma == 5.0
    assert "min_snr_gamma" in error_of(unet, copy, "--max-steps", "4", "--resume")  # resuming without it is refused


def test_conditional_run_generates_a_chosen_class_and_all_classes(trained_run, tmp_path):
    import shutil
    import predict
    run, _ = trained_run
    copy = tmp_path / "run"
    shutil.copytree(run, copy)
    (copy / "unet.pt").unlink()
    unet(copy, "--max-steps", "2", "--conditional", "--label-dropout", "0.2")
    saved = ckpt(copy / "unet.pt")
    assert saved["classes"] == ["AD", "NC"] and saved["config"]["num_classes"] == 2
    assert "class_emb.weight" in saved["model"] and "class_emb.weight" not in ckpt(run / "unet.pt")["model"]
    assert ckpt(copy / "latents.pt")["y"].tolist() == ([0] * 6 + [1] * 6) * 2  # train/{AD,NC} then test/{AD,NC}
    common = ["--run", str(copy), "--num", "2", "--sampler", "ddim", "--steps", "5", "--repeat-times", "0", "--gif-frames", "2"]
    one = predict.predict(predict.parse_args([*common, "--out", str(tmp_path / "ad"), "--class", "AD", "--guidance", "3"]))
    assert one.shape == (2, 1, 32, 32)
    both = predict.predict(predict.parse_args([*common, "--out", str(tmp_path / "all"), "--class", "all", "--num", "3"]))
    assert both.shape == (6, 1, 32, 32)
    width, height = Image.open(tmp_path / "all" / "samples.png").size
    assert width > 1.4 * height  # one row of 3 per class: 2 rows
    assert "not a class of this run: AD, NC" in error_of(predict.main, [*common, "--class", "MCI"])
    assert "--guidance" in error_of(predict.main, [*common, "--class", "AD", "--guidance", "-1"])
    # evaluate: every class at every guidance scale, against that class's held-out subjects
    import json
    evaluate = ["evaluate", "--features", "domain", "--classifier-steps", "0", "--steps", "3", "--holdout", "0.75"]
    driver.main([*evaluate, "--run", str(copy), "--out", str(tmp_path / "eval"), "--class", "all", "--guidance", "0,2"])
    rows = json.loads((tmp_path / "eval" / "metrics.json").read_text())["per_class"]
    assert [(r["class"], r["images"]) for r in rows] == [(c, k) for c in ("AD", "NC") for k in (
        "samples, w=0", "samples, w=2", "real (training)", "real (floor)", "real (held out)")]
    assert all(0 <= r["recognised"] <= 1 for r in rows) and "## Per class" in (tmp_path / "eval" / "report.md").read_text()
    assert "--guidance" in error_of(driver.main, [*evaluate, "--run", str(copy), "--class", "AD", "--guidance", "1,-2"])
    # the unconditional run refuses --class; resuming the conditional one without --conditional is refused
    assert "without --conditional" in error_of(predict.main, ["--run", str(run), "--num", "1", "--class", "AD"])
    assert "without --conditional" in error_of(driver.main, [*evaluate, "--run", str(run), "--class", "AD"])
    assert "num_classes" in error_of(unet, copy, "--max-steps", "4", "--resume")


def test_latent_cache_is_reused_not_recomputed(trained_run, tmp_path, monkeypatch):
    run, _ = trained_run
    import shutil
    import train
    copy = tmp_path / "run"
    shutil.copytree(run, copy)
    (copy / "unet.pt").unlink()
    monkeypatch.setattr(train, "encode_dataset", lambda *a, **k: pytest.fail("latents were recomputed"))
    monkeypatch.setattr(train, "load_slices", lambda *a, **k: pytest.fail("stage 2 decoded images"))
    unet(copy, "--max-steps", "2")
    assert ckpt(copy / "unet.pt")["step"] == 2


# ----------------------------------------------------------------------------- bad input

def test_missing_data_folder(tmp_path):
    msg = error_of(vqvae, tmp_path / "run", tmp_path / "nowhere", "--max-steps", "1")
    assert "does not exist" in msg and not (tmp_path / "run" / "vqvae.pt").exists()


def test_folder_without_images(tmp_path):
    (tmp_path / "data" / "AD").mkdir(parents=True)
    assert "no images" in error_of(vqvae, tmp_path / "run", tmp_path / "data", "--max-steps", "1")


def test_corrupt_image_named(adni_folder, tmp_path):
    (adni_folder / "test" / "NC" / "bad_80.jpeg").write_bytes(b"garbage")
    assert "bad_80.jpeg" in error_of(vqvae, tmp_path / "run", adni_folder, "--max-steps", "1")


def test_existing_checkpoint_needs_resume_and_a_matching_config(trained_run):
    run, data = trained_run
    before = (run / "vqvae.pt").read_bytes()
    assert "--resume" in error_of(vqvae, run, data, "--max-steps", "8")
    assert "different config" in error_of(vqvae, run, data, "--max-steps", "8", "--resume", "--codebook-size", "64")
    assert (run / "vqvae.pt").read_bytes() == before


def test_train_unet_without_vqvae(tmp_path):
    assert "no vqvae checkpoint" in error_of(unet, tmp_path / "run", "--max-steps", "1")


def test_predict_without_unet(trained_run, tmp_path):
    run, _ = trained_run
    (tmp_path / "vqvae.pt").write_bytes((run / "vqvae.pt").read_bytes())
    from predict import main as predict_main
    assert "no unet checkpoint" in error_of(predict_main, ["--run", str(tmp_path)])


def test_unet_from_another_vqvae_is_refused(trained_run, tmp_path):
    run, data = trained_run
    other = tmp_path / "other"
    vqvae(other, data, "--max-steps", "2", "--seed", "1")
    (other / "unet.pt").write_bytes((run / "unet.pt").read_bytes())
    from predict import main as predict_main
    assert "another VQ-VAE" in error_of(predict_main, ["--run", str(other), "--num", "1"])


def test_wrong_kind_of_checkpoint_is_refused(trained_run, tmp_path):
    run, _ = trained_run
    (tmp_path / "vqvae.pt").write_bytes((run / "vqvae.pt").read_bytes())
    (tmp_path / "unet.pt").write_bytes((run / "vqvae.pt").read_bytes())
    from predict import main as predict_main
    assert "not a unet checkpoint" in error_of(predict_main, ["--run", str(tmp_path)])


def test_nan_loss_stops_without_overwriting_the_checkpoint(trained_run, tmp_path, monkeypatch):
    run, _ = trained_run
    import shutil
    from modules import GaussianDiffusion
    copy = tmp_path / "run"
    shutil.copytree(run, copy)
    before = (copy / "unet.pt").read_bytes()
    monkeypatch.setattr(GaussianDiffusion, "loss", lambda self, model, x0, **kw: model(x0, torch.zeros(len(x0), dtype=torch.long, device=x0.device)).sum() * float("nan"))
    msg = error_of(unet, copy, "--max-steps", "8", "--resume")
    assert "nan" in msg.lower() and "last good checkpoint" in msg
    assert (copy / "unet.pt").read_bytes() == before


def test_fp16_without_cuda_is_a_clear_error(adni_folder, tmp_path):
    if torch.cuda.is_available():
        pytest.skip("fp16 is allowed on CUDA")
    msg = error_of(vqvae, tmp_path / "run", adni_folder, "--max-steps", "1", "--precision", "fp16", "--device", "cpu")
    assert "fp16 needs a CUDA device" in msg and not (tmp_path / "run" / "vqvae.pt").exists()


def test_errors_print_one_line_without_traceback(tmp_path):
    proc = subprocess.run([sys.executable, str(REPO / "driver.py"), "train-vqvae", "--run", str(tmp_path / "r"),
                           "--data", str(tmp_path / "missing")], capture_output=True, text=True, cwd=tmp_path)
    assert proc.returncode != 0
    assert "Traceback" not in proc.stderr and proc.stderr.strip().startswith("error:")


def test_help_documents_defaults():
    for command in ("train-vqvae", "train-unet", "sample", "demo"):
        proc = subprocess.run([sys.executable, str(REPO / "driver.py"), command, "--help"], capture_output=True, text=True)
        assert proc.returncode == 0 and "default" in proc.stdout
    out = subprocess.run([sys.executable, str(REPO / "driver.py"), "train-vqvae", "--help"], capture_output=True, text=True).stdout
    assert "tiny 512, full 4096" in out.replace("\n", " ").replace("  ", " ") or "tiny 512" in out


def test_demo_data_is_the_default(tmp_path):
    driver.main(["train-vqvae", "--run", str(tmp_path / "run"), "--demo-dir", str(tmp_path / "demo"),
                 "--max-steps", "1", "--batch-size", "4", "--vq-channels", "8"])
    c = ckpt(tmp_path / "run" / "vqvae.pt")
    assert "mni152-demo" in c["data"] and c["config"]["image_size"] == 64 and c["config"]["codebook_size"] == 512


def test_predict_defaults_are_the_cards():
    from predict import parse_args
    args = parse_args([])
    assert (args.sampler, args.steps, args.repeat_last, args.repeat_times) == ("ddpm", 1000, 30, 5)
    sample = driver.parse(["sample"])
    assert (sample.sampler, sample.steps, sample.repeat_times) == ("dpmpp", 20, 0)  # the fastest sampler within 15% of DDPM-1000 (bench/README.md)


def test_held_out_subjects_stay_out_of_both_stages(adni_folder, tmp_path):
    run = tmp_path / "run"
    vqvae(run, adni_folder, "--max-steps", "1", "--holdout", "0.25", "--holdout-seed", "3")
    unet(run, "--max-steps", "1")
    assert ckpt(run / "latents.pt")["z"].shape[0] == 24 - 2 * 3     # 2 of 8 subjects, 3 slices each


@pytest.mark.parametrize("flags, message", [(["--num", "0"], "--num"), (["--steps", "-1"], "--steps"),
                                            (["--clip-x0", "wide"], "--clip-x0"),
                                            (["--repeat-last", "5000"], "--repeat-last"), (["--eta", "-1"], "--eta")])
def test_predict_flag_errors(trained_run, flags, message):
    run, _ = trained_run
    from predict import main as predict_main
    assert message in error_of(predict_main, ["--run", str(run), *flags])


def test_max_minutes_stops_cleanly_with_a_checkpoint_and_resume_continues(adni_folder, tmp_path):
    run = tmp_path / "run"
    vqvae(run, adni_folder, "--max-steps", "50", "--max-minutes", "0.0001")
    first = ckpt(run / "vqvae.pt")["step"]
    assert 1 <= first < 50 and (run / "recon_vqvae.png").exists() and (run / "loss_vqvae.png").exists()
    vqvae(run, adni_folder, "--max-steps", "50", "--resume")
    assert ckpt(run / "vqvae.pt")["step"] == 50
    unet(run, "--max-steps", "50", "--max-minutes", "0.0001")
    assert 1 <= ckpt(run / "unet.pt")["step"] < 50


def test_images_larger_than_cache_gb_are_decoded_once_to_disk_and_read_by_loader_workers(adni_folder, tmp_path, capsys):
    run = tmp_path / "run"
    vqvae(run, adni_folder, "--max-steps", "2", "--cache-gb", "0", "--workers", "2")
    assert ckpt(run / "vqvae.pt")["step"] == 2
    assert (run / "images-32px-1ch.npy").exists() and "decoded once" in capsys.readouterr().out
    unet(run, "--max-steps", "2", "--cache-gb", "0")  # encoding the latents reads the same file
    assert "images reused" in capsys.readouterr().out


def test_demo_runs_the_three_stages_in_order_with_the_tiny_preset(monkeypatch, tmp_path):
    import predict
    import train
    calls = []
    monkeypatch.setattr(train, "train_vqvae", lambda a: calls.append(("vqvae", a.preset, a.resume, a.data)))
    monkeypatch.setattr(train, "train_unet", lambda a: calls.append(("unet", a.preset, a.resume, a.data)))
    monkeypatch.setattr(predict, "predict", lambda a: calls.append(("predict", a.sampler, a.steps, a.repeat_times)))
    driver.main(["demo", "--run", str(tmp_path / "run"), "--demo-dir", str(tmp_path / "demo")])
    assert calls == [("vqvae", "tiny", True, None), ("unet", "tiny", True, None), ("predict", "ddpm", 1000, 5)]
