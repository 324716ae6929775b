"""train-decoder (train.train_decoder): the VQ-VAE's decoder fine-tuned alone, so that the latents and the UNet trained
on them stay valid; RUN/decoder.pt, which sampling then decodes with, tied to the VQ-VAE it was fine-tuned from."""
import csv
import json
import shutil

import numpy as np
import torch
from PIL import Image

import driver
import predict
from conftest import ckpt, error_of, vqvae
from runtime.checkpoint import fingerprint
from runtime.models import load_run

SMALL = ["--batch-size", "4", "--log-every", "2", "--sample-every", "2", "--save-every", "2", "--workers", "1"]
FAST = ["--sampler", "ddim", "--steps", "3", "--gif-frames", "2", "--num", "3"]


def decoder(run, *extra):
    driver.main(["train-decoder", "--run", str(run), *SMALL, *extra])


def test_train_decoder_changes_the_decoder_alone_and_the_run_samples_with_it(trained_run, tmp_path):
    run, _ = trained_run
    copy = tmp_path / "run"
    shutil.copytree(run, copy)
    before = (copy / "vqvae.pt").read_bytes()
    decoder(copy, "--max-steps", "3")
    assert (copy / "vqvae.pt").read_bytes() == before  # stage 1's file, and the UNet's tie to it, are untouched
    saved, original = ckpt(copy / "decoder.pt"), ckpt(copy / "vqvae.pt")["model"]
    assert (saved["kind"], saved["step"]) == ("decoder", 3)
    assert saved["vqvae_fingerprint"] == fingerprint(original)
    assert {k for k, v in saved["model"].items() if not torch.equal(v, original[f"decoder.{k}"])}  # it learned
    # by default the anchors' recipe, saved with the run; `tiny`'s PatchGAN at 0.1 judges 16x16 patches (one stride-2
    # layer), and is saved beside the decoder
    a = saved["args"]
    assert (a["reconstruction_loss"], a["perceptual_network"], a["perceptual_weight"], a["adversarial_loss"],
            a["adversarial_weighting"], a["adversarial_weight"], a["discriminator_layers"]) == (
        "l1", "random", 1.0, "least-squares", "fixed", 0.1, 1)
    assert saved["disc_config"]["num_layers"] == 1 and "discriminator" in saved

    # the run decodes with the fine-tuned decoder, and encodes with stage 1's encoder and codebook as they were
    model = load_run(copy, "cpu")
    state = model.vqvae.state_dict()
    for name, tensor in original.items():
        expected = saved["model"][name[len("decoder."):]] if name.startswith("decoder.") else tensor
        assert torch.equal(state[name], expected), name
    assert model.decoder_fingerprint == fingerprint(saved["model"])
    assert load_run(run, "cpu").decoder_fingerprint is None  # a run without one decodes as before

    # the samples' manifest names the decoder that made them
    driver.main(["sample", "--run", str(copy), "--out", str(tmp_path / "out"), *FAST])
    with open(tmp_path / "out" / "samples" / "manifest.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert {r["decoder_fingerprint"] for r in rows} == {fingerprint(saved["model"])}
    # and so does evaluate, whose reconstructions it decodes
    evaluate = ["evaluate", "--run", str(copy), "--features", "domain", "--classifier-steps", "2", "--holdout", "0.5",
                "--num", "4", *FAST[:4]]
    driver.main([*evaluate, "--out", str(tmp_path / "eval")])
    metrics = json.loads((tmp_path / "eval" / "metrics.json").read_text())
    assert metrics["finetuned_decoder"] == {"step": 3, "fingerprint": fingerprint(saved["model"])}
    assert "its decoder fine-tuned alone (train-decoder, step 3)" in (tmp_path / "eval" / "report.md").read_text()

    # --decoder stage-1 decodes with stage 1's own decoder, as if there were no decoder.pt: the same images as the run
    # without one, and manifests that name no fine-tuned decoder
    images = {name: predict.predict(driver.parse(["sample", "--run", str(r), "--out", str(tmp_path / name), *FAST,
                                                  *flags]))
              for name, r, flags in [("stage1", copy, ["--decoder", "stage-1"]), ("plain", run, []),
                                     ("finetuned", copy, [])]}
    assert torch.equal(images["stage1"], images["plain"]) and not torch.equal(images["stage1"], images["finetuned"])
    with open(tmp_path / "stage1" / "samples" / "manifest.csv", newline="") as f:
        assert "decoder_fingerprint" not in next(csv.DictReader(f))
    # evaluate scores stage 1's decoder beside the fine-tuned one, the same figures --decoder stage-1 gives alone
    driver.main([*evaluate, "--decoder", "stage-1", "--out", str(tmp_path / "eval1")])
    alone = json.loads((tmp_path / "eval1" / "metrics.json").read_text())
    assert alone["finetuned_decoder"] is None and "vqvae_stage1_decoder" not in alone
    assert metrics["vqvae_stage1_decoder"] == {k: alone["vqvae"][k] for k in ("psnr", "ssim")}
    assert metrics["vqvae_stage1_decoder"]["psnr"] != metrics["vqvae"]["psnr"]
    beside = metrics["scores"]["reconstructions, stage 1's decoder"]
    assert beside["fid"] == alone["scores"]["reconstructions"]["fid"] != metrics["scores"]["reconstructions"]["fid"]


def test_a_counterfactual_names_the_decoder_it_decodes_with(trained_run, tmp_path):
    run, data = trained_run
    copy = tmp_path / "run"
    shutil.copytree(run, copy)
    decoder(copy, "--max-steps", "2", "--perceptual-weight", "0")
    image, mask = next((data / "train" / "AD").iterdir()), tmp_path / "mask.png"
    Image.fromarray(np.full((8, 8), 255, dtype=np.uint8)).save(mask)
    fill = ["counterfactual", "--run", str(copy), "--input", str(image), "--mask", str(mask), "--steps", "2"]
    records = {}
    for name, flags in [("finetuned", []), ("stage1", ["--decoder", "stage-1"])]:
        driver.counterfactual.counterfactual(driver.parse([*fill, *flags, "--out", str(tmp_path / name)]))
        records[name] = json.loads((tmp_path / name / "counterfactual.json").read_text())
    assert records["finetuned"]["decoder_fingerprint"] == fingerprint(ckpt(copy / "decoder.pt")["model"])
    assert records["stage1"]["decoder_fingerprint"] is None  # stage 1's own
    assert records["stage1"]["unet_fingerprint"] == records["finetuned"]["unet_fingerprint"]


def test_train_decoder_resumes_with_its_own_settings_and_refuses_others(trained_run, tmp_path):
    run, _ = trained_run
    copy = tmp_path / "run"
    shutil.copytree(run, copy)
    decoder(copy, "--max-steps", "2", "--perceptual-weight", "0", "--adversarial-weight", "0.01")
    assert "--resume" in error_of(decoder, copy, "--max-steps", "4")
    decoder(copy, "--max-steps", "4", "--resume")
    saved = ckpt(copy / "decoder.pt")
    # a decoder begun with the adversarial term (the `tiny` default before 2026-12-06) keeps it, and its discriminator
    assert saved["step"] == 4 and saved["args"]["perceptual_weight"] == 0
    assert saved["args"]["adversarial_weight"] == 0.01
    assert "discriminator" in saved
    with open(copy / "log_decoder.csv", newline="") as f:
        assert [int(r["step"]) for r in csv.DictReader(f)] == [2, 4]
    message = error_of(decoder, copy, "--max-steps", "6", "--resume", "--reconstruction-loss", "mse")
    assert "--reconstruction-loss mse differs from this run's l1" in message
    # a decoder begun without the PatchGAN (the `tiny` default before its 16x16 patches) resumes without one
    shutil.rmtree(copy)
    shutil.copytree(run, copy)
    decoder(copy, "--max-steps", "2", "--adversarial-weight", "0")
    decoder(copy, "--max-steps", "4", "--resume")
    saved = ckpt(copy / "decoder.pt")
    assert saved["step"] == 4 and saved["args"]["adversarial_weight"] == 0 and "discriminator" not in saved


def test_a_decoder_fine_tuned_from_another_vqvae_is_refused(trained_run, tmp_path):
    run, data = trained_run
    copy = tmp_path / "run"
    shutil.copytree(run, copy)
    decoder(copy, "--max-steps", "2", "--perceptual-weight", "0")
    assert "unet.pt and decoder.pt in" in error_of(vqvae, copy, data, "--max-steps", "6", "--resume")
    for name in ("decoder.pt", "unet.pt"):                            # moved away, stage 1 trained further, moved back
        (copy / name).rename(tmp_path / name)
    vqvae(copy, data, "--max-steps", "6", "--resume")  # stage 1 trained further: other latents, another decoder
    for name in ("decoder.pt", "unet.pt"):
        (tmp_path / name).rename(copy / name)
    assert "decoder.pt was fine-tuned from another VQ-VAE" in error_of(
        driver.main, ["sample", "--run", str(copy), "--out", str(tmp_path / "out"), *FAST])
    assert "decoder.pt was fine-tuned from another VQ-VAE" in error_of(decoder, copy, "--max-steps", "4", "--resume")
