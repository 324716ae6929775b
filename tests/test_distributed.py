"""Many processes (DDP over gloo on the CPU, as torchrun starts them) and gradient accumulation.

The reference for both is one process taking one step on the whole batch: 2 ranks x batch b, and
1 rank x K micro-batches of b, must end with the parameters of 1 rank x batch 2b (or K*b).
"""
import os
import socket
import subprocess
import sys
from argparse import Namespace
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp

import train
from conftest import SMALL_UNET, SMALL_VQ, ckpt
from modules import VQVAE, GaussianDiffusion, UNet, UNetConfig, VQVAEConfig

ROOT = Path(__file__).resolve().parents[1]
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


def run_steps(kind: str, rt, micro_batches_of, steps: int = 2):
    """`steps` optimizer steps with train.optimizer_step; micro_batches_of(data) -> this rank's micro-batches."""
    model, model_ref, loss_fn, data = make_case(kind)
    wrapped = train.wrap_model(model, rt, compile_model=False)
    model_ref[0] = wrapped
    # SGD, not AdamW: Adam's update does not change when the gradient is scaled (a sum over ranks instead
    # of a mean would pass), and it blows float noise in gradients that are zero in exact arithmetic
    # (a conv bias before a per-channel GroupNorm, 1e-10) up to a visible step
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05)
    for _ in range(steps):
        train.optimizer_step(wrapped, optimizer, rt.scaler, micro_batches_of(data), loss_fn, grad_clip=1.0)
    return model.state_dict()


def cpu_runtime():
    return train.setup_runtime(Namespace(device="cpu", precision="auto", channels_last=None))


def _rank_worker(rank: int, world: int, port: int, kind: str, out: str):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(world))
    torch.set_num_threads(1)
    rt = cpu_runtime()
    assert rt.world == world and rt.rank == rank
    assert train.mean_over_ranks(torch.tensor([float(rank)]), rt).item() == 0.5  # the logged loss: mean over ranks
    assert train.any_rank(rank == 1, rt) and not train.any_rank(False, rt)       # one rank out of time: all stop
    state = run_steps(kind, rt, lambda data: [data[rank * BATCH:(rank + 1) * BATCH]])
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
    one_rank = run_steps(kind, cpu_runtime(), lambda data: [data])
    assert_same_parameters(two_ranks, one_rank, make_case(kind)[0].state_dict())


@pytest.mark.parametrize("kind", ["unet", "vqvae"])
def test_grad_accum_k_gives_the_update_of_a_k_times_larger_batch(kind):
    rt = cpu_runtime()
    accumulated = run_steps(kind, rt, lambda data: [data[:BATCH], data[BATCH:]])
    one_batch = run_steps(kind, rt, lambda data: [data])
    # the codebook-usage statistics are an EMA over forward passes (micro-batches), not a parameter
    assert_same_parameters(accumulated, one_batch, make_case(kind)[0].state_dict(), skip=["quantizer.usage"])
    half = run_steps(kind, rt, lambda data: [data[:BATCH]])  # and it is not the step of one micro-batch
    assert not torch.allclose(half["conv_in.weight" if kind == "unet" else "encoder.net.0.weight"],
                              one_batch["conv_in.weight" if kind == "unet" else "encoder.net.0.weight"], atol=1e-4)


def torchrun(*args, cwd=ROOT) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    for var in ("WORLD_SIZE", "RANK", "LOCAL_RANK"):
        env.pop(var, None)
    return subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                           "driver.py", *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=300)


def test_torchrun_two_processes_write_one_run(adni_folder, tmp_path):
    run = tmp_path / "run"
    done = torchrun("train-vqvae", "--run-dir", str(run), "--data", str(adni_folder), "--preset", "tiny", *SMALL_VQ,
                    "--batch-size", "4", "--max-steps", "4", "--device", "cpu")
    assert done.returncode == 0, done.stderr[-3000:]
    assert "8 images (2 process(es))" in done.stdout + done.stderr
    done = torchrun("train-unet", "--run-dir", str(run), *SMALL_UNET, "--batch-size", "4", "--max-steps", "4",
                    "--grad-accum", "2", "--device", "cpu")
    assert done.returncode == 0, done.stderr[-3000:]
    output = done.stdout + done.stderr
    assert output.count("latents written") == 1  # rank 0 encodes; rank 1 waits and reads the file

    assert sorted(p.name for p in run.glob("*.pt")) == ["latents.pt", "unet.prev.pt", "unet.pt", "vqvae.prev.pt", "vqvae.pt"]
    assert not list(run.glob(".*tmp*"))
    for name in ("vqvae.pt", "unet.pt"):
        saved = ckpt(run / name)
        assert saved["step"] == 4 and not any(k.startswith(("module.", "_orig_mod.")) for k in saved["model"])
        assert len(saved["rng"]) == 2 and not torch.equal(saved["rng"][0]["cpu"], saved["rng"][1]["cpu"])  # each rank's
    assert saved["args"]["grad_accum"] == 2
    for csv_name in ("log_vqvae.csv", "log_unet.csv"):  # one row per log step, not one per rank
        steps = [line.split(",")[0] for line in (run / csv_name).read_text().splitlines()[1:]]
        assert steps == ["2", "4"]
    UNet(UNetConfig(**saved["config"])).load_state_dict(saved["model"])  # the unwrapped model
