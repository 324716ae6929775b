"""Where do the samples lose the fine detail that the reconstructions keep? Four looks at a quality.py row (the
fourth with --boost):

1. the finest band's energy (mean |Laplacian| of the finest pyramid level) of real images, reconstructions and samples:
   lower than real is smoother, higher is noisier;
2. the radially averaged power spectrum of the sampled latents against the encoded ones (the held-out floor images),
   ring by ring of the latent's 2-D spectrum: below 1 the UNet draws less of that frequency than the encoder puts in;
3. SDEdit (Meng et al. 2022): the encoded latents noised to step t and denoised by DDPM from there, decoded and scored
   like the samples. Small t shows what the last steps lose, large t what the middle of the reverse process loses;
4. with --boost, the samples and the real images with their finest Laplacian band scaled by 1 + a: where the samples'
   finest-band distance falls with a and the real images' rises, that much of it is amplitude the samples lack (a
   diagnosis, not a fix).

    python bench/detail_loss.py --out runs/q34 --row ours [--seed 1] [--sdedit 10,30,100,300]
    python bench/detail_loss.py --out runs/q41 --row ours --ema-length 0.01 --boost 0.1,0.2,0.3 \
        --sample-flags "--autoguidance 2 --guide-at 0.25 --decode unquantised --guide-interval 0,400"

OUT is a finished `bench/quality.py --out` folder (its feature network and held-out split are reused). Prints tables;
writes OUT/detail_loss_ROW.json.
"""
from __future__ import annotations

import argparse
import json
import shlex
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import predict  # noqa: E402
from decode_unquantised import add_row_arguments, load_row, samples_and_latents  # noqa: E402
from evaluation.evaluate import score_rows  # noqa: E402
from evaluation.report import format_level_table  # noqa: E402
from losses.reconstruction import laplacian_pyramid  # noqa: E402
from runtime.posthoc_ema import reconstruct  # noqa: E402


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_row_arguments(parser)
    parser.add_argument("--sdedit", default="10,30,100,300", help="the steps t to noise to (default: %(default)s)")
    parser.add_argument("--sample-flags", default="", help="driver.py sample flags for the samples (default: none)")
    parser.add_argument("--ema-length", type=float, default=None,
                        help="sample the post-hoc EMA of this length sigma_rel from the row's --posthoc-ema snapshots "
                             "(default: the run's EMA)")
    parser.add_argument("--boost", default="", help="also score samples and real images with their finest band "
                                                    "scaled by 1 + a, for these a,... (default: none)")
    args = parser.parse_args()
    out, run = Path(args.out), Path(args.out) / args.row
    reference, floor, features, model, sampling = load_row(args, shlex.split(args.sample_flags))
    if args.ema_length is not None:
        weights, _ = reconstruct(run, args.ema_length, step=model.unet_step)  # at unet.pt's step, or a clear error
        model.unet.load_state_dict({**model.unet.state_dict(), **weights})
    samples, sampled = samples_and_latents(model, sampling, len(floor), args.seed)
    vq, scale, decode = model.vqvae, model.latent_scale, predict.decode

    with torch.no_grad():
        encoded = torch.cat([vq.encode(x) for x in floor.split(64)]) * scale
        rows = {"real (floor)": floor, "reconstructions": decode(vq, encoded, scale), "samples": samples}
        generator = torch.Generator().manual_seed(args.seed)
        for t0 in [int(t) for t in args.sdedit.split(",")]:
            rows[f"SDEdit from t={t0}"] = decode(vq, sdedit(model.diffusion, model.unet, encoded, t0, generator), scale)
        for a in [float(a) for a in filter(None, args.boost.split(","))]:
            rows[f"samples, finest band x{1 + a:g}"] = boost_finest_band(samples, a)
            rows[f"real (floor), finest band x{1 + a:g}"] = boost_finest_band(floor, a)
    energy = {name: laplacian_pyramid(images.float())[0].abs().mean().item() for name, images in rows.items()}
    spectrum = (radial_power(sampled) / radial_power(encoded)).tolist()
    scores = score_rows({k: v for k, v in rows.items() if k != "real (floor)"}, reference, features, "cpu")

    print("| images | finest band's energy (mean abs) |\n|---|---|")
    print("\n".join(f"| {name} | {e:.4f} |" for name, e in energy.items()))
    print("\nsampled / encoded latents' power, ring by ring (0: the mean):")
    print(" ".join(f"{r}: {p:.2f}" for r, p in enumerate(spectrum)))
    print(f"\nSWD x1e3 per Laplacian level:\n\n{format_level_table(scores)}")
    record = {"run": str(run), "seed": args.seed, "sample_flags": args.sample_flags, "ema_length": args.ema_length,
              "energy": energy, "latent_power_ratio": spectrum, "scores": scores}
    (out / f"detail_loss_{args.row}.json").write_text(json.dumps(record, indent=2))


def sdedit(diffusion, unet, z0: torch.Tensor, t0: int, generator: torch.Generator) -> torch.Tensor:
    """z0 noised to step t0 (the forward process) and taken back to data by DDPM's steps t0..0."""
    out = []
    for z in z0.split(100):
        t = torch.full((len(z),), t0, dtype=torch.long)
        x = diffusion.q_sample(z, t, torch.randn(z.shape, generator=generator))
        for _, x, _ in diffusion.sample_steps(unet, x, "ddpm", start=t0):
            pass
        out.append(x)
    return torch.cat(out)


def boost_finest_band(images: torch.Tensor, a: float) -> torch.Tensor:
    """Images with their finest Laplacian band (the metric's) scaled by 1 + a, clamped to [-1, 1] as shown."""
    return (images + a * laplacian_pyramid(images.float())[0]).clamp(-1, 1)


def radial_power(z: torch.Tensor) -> torch.Tensor:
    """The power of z (N, C, H, W) less its mean per channel, averaged over images and channels, per ring of integer
    radius about the spectrum's centre."""
    power = torch.fft.fftshift(torch.fft.fft2(z - z.mean((0, 2, 3), keepdim=True)), dim=(-2, -1)).abs().pow(2).mean((0, 1))
    h, w = power.shape
    yy, xx = torch.meshgrid(torch.arange(h) - h // 2, torch.arange(w) - w // 2, indexing="ij")
    ring = (yy ** 2 + xx ** 2).float().sqrt().round().long()
    return torch.stack([power[ring == r].mean() for r in range(int(ring.max()) + 1)])


if __name__ == "__main__":
    main()
