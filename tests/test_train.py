"""train.py and the loop its stages share (runtime/loop.py): the optimizer step (gradient accumulation, two DDP ranks
over gloo), the loop's logs, checkpoints, stops and NaN guards, resume, and stage 2's latent cache.

The reference for DDP and accumulation is one process taking one step on the whole batch: 2 ranks x batch b,
and 1 rank x K micro-batches of b, must end with the parameters of 1 rank x batch 2b (or K*b).
"""
import argparse
import copy
import csv
import json
import os
import shutil
import socket
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torch.multiprocessing as mp
from PIL import Image

import driver
import losses.stage1 as stage1_losses
import predict
import train
from conftest import ckpt, disk_full, error_of, saved_flags_as, unet, vqvae, write_blob_images
from diffusion.gaussian import GaussianDiffusion
from losses.adversarial import Adversary
from modules import VQVAE, UNet, UNetConfig, VQVAEConfig
from runtime import loop
from runtime.errors import BadInputError
from runtime.models import load_run
from runtime.optimizer import adamw, load_optimizer
from runtime.process import any_rank, mean_over_ranks, setup_runtime, wrap_model
from volumes.run_data import DataConfig


BATCH = 4  # per rank / per micro-batch


def make_case(kind: str):
    """A small seeded model and 2 x BATCH fixed examples with a deterministic loss (fixed t and noise)."""
    g = torch.Generator().manual_seed(0)
    torch.manual_seed(0)
    if kind == "unet":
        model = UNet(UNetConfig(latent_size=8, channels=8, channel_mult=(1, 1, 1, 1), num_res_blocks=1))
        torch.nn.init.normal_(model.out[-1].weight, std=0.1)  # not the zero start: every layer gets a gradient
        diffusion = GaussianDiffusion(prediction="v")
        data = [(torch.randn(4, 8, 8, generator=g), torch.randint(0, 1000, (), generator=g), torch.randn(4, 8, 8, generator=g))
                for _ in range(2 * BATCH)]

        def loss_fn(batch):
            x0, t, noise = (torch.stack(v) for v in zip(*batch))
            loss = diffusion.loss(model_ref[0], x0, t, noise)
            return loss, loss.detach()
    else:
        model = VQVAE(VQVAEConfig(image_size=16, channels=8, channel_mult=(1, 2), num_res_blocks=1, codebook_size=16))
        model.quantizer.dead_threshold = 0.0  # no random code restarts: the step is a function of the batch
        data = [torch.rand(1, 16, 16, generator=g) * 2 - 1 for _ in range(2 * BATCH)]

        def loss_fn(batch):
            x = torch.stack(batch)
            recon, vq_loss, _ = model_ref[0](x)
            loss = torch.nn.functional.mse_loss(recon, x) + vq_loss
            return loss, loss.detach()
    model_ref = [model]
    return model, model_ref, loss_fn, data


def run_steps(kind: str, rt, micro_batches_of, steps: int = 2, grad_clip: float = 1.0):
    """`steps` optimizer steps with loop.optimizer_step; micro_batches_of(data) -> this rank's micro-batches."""
    model, model_ref, loss_fn, data = make_case(kind)
    wrapped = wrap_model(model, rt, compile_model=False)
    model_ref[0] = wrapped
    # SGD, not AdamW: Adam's update does not change when the gradient is scaled (a sum over ranks instead
    # of a mean would pass), and it blows float noise in gradients that are zero in exact arithmetic
    # (a conv bias before a per-channel GroupNorm, 1e-10) up to a visible step
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05)
    for _ in range(steps):
        loop.optimizer_step(wrapped, optimizer, rt.scaler, micro_batches_of(data), loss_fn, grad_clip=grad_clip)
    return model.state_dict()


def cpu_runtime():
    return setup_runtime("cpu")


def _rank_worker(rank: int, world: int, port: int, kind: str, out: str):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(world))
    torch.set_num_threads(1)
    rt = cpu_runtime()
    assert rt.world == world and rt.rank == rank
    assert mean_over_ranks(torch.tensor([float(rank)]), rt).item() == 0.5  # the logged loss: mean over ranks
    assert any_rank(rank == 1, rt) and not any_rank(False, rt)       # one rank out of time: all stop
    now = time.monotonic()  # rank 0 took 10 s for 100 steps, rank 1 20 s; 20 s are left: 300 and 200 more steps
    assert loop.end_by_deadline(100, (0, now - 10 * (rank + 1)), now + 20, rt) == 250  # one cooldown on all ranks
    state = run_steps(kind, rt, lambda data: [data[rank * BATCH:(rank + 1) * BATCH]], grad_clip=1e6)  # unclipped
    if rank == 0:
        torch.save(state, out)
    torch.distributed.destroy_process_group()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def assert_same_parameters(a: dict, b: dict, moved_from: dict, skip=()):
    moved = 0
    for name in set(a) - set(skip):
        torch.testing.assert_close(a[name], b[name], rtol=1e-3, atol=1e-5, msg=lambda m: f"{name}: {m}")
        moved += int(not torch.equal(a[name], moved_from[name]))
    assert moved > len(a) // 2  # the step changed most tensors, so equality is not trivial


@pytest.mark.parametrize("kind", ["unet", "vqvae"])
def test_two_ranks_with_batch_b_take_the_step_of_one_rank_with_batch_2b(kind, tmp_path, monkeypatch):
    for var in ("WORLD_SIZE", "RANK", "LOCAL_RANK"):
        monkeypatch.delenv(var, raising=False)
    out = tmp_path / "rank0.pt"
    mp.spawn(_rank_worker, args=(2, free_port(), kind, str(out)), nprocs=2, join=True)
    two_ranks = torch.load(out, weights_only=True)
    one_rank = run_steps(kind, cpu_runtime(), lambda data: [data], grad_clip=1e6)  # clipping would hide a sum of ranks
    assert_same_parameters(two_ranks, one_rank, make_case(kind)[0].state_dict())


@pytest.mark.parametrize("kind", ["unet", "vqvae"])
def test_grad_accum_k_gives_the_update_of_a_k_times_larger_batch(kind):
    rt = cpu_runtime()
    # unclipped: clipping at norm 1 would give the sum of the micro-batches' gradients (K times the mean) the same step
    accumulated = run_steps(kind, rt, lambda data: [data[:BATCH], data[BATCH:]], grad_clip=1e6)
    one_batch = run_steps(kind, rt, lambda data: [data], grad_clip=1e6)
    # the codebook-usage statistics are an EMA over forward passes (micro-batches), not a parameter
    assert_same_parameters(accumulated, one_batch, make_case(kind)[0].state_dict(), skip=["quantizer.usage"])
    half = run_steps(kind, rt, lambda data: [data[:BATCH]], grad_clip=1e6)  # and not the step of one micro-batch
    assert not torch.allclose(half["conv_in.weight" if kind == "unet" else "encoder.net.0.weight"],
                              one_batch["conv_in.weight" if kind == "unet" else "encoder.net.0.weight"], atol=1e-4)


