"""Does a UNet see the per-image mean of its input? For each row of a finished `bench/quality.py --out` folder:

- the spread over images of each latent's spatial mean, channel by channel, in the training latents and in 400
  samples (`driver.py sample`'s sampler, seed 1, as quality.py samples);
- the spread of the x0 error's spatial mean in channel C, training latents noised to step t and denoised once,
  beside what a predictor blind to the input's mean would get for v, sqrt((1 - a)^2 s^2 + a (1 - a) / HW), with
  a = alpha_bar(t) and s the channel's true spread;
- the samples' mean brightness: its 1-D Wasserstein distance to the reference half, over --seeds sampling seeds.

    python bench/latent_means.py --out runs/q36 --rows ours,ours-gw4

bench/README.md, "The `tiny` UNet did not see the per-image mean of its input". Prints the numbers.
"""
from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import driver  # noqa: E402
import predict  # noqa: E402
from decode_unquantised import samples_and_latents  # noqa: E402
from quality import held_out_split, layout_version  # noqa: E402
from runtime.models import load_run  # noqa: E402

STEPS = (50, 200, 400, 600, 800)


def spread(latents: torch.Tensor) -> list[float]:
    """Per channel, the standard deviation over images of the latents' spatial means."""
    return [round(v, 4) for v in latents.mean((2, 3)).std(0).tolist()]


def wasserstein_1d(a: torch.Tensor, b: torch.Tensor) -> float:
    """The 1-D Wasserstein distance of two samples: the area between their empirical CDFs (as scipy's)."""
    a, b = a.double().sort().values, b.double().sort().values
    points = torch.cat([a, b]).sort().values
    cdf_a = torch.searchsorted(a, points[:-1], right=True) / len(a)
    cdf_b = torch.searchsorted(b, points[:-1], right=True) / len(b)
    return ((cdf_a - cdf_b).abs() * points.diff()).sum().item()


@torch.no_grad()
def x0_mean_errors(model, z0: torch.Tensor, channel: int) -> tuple[list[float], list[float]]:
    """The spread of the x0 error's spatial mean in `channel` at each of STEPS, and a blind predictor's."""
    d, true = model.diffusion, z0.mean((2, 3)).std(0)[channel].item()
    measured, blind = [], []
    torch.manual_seed(0)
    for step in STEPS:
        t = torch.full((len(z0),), step, dtype=torch.long)
        x_t = d.q_sample(z0, t, torch.randn_like(z0))
        x0 = torch.cat([d.predict_x0_eps(model.unet, x, s)[0] for x, s in zip(x_t.split(128), t.split(128))])
        measured.append(round((x0 - z0).mean((2, 3)).std(0)[channel].item(), 4))
        a = d.alphas_cumprod[step].item()
        blind.append(round(math.sqrt((1 - a) ** 2 * true ** 2 + a * (1 - a) / z0[0, 0].numel()), 4))
    return measured, blind


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True, help="a finished bench/quality.py --out folder")
    parser.add_argument("--rows", default="ours", help="its rows (default: %(default)s)")
    parser.add_argument("--data", default="../shared/data/adni_ad_nc", help="quality.py's --data (default: %(default)s)")
    parser.add_argument("--holdout", type=float, default=0.1, help="quality.py's --holdout (default: %(default)s)")
    parser.add_argument("--channel", type=int, default=1, help="the latent channel of the x0 errors (default: %(default)s)")
    parser.add_argument("--seeds", type=int, default=3, help="sampling seeds of the brightness (default: %(default)s)")
    args = parser.parse_args()
    version = layout_version([Path(args.out) / row for row in args.rows.split(",")])
    dataset, (_, ref_idx, _), _ = held_out_split(args.data, args.holdout, version)
    reference = torch.stack([dataset[i][0] for i in ref_idx]).mean((1, 2, 3))
    for row in args.rows.split(","):
        run = Path(args.out) / row
        model = load_run(run, "cpu")
        z0 = torch.load(run / "latents.pt", weights_only=True)["z"].float() * model.latent_scale
        sampling = predict.sampling_from_args(driver.parse(["sample", "--run", str(run)]), model)
        distances = []
        for seed in range(1, args.seeds + 1):
            images, latents = samples_and_latents(model, sampling, 400, seed)
            if seed == 1:
                sampled = spread(latents)
            distances.append(round(wasserstein_1d(images.float().mean((1, 2, 3)), reference), 4))
        measured, blind = x0_mean_errors(model, z0[:512], args.channel)
        print(f"{row}: per-image mean spread, training latents {spread(z0)}, 400 samples {sampled}")
        print(f"{row}: x0 error of channel {args.channel}'s mean at t = {list(STEPS)}: {measured} (blind: {blind})")
        print(f"{row}: samples' mean brightness, W1 to the reference half, seeds 1-{args.seeds}: {distances}", flush=True)


if __name__ == "__main__":
    main()
