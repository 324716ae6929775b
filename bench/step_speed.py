"""Training-step throughput of both models for both presets on this machine (median of timed steps).

    python bench/step_speed.py [--device cpu] [--steps 5] [--precision fp32,bf16]

Times one optimizer step (forward, backward, AdamW) at the presets' batch sizes on random data,
so it measures the models, not the data loading. Precision auto as in training (bf16 autocast on CUDA, fp32 on the
CPU); `--precision fp32,bf16` times each, side by side, round by round (`--rounds`).
"""
import argparse
import statistics
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from diffusion.gaussian import GaussianDiffusion  # noqa: E402
from driver import PRESETS  # noqa: E402
from modules import VQVAE, UNet, UNetConfig, VQVAEConfig  # noqa: E402
from runtime.process import setup_runtime  # noqa: E402
from throughput import timed  # noqa: E402


def time_steps(step, steps, device):
    step()  # the first step warms up allocators and kernels
    return statistics.median(timed(step, device) for _ in range(steps))


def train_step(model, autocast, loss_fn):
    """One AdamW step on loss_fn() (forward under autocast, backward, update), as a closure to time."""
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)

    def step():
        with autocast:
            loss = loss_fn()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    return step


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--steps", type=int, default=5, help="timed steps per case (default: %(default)s)")
    parser.add_argument("--presets", default="tiny,full")
    parser.add_argument("--batch", type=int, default=None, help="batch size for every case (default: the presets')")
    parser.add_argument("--precision", default="auto",
                        help="comma-separated: auto, fp32, bf16 (default: %(default)s, as training)")
    parser.add_argument("--rounds", type=int, default=1,
                        help="times each precision in turn this many times; prints the median (default: %(default)s)")
    args = parser.parse_args()
    runtimes = {name: setup_runtime(args.device, name) for name in args.precision.split(",")}
    device = next(iter(runtimes.values())).device
    print(f"device {device} ({torch.cuda.get_device_name(device) if device.type == 'cuda' else f'{torch.get_num_threads()} threads'})")
    for preset in args.presets.split(","):
        p = PRESETS["vqvae"][preset]
        cfg = VQVAEConfig(image_size=p["image_size"], channels=p["vq_channels"], channel_mult=tuple(p["vq_mult"]),
                          num_res_blocks=p["vq_res_blocks"], codebook_size=p["codebook_size"])
        x = torch.rand(args.batch or p["batch_size"], 1, cfg.image_size, cfg.image_size, device=device) * 2 - 1
        u = PRESETS["unet"][preset]
        ucfg = UNetConfig(latent_size=cfg.latent_shape[1], channels=u["unet_channels"],
                          channel_mult=tuple(u["unet_mult"]), num_res_blocks=u["unet_res_blocks"])
        z = torch.randn(args.batch or u["batch_size"], *cfg.latent_shape, device=device)
        seconds = {(name, model): [] for name in runtimes for model in ("VQ-VAE", "UNet")}
        for _ in range(args.rounds):
            for name, rt in runtimes.items():
                vqvae = VQVAE(cfg).to(device)

                def vq_loss():
                    recon, codebook_loss, _ = vqvae(x)
                    return F.mse_loss(recon.float(), x) + codebook_loss
                seconds[name, "VQ-VAE"].append(time_steps(train_step(vqvae, rt.autocast, vq_loss), args.steps, device))
                unet, diffusion = UNet(ucfg).to(device), GaussianDiffusion().to(device)
                seconds[name, "UNet"].append(time_steps(train_step(unet, rt.autocast, lambda: diffusion.loss(unet, z)),
                                                        args.steps, device))
        for (name, model), times in seconds.items():
            sec, n = statistics.median(times), len(x) if model == "VQ-VAE" else len(z)
            shape = f"{cfg.image_size}x{cfg.image_size}" if model == "VQ-VAE" else str(tuple(cfg.latent_shape))
            unit = "img/s" if model == "VQ-VAE" else "latents/s"
            print(f"{preset:5s} {model:6s} {name:>4s} ({runtimes[name].precision}) batch {n:3d} at {shape}: "
                  f"{sec:7.3f} s/step  {n / sec:8.1f} {unit}")


if __name__ == "__main__":
    main()
