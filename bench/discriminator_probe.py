"""Can the PatchGAN tell a run's reconstructions from real slices? The discriminator alone, trained as `Adversary`
trains it (the least-squares loss, AdamW with betas 0.5, 0.9, batches of 8 real slices and their reconstructions),
on 2,000 training slices and the run's reconstructions of them (through `decoder.pt` where there is one), and
scored on the held-out floor half: its mean output on real and on reconstructed slices, and how often a slice's mean
output falls on the right side of 0.5. A discriminator left at chance gives the decoder no direction to go.

    python bench/discriminator_probe.py --data /work/shared/data/adni_ad_nc --run runs/q41/ours-g0l \
        --variants group:dcgan,group:default --seeds 0,1,2 --steps 1500

Each variant is NORM:INIT (`DiscriminatorConfig`: norm group or none, init default or dcgan), 64 channels and 3
layers unless `--channels`, `--layers` say otherwise. Prints one line per quarter of the steps and writes
RUN/discriminator_probe.json.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from evaluation.evaluate import stack  # noqa: E402
from evaluation.metrics import reconstruction_metrics  # noqa: E402
from losses.adversarial import DiscriminatorConfig, PatchDiscriminator, least_squares_d_loss  # noqa: E402
from quality import held_out_split, layout_version  # noqa: E402
from runtime.models import load_vqvae  # noqa: E402


def reconstructions(run: Path, images: torch.Tensor) -> torch.Tensor:
    vq, _ = load_vqvae(run, "cpu", finetuned=(run / "decoder.pt").exists())
    return reconstruction_metrics(vq.eval(), images)[1]


def probe(cfg: DiscriminatorConfig, seed: int, steps: int, lr: float, train: tuple, held_out: tuple) -> list[dict]:
    torch.manual_seed(seed)
    disc = PatchDiscriminator(cfg)
    optimizer = torch.optim.AdamW(disc.parameters(), lr, betas=(0.5, 0.9), weight_decay=0.0)
    (real, fake), rows, start = train, [], time.monotonic()
    for step in range(1, steps + 1):
        i = torch.randint(len(real), (8,))
        loss = least_squares_d_loss(*disc(torch.cat([real[i], fake[i]])).chunk(2))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if step % max(steps // 4, 1) == 0:
            with torch.no_grad():
                on_real, on_fake = (disc(x).mean((1, 2, 3)) for x in held_out)
            accuracy = ((on_real > 0.5).float().mean() + (on_fake < 0.5).float().mean()).item() / 2
            rows.append({"step": step, "train_loss": loss.item(), "real": on_real.mean().item(),
                         "reconstructed": on_fake.mean().item(), "accuracy": accuracy,
                         "seconds": time.monotonic() - start})
            print(f"{cfg.norm}:{cfg.init} seed {seed} step {step}: loss {loss.item():.3f}, held out: D(real) "
                  f"{rows[-1]['real']:.3f}, D(reconstructed) {rows[-1]['reconstructed']:.3f}, "
                  f"accuracy {accuracy:.3f}", flush=True)
    return rows


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", required=True, help="the slices the run trained on (64x64, as quality.py)")
    parser.add_argument("--run", required=True, help="a run folder with vqvae.pt (and decoder.pt)")
    parser.add_argument("--variants", default="group:dcgan,group:default")
    parser.add_argument("--seeds", default="0")
    parser.add_argument("--steps", type=int, default=2000)
    parser.add_argument("--lr", type=float, default=2e-4, help="train-decoder's `tiny` rate, which Adversary uses")
    parser.add_argument("--channels", type=int, default=64)
    parser.add_argument("--layers", type=int, default=3)
    args = parser.parse_args()
    run = Path(args.run)
    dataset, (train_idx, _, floor_idx), _ = held_out_split(args.data, 0.1, layout_version([run]))
    train, _ = stack(dataset, train_idx[:2000])
    floor, _ = stack(dataset, floor_idx)
    train_pair, held_out = (train, reconstructions(run, train)), (floor, reconstructions(run, floor))
    results = {}
    for variant in args.variants.split(","):
        norm, init = variant.split(":")
        cfg = DiscriminatorConfig(channels=args.channels, num_layers=args.layers, norm=norm, init=init)
        for seed in (int(s) for s in args.seeds.split(",")):
            results[f"{variant} seed {seed}"] = probe(cfg, seed, args.steps, args.lr, train_pair, held_out)
    (run / "discriminator_probe.json").write_text(json.dumps({"args": vars(args), "results": results}, indent=1))


if __name__ == "__main__":
    main()