def test_resume_continues_from_the_saved_step(trained_run, tmp_path):
    run, data = trained_run
    copy = tmp_path / "run"
    shutil.copytree(run, copy)
    # the UNet learned this VQ-VAE's latents: stage 1 is not trained further under it ...
    message = error_of(vqvae, copy, data, "--max-steps", "6", "--resume", "--cache-gb", "0")
    assert "unet.pt in" in message and "learned from this VQ-VAE at step 4" in message
    assert ckpt(copy / "vqvae.pt")["step"] == 4 and not list(copy.glob("images-*"))   # refused before any decoding
    vqvae(copy, data, "--max-steps", "4", "--resume")                  # (a finished stage 1 resumed trains nothing)
    for name in ("unet.pt", "unet.prev.pt"):                           # ... unless it is moved away first
        (copy / name).rename(tmp_path / name)
    vqvae(copy, data, "--max-steps", "6", "--resume")
    assert ckpt(copy / "vqvae.pt")["step"] == 6
    assert [int(r["step"]) for r in csv.DictReader(open(copy / "log_vqvae.csv"))] == [2, 4, 6]
    # and moved back, resuming it on the new VQ-VAE is refused
    for name in ("unet.pt", "unet.prev.pt"):
        (tmp_path / name).rename(copy / name)
    assert "another VQ-VAE" in error_of(unet, copy, "--max-steps", "6", "--resume")
    shutil.copy(run / "vqvae.pt", copy / "vqvae.pt")
    unet(copy, "--max-steps", "6", "--resume")
    assert ckpt(copy / "unet.pt")["step"] == 6
    assert [int(r["step"]) for r in csv.DictReader(open(copy / "log_unet.csv"))] == [2, 4, 6]


def test_a_finished_run_resumed_trains_nothing_and_leaves_its_checkpoints_be(trained_run, tmp_path, capsys):
    run, _ = trained_run
    copy = tmp_path / "run"
    shutil.copytree(run, copy)
    before = {name: (copy / name).read_bytes() for name in ("unet.pt", "unet.prev.pt", "log_unet.csv")}
    unet(copy, "--resume")                                           # its own length: already reached
    assert "nothing to train" in capsys.readouterr().out
    assert {name: (copy / name).read_bytes() for name in before} == before   # the previous one not lost


def test_the_log_holds_the_runs_own_history_after_a_failed_attempt_or_a_new_start(trained_run, tmp_path):
    run, _ = trained_run
    copy = tmp_path / "run"
    shutil.copytree(run, copy)
    logged = (copy / "log_unet.csv").read_text()
    assert logged.splitlines()[0].endswith(",lr,latents_per_s")      # stage 2 counts latents, as its line says
    speeds = [r["latents_per_s"] for r in csv.DictReader(logged.splitlines())]
    (copy / "log_unet.csv").write_text(logged.replace("latents_per_s", "img_per_s"))  # a log of before 2026-12-08
    with open(copy / "log_unet.csv", "a") as f:                       # logged by an attempt that then hit a NaN
        f.write("6,0.5,1e-3,10\r\n")
    unet(copy, "--max-steps", "8", "--resume")
    steps = lambda path: [int(r["step"]) for r in csv.DictReader(open(path))]  # noqa: E731
    assert steps(copy / "log_unet.csv") == [2, 4, 6, 8]               # not 2, 4, 6, 6, 8
    rows = list(csv.DictReader(open(copy / "log_unet.csv")))
    assert [r["latents_per_s"] for r in rows[:2]] == speeds and all(float(r["latents_per_s"]) > 0 for r in rows)
    for f in copy.glob("unet*.pt"):
        f.unlink()
    shutil.rmtree(copy / "ema_snapshots", ignore_errors=True)
    unet(copy, "--max-steps", "2")                                     # a new stage 2: a log of its own
    assert steps(copy / "log_unet.csv") == [2] and steps(copy / "log_unet.replaced.csv") == [2, 4, 6, 8]


def test_a_resumed_log_leaves_a_column_its_rows_lacked_empty_whatever_else_a_row_holds(tmp_path):
    from runtime.loop import MetricLog
    log = tmp_path / "log_unet.csv"
    log.write_text("step,loss,img_per_s\n2,0.5,310,999\n4,0.4,320\n6,0.3,330\n")  # a value past the header; no lr
    MetricLog(log, ["step", "loss", "lr", "latents_per_s"], resumed_at=4)
    assert log.read_text().splitlines() == ["step,loss,lr,latents_per_s", "2,0.5,,310", "4,0.4,,320"]


def test_a_grid_or_loss_curve_that_finds_the_disk_full_leaves_the_previous_one(tmp_path, monkeypatch):
    """The grids and the loss curve are written whole: a PNG writer cut short leaves the file of the last interval (or
    of the run resumed) as it was, and no piece of the new one, with one line to say so."""
    log = loop.MetricLog(tmp_path / "log.csv", ["step", "loss"])
    log.append({"step": 2, "loss": 0.5})
    stage = SimpleNamespace(name="unet", grid="samples", draw=lambda: (torch.rand(4, 1, 8, 8) * 2 - 1, 2))
    writes = {"samples_unet.png": lambda: loop.draw_grid(stage, tmp_path / "samples_unet.png", None, 2),
              "loss_unet.png": lambda: log.plot(tmp_path / "loss_unet.png", ("loss",), "unet training")}
    for write in writes.values():
        write()
    before = {name: (tmp_path / name).read_bytes() for name in writes}
    monkeypatch.setattr(Image.Image, "save", lambda self, fp, *args, **kwargs: disk_full(fp))  # matplotlib's too
    for name, write in writes.items():
        message = str(pytest.raises(BadInputError, write).value)
        assert message.endswith(f"{name} (No space left on device); the previous file is unchanged")
        assert (tmp_path / name).read_bytes() == before[name]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["log.csv", "loss_unet.png", "samples_unet.png"]


@pytest.mark.parametrize("items, batch, accum, epochs, world, steps", [
    (720, 64, 4, 5, 1, 13), (300, 100, 3, 4, 1, 4), (720, 64, 1, 2, 1, 22), (10, 64, 4, 1, 1, 1),
    (720, 64, 1, 2, 2, 10)])                                         # 2 ranks: 360 items each, 5 batches an epoch
def test_epochs_count_every_batch_of_every_epoch_whatever_the_accumulation(items, batch, accum, epochs, world, steps):
    args = argparse.Namespace(max_steps=None, epochs=epochs, batch_size=batch, grad_accum=accum)
    assert loop.total_steps(args, items, world=world) == steps      # 11 batches an epoch x 5 at 4 a step: 13, not 10


