"""Counterfactuals on held-out slices, measured (issue 30): how far they move, whether the classifier follows, and where
the change lands.

    python bench/counterfactual.py --run runs/adni --set class=NC --strengths 0,0.2,0.35,0.5,0.65,0.8
    python bench/counterfactual.py --run runs/demo_conditioned --set group=NC --region 0.36 [--from-own group]

The run's held-out subjects (its own split, halves A and B together) give the slices of --from-class (AD) and of
--null-class (NC). Each slice is changed by `driver.py counterfactual`'s steps (DDIM inversion, unconditioned or with
--from-own under its own class, then DDIM under --set with guidance) at each strength, in batches. Per strength and per class of input:

    flip rate    how often the AD/NC domain classifier (evaluate's, trained on the run's training subjects, cached in
                 the run) calls the counterfactual the --set class; at strength 0 the reconstruction
    SSIM, PSNR   of the counterfactual against the input slice (how far it moved; the reconstruction at strength 0
                 is the VQ-VAE's own distance)
    in region    (--region R) the fraction of the mass of |counterfactual - reconstruction| inside the central disc
                 of radius R (a fraction of half the image): where the demo data's "AD" expansion sits (volumes/demo.py)
                 against the disc's share of the image; NC inputs are the null (a change that is not the disease's)

Writes OUT/counterfactual.json and OUT/counterfactual.md, and a grid of inputs and counterfactuals per strength.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
from torchmetrics.functional.image import peak_signal_noise_ratio, structural_similarity_index_measure
from torchvision.utils import save_image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import predict  # noqa: E402
from conditions.counterfactual import counterfactual_latent  # noqa: E402
from conditions.table import asked_values  # noqa: E402
from dataset import load_slices  # noqa: E402
from evaluation.classifier import class_accuracy, domain_classifier  # noqa: E402
from evaluation.evaluate import feature_key, run_split, stack  # noqa: E402
from runtime.models import load_run  # noqa: E402
from volumes.run_data import DataConfig  # noqa: E402


def disc(size: int, radius: float) -> torch.Tensor:
    """The central disc of `radius` (a fraction of half the image), (size, size) booleans."""
    r = torch.linspace(-1, 1, size)
    return (r[:, None] ** 2 + r[None, :] ** 2) <= radius ** 2


@torch.no_grad()
def changed(model, images: torch.Tensor, source: torch.Tensor, target: torch.Tensor, strength: float, steps: int,
            guidance: float, batch: int = 64) -> tuple[torch.Tensor, torch.Tensor]:
    """(reconstructions, counterfactuals) of images (N, C, S, S), in batches, inverted under `source`."""
    recons, outs = [], []
    for x in images.split(batch):
        z0 = model.vqvae.encode(x).float() * model.latent_scale
        recons.append(predict.decode(model.vqvae, z0, model.latent_scale))
        z = counterfactual_latent(model, z0, source, target, strength, steps, guidance, noise=False)
        outs.append(predict.decode(model.vqvae, z, model.latent_scale))
    return torch.cat(recons), torch.cat(outs)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run", required=True)
    parser.add_argument("--set", dest="set_values", action="append", default=None, help="the target (default: class=NC)")
    parser.add_argument("--from-class", default="AD", help="class folder of the inputs to change (default: %(default)s)")
    parser.add_argument("--null-class", default="NC", help="class folder of the null inputs (default: %(default)s)")
    parser.add_argument("--strengths", default="0,0.2,0.35,0.5,0.65,0.8")
    parser.add_argument("--guidance", type=float, default=3.0)
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--num", type=int, default=128, help="held-out slices per class of input (default: %(default)s)")
    parser.add_argument("--region", type=float, default=None, help="radius of the central disc, for `in region`")
    parser.add_argument("--from-own", default=None, metavar="NAME",
                        help="invert each input under its own class folder as condition NAME (counterfactual --from "
                             "NAME=its class; default: unconditioned, as the command's default)")
    parser.add_argument("--classifier-steps", type=int, default=1000)
    parser.add_argument("--out", default=None, help="default: RUN/bench_counterfactual")
    args = parser.parse_args()
    run = Path(args.run)
    out = Path(args.out or run / "bench_counterfactual")
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)

    data = DataConfig.of_run(run)
    dataset = load_slices(data.folder(), data.image_size, data.channels, slicing=data.slicing, layout=data.layout)
    train_idx, ref_idx, floor_idx = run_split(data, dataset)
    held = ref_idx + floor_idx
    key = feature_key(data, dataset, train_idx, data.holdout, data.holdout_seed)
    classifier = domain_classifier(run, dataset, train_idx, key, args.classifier_steps, "cpu")
    model = load_run(run, "cpu")
    target = asked_values(model.conditions, args.set_values or ["class=NC"])[None]
    target_class = dataset.classes.index((args.set_values or ["class=NC"])[0].split("=")[1])
    inputs = {}
    for name in (args.from_class, args.null_class):
        c = dataset.classes.index(name)
        pool = [i for i in held if dataset.labels[i] == c]
        pick = [pool[int(j)] for j in torch.linspace(0, len(pool) - 1, min(args.num, len(pool))).round().long()]
        inputs[name] = stack(dataset, pick)[0]
    region = disc(data.image_size, args.region) if args.region else None

    rows = []
    for strength in [float(s) for s in args.strengths.split(",")]:
        for name, images in inputs.items():
            source = asked_values(model.conditions, [f"{args.from_own}={name}"] if args.from_own else [])[None]
            recon, cf = changed(model, images, source, target, strength, args.steps, args.guidance)
            diff = (cf - recon).abs().mean(1)
            row = {"strength": strength, "input": name, "n": len(images),
                   "flip_rate": class_accuracy(classifier, cf, torch.full((len(cf),), target_class), "cpu"),
                   "ssim": structural_similarity_index_measure((cf + 1) / 2, (images + 1) / 2, data_range=1.0).item(),
                   "psnr": peak_signal_noise_ratio((cf + 1) / 2, (images + 1) / 2, data_range=1.0).item(),
                   "mean_abs_change": diff.mean().item()}
            if region is not None:
                row["in_region"] = (diff[:, region].sum() / diff.sum().clamp(min=1e-12)).item()
            rows.append(row)
            print(json.dumps(row))
            save_image(torch.cat([images[:8], cf[:8]]), out / f"{name}_strength{strength:g}.png", nrow=8,
                       normalize=True, value_range=(-1, 1))
    header = "| strength | input | n | called " + f"{dataset.classes[target_class]} | SSIM | PSNR dB | mean abs change"
    lines = [header + (" | in region |" if region is not None else " |"),
             "|---" * (7 + (region is not None)) + "|"]
    for r in rows:
        lines.append(f"| {r['strength']:g} | {r['input']} | {r['n']} | {r['flip_rate']:.1%} | {r['ssim']:.3f} | "
                     f"{r['psnr']:.2f} | {r['mean_abs_change']:.4f}" + (f" | {r['in_region']:.1%} |" if region is not None
                                                                         else " |"))
    if region is not None:
        lines.append(f"\nThe disc (radius {args.region:g} of half the image) is {region.float().mean():.1%} of the image.")
    (out / "counterfactual.md").write_text("\n".join(lines) + "\n")
    (out / "counterfactual.json").write_text(json.dumps({"run": str(run), "set": args.set_values or ["class=NC"],
                                                        "from_own": args.from_own, "guidance": args.guidance,
                                                        "steps": args.steps, "rows": rows},
                                                       indent=2))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