def test_a_run_resumes_on_the_number_of_processes_it_trained_on(trained_run, tmp_path):
    from runtime.checkpoint import atomic_save
    run, data = trained_run
    copy = tmp_path / "run"
    shutil.copytree(run, copy)
    saved = ckpt(copy / "unet.pt")
    atomic_save({**saved, "rng": saved["rng"] * 2}, copy / "unet.pt")   # as a 2-process torchrun saves it
    before, config = (copy / "unet.pt").read_bytes(), (copy / "config.json").read_text()
    message = error_of(unet, copy, "--max-steps", "6", "--resume")
    assert "trained on 2 process(es) and is resumed on 1" in message and "--nproc_per_node 2" in message
    assert (copy / "unet.pt").read_bytes() == before
    assert (copy / "config.json").read_text() == config     # refused before it recorded a length that never trained
    saved = ckpt(copy / "vqvae.pt")
    atomic_save({**saved, "rng": saved["rng"] * 2}, copy / "vqvae.pt")
    (copy / "unet.pt").rename(copy / "unet.aside")            # stage 1 may train further without a stage 2
    message = error_of(vqvae, copy, data, "--max-steps", "6", "--resume")
    assert "trained on 2 process(es) and is resumed on 1" in message and (copy / "config.json").read_text() == config


def test_existing_checkpoint_needs_resume_and_a_matching_config(trained_run):
    run, data = trained_run
    before = (run / "vqvae.pt").read_bytes()
    assert "--resume" in error_of(vqvae, run, data, "--max-steps", "8")
    message = error_of(vqvae, run, data, "--max-steps", "8", "--resume", "--codebook-size", "64")
    assert "--codebook-size 64 differs from this run's 32" in message
    assert (run / "vqvae.pt").read_bytes() == before


@pytest.mark.parametrize("flag, given, saved, other, shown", [
    ("--min-snr-gamma", "5", 5.0, "3", "3.0"),
    ("--timestep-sampling", "lognormal", "lognormal", "uniform", "uniform")])
def test_a_diffusion_setting_is_saved_in_the_checkpoint_kept_on_resume_and_used_when_sampling(
        trained_run, tmp_path, flag, given, saved, other, shown):
    run, _ = trained_run
    key = flag[2:].replace("-", "_")
    copy = tmp_path / "run"
    shutil.copytree(run, copy)
    (copy / "unet.pt").unlink()
    unet(copy, "--max-steps", "2", flag, given)
    assert ckpt(copy / "unet.pt")["diffusion"][key] == saved
    assert getattr(load_run(copy, "cpu").diffusion, key) == saved
    unet(copy, "--max-steps", "3", "--resume")              # resumed without it: the run's own (since issue 29)
    assert ckpt(copy / "unet.pt")["diffusion"][key] == saved and ckpt(copy / "unet.pt")["step"] == 3
    assert f"{flag} {shown} differs from this run's {saved}" in error_of(unet, copy, "--max-steps", "4", "--resume",
                                                                        flag, other)


def test_a_checkpoint_from_before_timestep_sampling_resumes_as_uniform(trained_run, tmp_path):
    run, _ = trained_run
    old = tmp_path / "old"
    shutil.copytree(run, old)
    saved = ckpt(old / "unet.pt")
    del saved["diffusion"]["timestep_sampling"]
    torch.save(saved, old / "unet.pt")
    unet(old, "--max-steps", str(saved["step"] + 1), "--resume")
    assert ckpt(old / "unet.pt")["diffusion"]["timestep_sampling"] == "uniform"


def test_latent_cache_is_reused_not_recomputed(trained_run, tmp_path, monkeypatch):
    run, _ = trained_run
    copy = tmp_path / "run"
    shutil.copytree(run, copy)
    (copy / "unet.pt").unlink()
    monkeypatch.setattr(train, "encode_dataset", lambda *a, **k: pytest.fail("latents were recomputed"))
    monkeypatch.setattr(train, "training_data", lambda *a, **k: pytest.fail("stage 2 decoded images"))
    unet(copy, "--max-steps", "2")
    assert ckpt(copy / "unet.pt")["step"] == 2


def test_held_out_subjects_stay_out_of_both_stages(adni_folder, tmp_path):
    run = tmp_path / "run"
    vqvae(run, adni_folder, "--max-steps", "1", "--holdout", "0.25", "--holdout-seed", "3")
    unet(run, "--max-steps", "1")
    assert ckpt(run / "latents.pt")["z"].shape[0] == 24 - 2 * 3     # 2 of 8 subjects, 3 slices each


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


def test_nan_loss_stops_without_overwriting_the_checkpoint(trained_run, tmp_path, monkeypatch):
    run, _ = trained_run
    from diffusion.gaussian import GaussianDiffusion
    copy = tmp_path / "run"
    shutil.copytree(run, copy)
    before = (copy / "unet.pt").read_bytes()
    monkeypatch.setattr(GaussianDiffusion, "loss", lambda self, model, x0, **kw: model(x0, torch.zeros(len(x0), dtype=torch.long, device=x0.device)).sum() * float("nan"))
    msg = error_of(unet, copy, "--max-steps", "8", "--resume")
    assert "nan" in msg.lower() and "last good checkpoint" in msg
    assert (copy / "unet.pt").read_bytes() == before


def nan_at_call(monkeypatch, which: int):
    """Make the diffusion loss NaN (gradients included) at its `which`-th call."""
    from diffusion.gaussian import GaussianDiffusion
    original, calls = GaussianDiffusion.loss, []

    def loss(self, *args, **kwargs):
        calls.append(1)
        value = original(self, *args, **kwargs)
        return value * float("nan") if len(calls) == which else value

    monkeypatch.setattr(GaussianDiffusion, "loss", loss)


def fresh_unet_run(trained_run, tmp_path) -> Path:
    run, _ = trained_run
    copy = tmp_path / "run"
    shutil.copytree(run, copy)
    (copy / "unet.pt").unlink()
    return copy


def test_a_nan_loss_stops_without_writing_poisoned_weights(trained_run, tmp_path, monkeypatch):
    run = fresh_unet_run(trained_run, tmp_path)
    nan_at_call(monkeypatch, 3)
    message = error_of(unet, run, "--max-steps", "4")
    assert "loss became nan before step 4" in message and "--skip-nonfinite" in message
    saved = ckpt(run / "unet.pt")
    assert saved["step"] == 2 and all(t.isfinite().all() for t in saved["model"].values())


def test_skip_nonfinite_skips_the_step_and_finishes_with_finite_weights(trained_run, tmp_path, monkeypatch, capsys):
    run = fresh_unet_run(trained_run, tmp_path)
    nan_at_call(monkeypatch, 3)
    unet(run, "--max-steps", "4", "--skip-nonfinite")
    saved = ckpt(run / "unet.pt")
    assert saved["step"] == 4 and saved["ema_updates"] == 3   # the skipped step did not reach the EMA either
    assert all(t.isfinite().all() for part in ("model", "ema") for t in saved[part].values())
    assert "1 non-finite steps skipped" in capsys.readouterr().out


def test_an_interval_of_skipped_steps_logs_no_loss_rather_than_zero(trained_run, tmp_path, monkeypatch):
    run = fresh_unet_run(trained_run, tmp_path)
    (run / "log_unet.csv").unlink()
    nan_at_call(monkeypatch, 3)
    from diffusion.gaussian import GaussianDiffusion
    once_nan = GaussianDiffusion.loss
    calls = []

    def twice_nan(self, *args, **kwargs):                            # steps 3 and 4: the whole second interval
        calls.append(1)
        value = once_nan(self, *args, **kwargs)
        return value * float("nan") if len(calls) == 4 else value

    monkeypatch.setattr(GaussianDiffusion, "loss", twice_nan)
    unet(run, "--max-steps", "6", "--skip-nonfinite")
    rows = {int(r["step"]): r for r in csv.DictReader(open(run / "log_unet.csv"))}
    assert rows[4]["loss"] == "nan" and float(rows[2]["loss"]) > 0 and float(rows[6]["loss"]) > 0


def test_skip_nonfinite_stops_a_diverged_run(trained_run, tmp_path, monkeypatch):
    run = fresh_unet_run(trained_run, tmp_path)
    from diffusion.gaussian import GaussianDiffusion
    original = GaussianDiffusion.loss
    monkeypatch.setattr(GaussianDiffusion, "loss", lambda self, *a, **k: original(self, *a, **k) * float("inf"))
    message = error_of(unet, run, "--max-steps", "40", "--skip-nonfinite", "--save-every", "100")
    assert "20 steps in a row up to step 20 had" in message              # the 20th skipped step stops it, not the 21st
    assert not (run / "unet.pt").exists()


def test_skip_nonfinite_saves_no_run_whose_last_steps_were_all_skipped(trained_run, tmp_path, monkeypatch):
    """A rate that blows the weights up without making them NaN: every step after gives a NaN/inf gradient and is
    skipped. Fewer than 20 in a row before the run's end used to save the blown-up weights as the finished run."""
    run = fresh_unet_run(trained_run, tmp_path)
    original, calls = GaussianDiffusion.loss, []

    def inf_from_step_3(self, *args, **kwargs):
        calls.append(1)
        return original(self, *args, **kwargs) * (float("inf") if len(calls) >= 3 else 1.0)

    monkeypatch.setattr(GaussianDiffusion, "loss", inf_from_step_3)
    message = error_of(unet, run, "--max-steps", "8", "--skip-nonfinite", "--save-every", "2", "--log-every", "2")
    assert "steps up to step 8 had a NaN/inf gradient" in message and "stopped without saving" in message
    assert ckpt(run / "unet.pt")["step"] == 6                           # saved at 2, 4 and 6 (four skipped by then)


def test_skip_nonfinite_leaves_out_a_checkpoint_inside_a_run_of_skipped_steps_and_goes_on(trained_run, tmp_path,
                                                                                          monkeypatch, capsys):
    run = fresh_unet_run(trained_run, tmp_path)
    original, calls = GaussianDiffusion.loss, []

    def inf_at_steps_2_to_6(self, *args, **kwargs):
        calls.append(1)
        return original(self, *args, **kwargs) * (float("inf") if 2 <= len(calls) <= 6 else 1.0)

    monkeypatch.setattr(GaussianDiffusion, "loss", inf_at_steps_2_to_6)
    unet(run, "--max-steps", "8", "--skip-nonfinite", "--save-every", "2", "--log-every", "2")
    assert "the 5 steps up to step 6 had a NaN/inf gradient: no checkpoint at step 6" in capsys.readouterr().out
    saved = ckpt(run / "unet.pt")
    assert saved["step"] == 8 and all(t.isfinite().all() for t in saved["model"].values())


@pytest.mark.parametrize("skip", [False, True], ids=["loss-check", "skip-nonfinite"])
def test_a_discriminator_gone_nan_is_named_with_its_own_rate_not_lr_alone(skip, adni_folder, tmp_path, monkeypatch):
    """A discriminator blown up by its --adversarial-lr makes the VQ-VAE's loss NaN at its next step: the loss check
    (or --skip-nonfinite's 20 skipped steps in a row) said to lower --lr alone, and to --skip-nonfinite, which cannot
    mend it (the discriminator learns nothing on a skipped step)."""
    step_disc = Adversary.after_step

    def poisoned(self, step, taken):
        step_disc(self, step, taken)
        if step == 1:                                                   # after its step 1: the loss at step 2 is NaN
            with torch.no_grad():
                next(self.disc.parameters()).fill_(float("nan"))

    monkeypatch.setattr(Adversary, "after_step", poisoned)
    message = error_of(vqvae, tmp_path / "run", adni_folder, "--max-steps", "24", "--adversarial-weight", "0.1",
                       "--adversarial-start", "1", "--save-every", "100", *(["--skip-nonfinite"] if skip else []))
    assert ("20 steps in a row up to step 21" if skip else "the loss became nan before step 2") in message
    assert message.endswith("try a lower --adversarial-lr or --lr (the discriminator's weights are NaN/inf too)")


def test_a_discriminator_that_became_nan_is_never_saved(adni_folder, tmp_path, monkeypatch):
    """The loss and the model's weights are checked at every log step; the discriminator, learning beside it, is
    checked with every other learned part before each checkpoint."""
    step_disc = Adversary.after_step

    def poisoned(self, step, taken):
        step_disc(self, step, taken)
        if step == 4:                                                   # after its step, before the save at 4
            with torch.no_grad():
                next(self.disc.parameters()).fill_(float("nan"))

    monkeypatch.setattr(Adversary, "after_step", poisoned)
    run = tmp_path / "run"
    message = error_of(vqvae, run, adni_folder, "--max-steps", "6", "--adversarial-weight", "0.1",
                       "--adversarial-start", "1", "--save-every", "2")
    assert "discriminator/" in message and "became NaN/inf by step 4" in message
    saved = ckpt(run / "vqvae.pt")
    assert saved["step"] == 2 and all(t.isfinite().all() for t in saved["discriminator"].values())


def test_skip_bad_images_trains_both_stages_on_the_readable_ones(tmp_path, capsys):
    data = tmp_path / "adni"
    rng = np.random.default_rng(0)
    for label in ("AD", "NC"):
        write_blob_images(data / "train" / label, [f"{label}{i}" for i in range(2)], 3, rng)
    (data / "train" / "NC" / "corrupt_9.jpeg").write_bytes(b"\xff\xd8\xff\xe0 cut here")
    message = error_of(vqvae, tmp_path / "a", data, "--max-steps", "2")
    assert "cannot read image" in message and "corrupt_9.jpeg" in message
    vqvae(tmp_path / "b", data, "--max-steps", "2", "--skip-bad-images")
    assert "left out 1 unreadable image(s) of 13: " in capsys.readouterr().out
    unet(tmp_path / "b", "--max-steps", "2", "--conditional")               # inherits the flag from stage 1
    latents = ckpt(tmp_path / "b" / "latents.pt")
    assert len(latents["z"]) == 12 and latents["y"].tolist() == [0] * 6 + [1] * 6


def test_a_resumed_stage_2_whose_data_moved_keeps_the_latents_it_trained_on(trained_run, tmp_path, capsys):
    """--data at the same images in another place (copied: other modification times, the same contents, which stage
    1's hash confirms): the latent cache is reused, its paths put in the new place, not encoded again with this
    command's device and precision (found by review: moving the data re-encoded the latents of a resumed run)."""
    run, data = trained_run
    copy, images = tmp_path / "run", tmp_path / "moved"
    shutil.copytree(run, copy)
    shutil.copytree(data, images, copy_function=shutil.copy)        # new modification times
    before = (copy / "latents.pt").read_bytes()
    unet(copy, "--max-steps", "5", "--resume", "--data", str(images))
    assert "latents reused" in capsys.readouterr().out and (copy / "latents.pt").read_bytes() == before
    assert ckpt(copy / "unet.pt")["step"] == 5
    cache = ckpt(copy / "latents.pt")
    assert cache["root"] == str(data.resolve()) and cache["encoded"] == {"device": "cpu", "precision": "fp32"}
    assert cache["relative"] and not any(os.path.isabs(p) for p in cache["paths"])
    moved = train.cached_paths(cache, DataConfig(str(images)))
    assert moved == [os.path.join(images, p) for p in cache["paths"]] and all(Path(p).is_file() for p in moved)
    # a cache written before its key left the folder's place out (2026-12-08) is still this run's
    from dataset import files_fingerprint
    from runtime.checkpoint import atomic_save
    from volumes.run_data import training_files
    where = DataConfig.of_run(copy)
    samples, _ = training_files(where)
    cache["key"] = {"vqvae": cache["key"]["vqvae"], **where.saved(), "count": len(samples),
                    "files": files_fingerprint(samples)}
    atomic_save(cache, copy / "latents.pt")
    unet(copy, "--max-steps", "6", "--resume")
    assert "latents reused" in capsys.readouterr().out


def test_a_latent_cache_written_with_a_relative_data_path_joins_its_conditions_from_anywhere(tmp_path, monkeypatch,
                                                                                            capsys):
    """Stage 2 given --data as a relative path, resumed from another working directory: the reused cache's files are
    found where the run's data is, and each latent keeps its subject's age (found by review: the cache kept the
    relative paths, every image became the subject '..', and the run went on unconditioned without a word)."""
    rng, lines = np.random.default_rng(0), ["participant_id,age"]
    for label in ("AD", "NC"):
        for i in range(3):                                           # whose: the folder below the class folder
            write_blob_images(tmp_path / "d" / label / f"{label}p{i}", ["slice"], 3, rng, size=(40, 40))
            lines.append(f"{label}p{i},{60 + i}")
    (tmp_path / "d" / "participants.csv").write_text("\n".join(lines) + "\n")
    monkeypatch.chdir(tmp_path)
    vqvae("r", "d", "--max-steps", "2")
    unet("r", "--data", "d", "--condition", "age", "--labels", "d/participants.csv", "--max-steps", "2")
    assert "6 of 6 subjects in the table" in capsys.readouterr().out
    (tmp_path / "elsewhere").mkdir()
    monkeypatch.chdir(tmp_path / "elsewhere")
    unet(str(tmp_path / "r"), "--resume", "--max-steps", "3")
    printed = capsys.readouterr().out
    assert "latents reused" in printed and "6 of 6 subjects in the table" in printed


def test_latent_cache_is_rebuilt_when_an_image_is_replaced_under_the_same_name(trained_run, tmp_path, capsys):
    run, data = trained_run
    copy = tmp_path / "run"
    shutil.copytree(run, copy)
    (copy / "unet.pt").unlink()
    images = tmp_path / "adni"
    shutil.copytree(data, images)
    unet(copy, "--max-steps", "1", "--data", str(images))   # another folder: encoded anew
    (copy / "unet.pt").unlink()
    unet(copy, "--max-steps", "1", "--data", str(images))
    assert "latents reused" in capsys.readouterr().out
    before = ckpt(copy / "latents.pt")["z"]
    replaced = sorted((images / "train" / "AD").iterdir())[0]
    import io
    size, white = replaced.stat().st_size, io.BytesIO()
    Image.new("L", (256, 240), 255).save(white, format="JPEG")
    # the same name and size (stage 2 checks those against stage 1's files), other pixels: a decoder stops at the
    # JPEG's end marker, so the padding is never read
    replaced.write_bytes(white.getvalue().ljust(size, b"\0"))
    (copy / "unet.pt").unlink()
    assert "other contents" in error_of(unet, copy, "--max-steps", "1", "--data", str(images))  # stage 1's hash says so
    from runtime.checkpoint import atomic_save
    vq = ckpt(copy / "vqvae.pt")  # a run from before stage 1 hashed its data: its latent cache notices, by the time
    vq["data_files"] = {k: v for k, v in vq["data_files"].items() if k in ("files", "sha1")}
    atomic_save(vq, copy / "vqvae.pt")
    unet(copy, "--max-steps", "1", "--data", str(images))
    assert "latents written" in capsys.readouterr().out
    assert not torch.equal(ckpt(copy / "latents.pt")["z"][0], before[0]) and torch.equal(ckpt(copy / "latents.pt")["z"][1:], before[1:])


def test_lr_given_with_resume_is_honoured_and_without_it_the_runs_own_is_kept(adni_folder, tmp_path):
    run = tmp_path / "run"
    constant = ["--warmup", "1", "--cooldown", "0"]   # the saved rate is the base rate (a cooldown ends at 0)
    vqvae(run, adni_folder, "--max-steps", "2", "--lr", "3e-3", *constant)
    vqvae(run, adni_folder, "--max-steps", "4", "--resume", *constant)  # not the tiny preset's 1e-3
    assert [g["lr"] for g in ckpt(run / "vqvae.pt")["optimizer"]["param_groups"]] == [3e-3]
    vqvae(run, adni_folder, "--max-steps", "6", "--resume", "--lr", "1e-4", *constant)  # was silently ignored
    saved = ckpt(run / "vqvae.pt")
    assert [g["lr"] for g in saved["optimizer"]["param_groups"]] == [1e-4] and saved["args"]["lr"] == 1e-4


def test_a_resumed_run_keeps_its_own_warmup_and_cooldown_unless_given(adni_folder, tmp_path):
    run = tmp_path / "run"
    vqvae(run, adni_folder, "--max-steps", "2", "--warmup", "1", "--cooldown", "0.5")
    resumed = driver.parse(["train-vqvae", "--run", str(run), "--resume"])
    assert (resumed.warmup, resumed.cooldown) == (1, 0.5)                # not the tiny preset's 50 and 0.2
    assert driver.parse(["train-vqvae", "--run", str(run), "--resume", "--cooldown", "0.1"]).cooldown == 0.1
    saved_flags_as(run / "vqvae.pt", drop=("cooldown", "warmup"))          # a run from before the flags
    resumed = driver.parse(["train-vqvae", "--run", str(run), "--resume"])
    assert (resumed.warmup, resumed.cooldown) == (50, 0.0)    # it trained at a constant rate; warm-up: the preset's


def test_a_resumed_run_keeps_its_own_batch_and_its_length_unless_given(adni_folder, tmp_path):
    run = tmp_path / "run"
    vqvae(run, adni_folder, "--max-steps", "2")
    saved_flags_as(run / "vqvae.pt", batch_size=32, max_steps=600)   # a `tiny` run from before the preset changed
    resumed = driver.parse(["train-vqvae", "--run", str(run), "--resume"])
    assert (resumed.batch_size, resumed.max_steps, resumed.epochs) == (32, 600, None)   # not the preset's 8 and 2400
    resumed = driver.parse(["train-vqvae", "--run", str(run), "--resume", "--epochs", "3"])
    assert (resumed.batch_size, resumed.max_steps, resumed.epochs) == (32, None, 3)     # a length given: not the run's
    resumed = driver.parse(["train-vqvae", "--run", str(run), "--resume", "--max-steps", "900"])
    assert (resumed.max_steps, resumed.epochs) == (900, None)
    # the batch is the run's (it sets the data position and the update): another one is refused since issue 29
    assert "--batch-size 4 differs from this run's 32" in error_of(
        driver.main, ["train-vqvae", "--run", str(run), "--resume", "--batch-size", "4"])


def test_the_learning_rate_warms_up_then_cools_down_linearly_to_zero_over_the_last_fraction(adni_folder, tmp_path):
    run = tmp_path / "run"
    vqvae(run, adni_folder, "--max-steps", "10", "--lr", "1e-3", "--warmup", "2", "--cooldown", "0.4",
          "--log-every", "1")
    logged = [float(r["lr"]) for r in csv.DictReader(open(run / "log_vqvae.csv"))]
    # at step k the rate that step took, factor(k - 1): warm-up min(1, k / 2), then min(1, (11 - k) / (0.4 * 10))
    assert logged == pytest.approx([5e-4] + [1e-3] * 6 + [7.5e-4, 5e-4, 2.5e-4])
    factor = loop.LearningRateFactor(warmup=2, cooldown=0.4, length=10)
    assert [factor(k) for k in (0, 5, 9)] == pytest.approx([0.5, 1.0, 0.25])
    assert loop.LearningRateFactor(warmup=2, cooldown=0.0, length=10)(9) == 1.0   # --cooldown 0: constant


def test_a_deadline_brings_the_cooldown_sooner_never_later():
    """--max-minutes re-estimates where the fall ends at every log step: never past the run's length, or past the end
    a resumed run saved; a later estimate may move it back out to that bound."""
    factor = loop.LearningRateFactor(warmup=0, cooldown=0.5, length=100)
    factor.end_by(500)
    assert factor.end == 100 and factor(75) == pytest.approx(0.5)      # the length's fall: (100 - 75) / 50
    factor.end_by(40)
    assert factor.end == 40 and factor(30) == pytest.approx(0.5) and factor.finished(40)
    factor.end_by(80)
    assert factor.end == 80
    resumed = loop.LearningRateFactor(warmup=0, cooldown=0.5, length=100, saved={"end": 60, "length": 100})
    resumed.end_by(90)
    assert resumed.end == 60                                             # its own deadline stands


def test_a_warmup_as_long_as_the_run_is_named(adni_folder, tmp_path, capsys):
    vqvae(tmp_path / "run", adni_folder, "--max-steps", "4", "--warmup", "4")
    assert "warning: --warmup 4 is as long as the run (4 steps) or longer" in capsys.readouterr().out
    vqvae(tmp_path / "other", adni_folder, "--max-steps", "4", "--warmup", "3")
    assert "--warmup" not in capsys.readouterr().out


def test_with_max_minutes_the_cooldown_ends_where_the_time_runs_out(adni_folder, tmp_path):
    run = tmp_path / "run"
    vqvae(run, adni_folder, "--max-steps", "1000000", "--max-minutes", "0.1", "--lr", "1e-3", "--warmup", "1",
          "--cooldown", "0.5", "--log-every", "1", "--sample-every", "1000000", "--save-every", "1000000")
    logged = [float(r["lr"]) for r in csv.DictReader(open(run / "log_vqvae.csv"))]
    assert len(logged) > 10 and max(logged) == pytest.approx(1e-3)    # the full rate first (a 1-step warm-up)
    assert min(logged) < 5e-4   # then falling before the deadline stops it (a 1e6-step schedule would not have yet)


def test_the_ema_weights_are_in_eval_mode(trained_run, tmp_path, monkeypatch):
    """The sampling weights run in eval mode (grids during training, and what is saved for predict.py)."""
    run = fresh_unet_run(trained_run, tmp_path)
    modes = []
    original = UNet.forward
    monkeypatch.setattr(UNet, "forward", lambda self, *a, **k: (modes.append(self.training), original(self, *a, **k))[1])
    unet(run, "--max-steps", "2", "--sample-every", "2")
    assert True in modes and False in modes    # the model trains, the EMA copy draws the grid
    assert modes[-1] is False


def test_tensorboard_gets_the_logged_values_and_the_grids(adni_folder, tmp_path):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    run = tmp_path / "run"
    vqvae(run, adni_folder, "--max-steps", "2", "--tensorboard")
    events = EventAccumulator(str(run / "tensorboard" / "vqvae")).Reload()
    scalars, images = set(events.Tags()["scalars"]), set(events.Tags()["images"])
    assert {"vqvae/loss", "vqvae/psnr", "vqvae/lr", "vqvae/img_per_s", "vqvae/recon"} <= scalars
    assert images == {"vqvae/grid_recon"}           # a tag of its own: TensorBoard shows a tag as one kind of data
    assert [e.step for e in events.Scalars("vqvae/loss")] == [2] and len(events.Images("vqvae/grid_recon")) == 1
    # an attempt cut off after its checkpoint at step 2 had logged steps 3 and 4; resumed, they are logged once
    vqvae(run, adni_folder, "--max-steps", "4", "--log-every", "1", "--save-every", "2", "--tensorboard", "--resume")
    shutil.copy(run / "vqvae.prev.pt", run / "vqvae.pt")                      # back to step 2, events to step 4
    vqvae(run, adni_folder, "--max-steps", "4", "--log-every", "1", "--save-every", "2", "--tensorboard", "--resume")
    events = EventAccumulator(str(run / "tensorboard" / "vqvae")).Reload()
    assert [e.step for e in events.Scalars("vqvae/loss")] == [2, 3, 4]
    for checkpoint in ("vqvae.pt", "vqvae.prev.pt"):
        (run / checkpoint).unlink()
    vqvae(run, adni_folder, "--max-steps", "1", "--tensorboard")      # a new stage 1 in the folder: the old one aside
    events = EventAccumulator(str(run / "tensorboard" / "vqvae")).Reload()
    assert [e.step for e in events.Scalars("vqvae/loss")] == [1] and (run / "tensorboard" / "vqvae.replaced").is_dir()


def test_tensorboard_missing_is_a_one_line_error(adni_folder, tmp_path, monkeypatch):
    import sys
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)   # as if the package were not installed
    assert "pip install tensorboard" in error_of(vqvae, tmp_path / "run", adni_folder, "--max-steps", "2", "--tensorboard")


def test_the_full_preset_on_a_cpu_stops_after_one_step_with_the_estimate(adni_folder, tmp_path):
    run = tmp_path / "run"
    small_full = ["--preset", "full", "--image-size", "64", "--vq-channels", "8", "--vq-mult", "1,2", "--codebook-size", "32",
                  "--batch-size", "4", "--max-steps", "100000000", "--device", "cpu"]
    train_vqvae = ["train-vqvae", "--run", str(run), "--data", str(adni_folder), *small_full]
    message = error_of(__import__("driver").main, train_vqvae)
    assert "full preset on this CPU would take about" in message and "--preset tiny" in message
    assert not (run / "vqvae.pt").exists()
    __import__("driver").main([*train_vqvae[:-4], "--max-steps", "2", "--slow-cpu-ok", "--device", "cpu"])
    assert ckpt(run / "vqvae.pt")["step"] == 2


def test_the_adversarial_loss_before_its_start_step_leaves_the_update_that_of_mse_training(adni_folder, tmp_path):
    flags = ["--max-steps", "3", "--deterministic"]
    vqvae(tmp_path / "mse", adni_folder, *flags)
    vqvae(tmp_path / "later", adni_folder, *flags, "--adversarial-weight", "0.5", "--adversarial-start", "100")
    vqvae(tmp_path / "now", adni_folder, *flags, "--adversarial-weight", "0.5", "--adversarial-start", "1",
          "--adversarial-lr", "3e-4")
    mse, later, now = (ckpt(tmp_path / name / "vqvae.pt") for name in ("mse", "later", "now"))
    assert all(torch.equal(mse["model"][k], later["model"][k]) for k in mse["model"])
    assert not torch.equal(mse["model"]["decoder.net.0.weight"], now["model"]["decoder.net.0.weight"])
    assert {"discriminator", "disc_optimizer", "disc_config"} <= set(now) and "discriminator" not in mse
    assert now["disc_optimizer"]["state"] and not later["disc_optimizer"]["state"]   # it learned only from its start
    assert now["disc_optimizer"]["param_groups"][0]["lr"] == 3e-4
    stage_lr = driver.PRESETS["vqvae"]["tiny"]["lr"]     # without --adversarial-lr the discriminator takes the stage's
    assert later["disc_optimizer"]["param_groups"][0]["lr"] == stage_lr
    rows = list(csv.DictReader(open(tmp_path / "now" / "log_vqvae.csv")))
    assert float(rows[-1]["adversarial"]) != 0 and all(float(r["adversarial"]) == 0 for r in
                                                       csv.DictReader(open(tmp_path / "later" / "log_vqvae.csv")))


def test_stage_1_measures_its_error_on_the_clamped_output_unless_told_not_to(adni_folder, tmp_path, monkeypatch):
    calls = []
    monkeypatch.setattr(stage1_losses, "as_shown", lambda recon: calls.append(recon.shape) or recon.clamp(-1, 1))
    vqvae(tmp_path / "raw", adni_folder, "--max-steps", "2", "--no-clamped-loss")
    assert calls == []
    vqvae(tmp_path / "clamped", adni_folder, "--max-steps", "2")   # the preset's default, `full`'s too
    assert len(calls) == 2 and driver.PRESETS["vqvae"]["full"]["clamped_loss"]   # one call per step, whole batch


def test_a_resumed_stage_1_keeps_its_own_reconstruction_error(adni_folder, tmp_path, monkeypatch):
    calls = []
    monkeypatch.setattr(stage1_losses, "as_shown", lambda recon: calls.append(recon.shape) or recon.clamp(-1, 1))
    run = tmp_path / "run"
    vqvae(run, adni_folder, "--max-steps", "2", "--no-clamped-loss")
    vqvae(run, adni_folder, "--max-steps", "3", "--resume")       # not the preset's clamped loss
    assert calls == []
    # a loss is the run's: another one is refused since issue 29 (it used to switch the loss mid-run)
    message = error_of(vqvae, run, adni_folder, "--max-steps", "4", "--resume", "--clamped-loss")
    assert "--clamped-loss True differs from this run's False" in message and calls == []
    assert json.loads((run / "config.json").read_text())["train-vqvae"]["clamped_loss"] is False
    saved_flags_as(run / "vqvae.pt", drop=("clamped_loss",))       # a run from before the flag trained unclamped
    assert driver.parse(["train-vqvae", "--run", str(run), "--resume"]).clamped_loss is False


def test_a_kl_regularised_run_trains_both_stages_resumes_as_kl_samples_and_is_evaluated(adni_folder, tmp_path, capsys):
    run = tmp_path / "run"
    vqvae(run, adni_folder, "--max-steps", "2", "--regularisation", "kl", "--kl-weight", "1e-4")
    saved = ckpt(run / "vqvae.pt")
    assert saved["config"]["regularisation"] == "kl" and saved["config"]["kl_weight"] == 1e-4
    assert not any("codebook" in name for name in saved["model"])
    logged = next(csv.DictReader(open(run / "log_vqvae.csv")))
    assert {"kl", "kl_per_element", "sigma"} <= set(logged) and "perplexity" not in logged
    assert 0 < float(logged["kl"]) < float(logged["loss"]) and float(logged["sigma"]) > 0
    vqvae(run, adni_folder, "--max-steps", "3", "--resume")              # kl comes back without its flag
    assert ckpt(run / "vqvae.pt")["step"] == 3 and ckpt(run / "vqvae.pt")["config"]["kl_weight"] == 1e-4
    message = error_of(vqvae, run, adni_folder, "--max-steps", "4", "--resume", "--regularisation", "vq")
    assert "--regularisation vq differs from this run's kl" in message
    unet(run, "--max-steps", "2")
    predict.main(["--run", str(run), "--out", str(tmp_path / "samples"), "--num", "2", "--sampler", "ddim",
                  "--steps", "3"])
    assert (tmp_path / "samples" / "samples.png").exists()
    driver.main(["evaluate", "--run", str(run), "--out", str(tmp_path / "eval"), "--holdout", "0.5", "--features",
                 "domain", "--classifier-steps", "0", "--steps", "5"])
    assert "KL-regularised latent (no codebook)" in capsys.readouterr().out
    metrics = json.loads((tmp_path / "eval" / "metrics.json").read_text())
    assert 0 < metrics["vqvae"]["psnr"] < 100 and "codebook_used" not in metrics["vqvae"]


# ----------------------------------------------------------------------------- a resumed run is the same run

def test_an_optimizer_state_saved_in_one_memory_layout_steps_the_same_in_another():
    """A GPU run (NHWC) resumed on a CPU (NCHW): Adam's moments must follow their weights' layout, or the fused
    kernel pairs each weight with another element's moments."""
    torch.manual_seed(0)
    x = torch.randn(2, 3, 8, 8)
    nhwc = torch.nn.Conv2d(3, 4, 3).to(memory_format=torch.channels_last)
    nchw = torch.nn.Conv2d(3, 4, 3)
    nchw.load_state_dict(nhwc.state_dict())
    first = adamw(nhwc.parameters(), 1e-2)
    for _ in range(2):
        nhwc(x.contiguous(memory_format=torch.channels_last)).square().mean().backward()
        first.step()
        first.zero_grad()
    nchw.load_state_dict(nhwc.state_dict())
    resumed = adamw(nchw.parameters(), 1e-2)
    load_optimizer(resumed, copy.deepcopy(first.state_dict()))      # as if saved and loaded
    assert nhwc.weight.stride() != nchw.weight.stride()                  # the two layouts differ
    for model, optimizer in ((nhwc, first), (nchw, resumed)):              # one more step each, the same gradient
        model(x).square().mean().backward()
        optimizer.step()
    torch.testing.assert_close(nchw.weight, nhwc.weight, rtol=1e-5, atol=1e-6)


@pytest.fixture
def two_threads():
    """The CPU threads of CI's machine, whatever OMP_NUM_THREADS says: a bound measured on rounding holds for them."""
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    yield
    torch.set_num_threads(threads)


def test_a_run_resumed_in_another_memory_layout_ends_with_the_weights_of_an_uninterrupted_run(adni_folder, tmp_path,
                                                                                             two_threads):
    # the bounds below were measured with a discriminator of 3 stride-2 layers, as `tiny` had before 16x16 patches,
    # on 2 threads: on 1 (OMP_NUM_THREADS=1) the rounding flipped more nearest-code ties (1.13 in the usage counts)
    flags = ["--deterministic", "--warmup", "1", "--cooldown", "0", "--adversarial-weight", "0.1",
             "--adversarial-start", "0", "--discriminator-layers", "3"]
    vqvae(tmp_path / "whole", adni_folder, "--max-steps", "6", "--no-channels-last", *flags)
    vqvae(tmp_path / "cut", adni_folder, "--max-steps", "3", "--channels-last", *flags)     # as on a GPU
    vqvae(tmp_path / "cut", adni_folder, "--max-steps", "6", "--resume", "--no-channels-last", *flags)
    whole, cut = ckpt(tmp_path / "whole" / "vqvae.pt"), ckpt(tmp_path / "cut" / "vqvae.pt")
    # NHWC and NCHW convolutions round differently (the weights by 2e-3 here after 6 steps; the moments in the wrong
    # layout moved them by only 4e-3 in the 3 steps after the resume, so the usage counts below are what tells)
    for part in ("model", "discriminator"):
        assert max((whole[part][k].float() - cut[part][k].float()).abs().max().item() for k in whole[part]
                   if k != "quantizer.usage") < 0.05
    # the codes' usage counts are no weights: that rounding flips nearest-code ties, each moving two counts by up to
    # 0.05 (0.14 at most here, 18 of 32 codes), while the moments in the wrong layout moved them by 3.1 (29 of 32);
    # every step counts the same latents, so their sum is the uninterrupted run's
    usage = [run["model"]["quantizer.usage"] for run in (whole, cut)]
    assert (usage[0] - usage[1]).abs().max().item() < 0.5
    assert usage[0].sum().item() == pytest.approx(usage[1].sum().item(), rel=1e-5)


def test_a_run_resumed_after_its_deadline_goes_on_where_its_learning_rate_was(adni_folder, tmp_path, capsys):
    """--max-minutes with a cooldown: the rate falls to zero where the minutes run out. Resumed, the run keeps that
    end (it was re-estimated only at log steps, from the length, so the rate jumped back to full)."""
    run = tmp_path / "run"
    flags = ["--max-steps", "1000000", "--lr", "1e-3", "--warmup", "1", "--cooldown", "0.5", "--log-every", "1",
             "--sample-every", "1000000", "--save-every", "1000000"]
    vqvae(run, adni_folder, *flags, "--max-minutes", "0.05")
    rates = [float(r["lr"]) for r in csv.DictReader(open(run / "log_vqvae.csv"))]
    stopped = ckpt(run / "vqvae.pt")["step"]
    assert rates[-1] < 2e-4
    vqvae(run, adni_folder, *flags, "--max-minutes", "0.05", "--resume")   # another slice of minutes
    after = [float(r["lr"]) for r in csv.DictReader(open(run / "log_vqvae.csv"))][len(rates):]
    assert all(rate <= rates[-1] for rate in after)
    ended = ckpt(run / "vqvae.pt")["step"]
    assert ended - stopped < 0.1 * stopped and ended == ckpt(run / "vqvae.pt")["lr_schedule"]["end"]
    vqvae(run, adni_folder, *flags, "--resume")                              # no deadline: nothing left to learn
    assert ckpt(run / "vqvae.pt")["step"] == ended and "the run is finished" in capsys.readouterr().out


def test_the_discriminator_starts_at_the_loops_step_when_steps_are_skipped(adni_folder, tmp_path, monkeypatch):
    calls = []
    def nan_first(recon):  # the first VQ-VAE step's loss is NaN: --skip-nonfinite skips it
        calls.append(1)
        return recon.clamp(-1, 1) * (float("nan") if len(calls) == 1 else 1.0)
    monkeypatch.setattr(stage1_losses, "as_shown", nan_first)
    run = tmp_path / "run"
    vqvae(run, adni_folder, "--max-steps", "4", "--skip-nonfinite", "--adversarial-weight", "0.1",
          "--adversarial-start", "2")
    saved = ckpt(run / "vqvae.pt")
    # steps 3 and 4 (loop steps 2 and 3, counted from 0) train it, though step 1 was skipped
    assert {int(s["step"]) for s in saved["disc_optimizer"]["state"].values()} == {2}
    assert all(t.isfinite().all() for part in ("model", "discriminator") for t in saved[part].values())


def test_under_fp16_the_discriminator_steps_through_its_own_grad_scaler(monkeypatch):
    """An fp16 step whose gradient overflows is skipped and the scale halved, as for the VQ-VAE; without a
    GradScaler the overflow reaches the discriminator's weights."""
    from losses.adversarial import AdversaryConfig, DiscriminatorConfig
    from runtime.process import Runtime
    import contextlib
    rt = Runtime(torch.device("cpu"), contextlib.nullcontext(), torch.amp.GradScaler("cpu", enabled=True), False)
    config = AdversaryConfig(weight=0.1, start=0, loss="hinge", weighting="adaptive", lr=1e-3,
                             discriminator=DiscriminatorConfig(in_channels=1, channels=16, num_layers=3),
                             log_every=50, max_minutes=None)
    adversary = Adversary(config, rt, None, max_steps=10)
    before = {k: v.clone() for k, v in adversary.disc.state_dict().items()}
    adversary.d_loss = lambda real, fake: (real.mean() - fake.mean()) * float("inf")
    x = torch.rand(2, 1, 32, 32) * 2 - 1
    adversary.batch = (x, x.flip(-1))
    adversary.after_step(1, taken=True)
    assert all(torch.equal(before[k], v) for k, v in adversary.disc.state_dict().items())
    assert adversary.state()["disc_scaler"]["scale"] == 2.0 ** 15           # halved from 2 ** 16
