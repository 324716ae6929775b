"""Samplers compared on one trained run: seconds per image and every `evaluate` metric.

    python bench/samplers.py --run RUN [--num N] [--rows ddpm-repeat,ddpm,ddim-50,ddim-100,dpmpp-10,dpmpp-20]

The run should hold subjects out (train-vqvae --holdout F); rows are scored against the reference half A
of them, beside the real-vs-real floor B, with the same feature network as `driver.py evaluate`.
Writes RUN/samplers.json and RUN/samplers.md; prints the table.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import driver  # noqa: E402
import predict  # noqa: E402
from dataset import load_slices  # noqa: E402
from evaluation.evaluate import (feature_key, feature_network, run_split, score_rows, stack,  # noqa: E402
                                 training_sample)
from evaluation.report import format_table  # noqa: E402
from runtime.models import load_run  # noqa: E402

# name -> `driver.py sample` flags
SAMPLERS = {
    "ddpm-repeat": ["--sampler", "ddpm", "--repeat-times", "5"],  # the card: DDPM-1000, final 30 steps x5
    "ddpm": ["--sampler", "ddpm", "--repeat-times", "0"],
    "ddim-50": ["--sampler", "ddim", "--steps", "50"],
    "ddim-100": ["--sampler", "ddim", "--steps", "100"],
    "dpmpp-10": ["--sampler", "dpmpp", "--steps", "10"],
    "dpmpp-20": ["--sampler", "dpmpp", "--steps", "20"],
    "ddim-50-eta1": ["--sampler", "ddim", "--steps", "50", "--eta", "1"],
    "ddim-100-eta1": ["--sampler", "ddim", "--steps", "100", "--eta", "1"],
    "ddim-200-eta1": ["--sampler", "ddim", "--steps", "200", "--eta", "1"],
    "dpmpp-sde-20": ["--sampler", "dpmpp-sde", "--steps", "20"],
    "dpmpp-sde-50": ["--sampler", "dpmpp-sde", "--steps", "50"],
    "dpmpp-sde-100": ["--sampler", "dpmpp-sde", "--steps", "100"],
}


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run", required=True, help="trained run folder (vqvae.pt, unet.pt)")
    parser.add_argument("--num", type=int, default=None, help="images per sampler (default: as many as the floor half)")
    parser.add_argument("--rows", default=",".join(SAMPLERS), help="samplers to compare (default: %(default)s)")
    parser.add_argument("--classifier-steps", type=int, default=1000, help="domain feature network training steps")
    args = parser.parse_args()
    run = Path(args.run)

    data = driver.parse(["evaluate", "--run", str(run)]).data_config  # stage 1's images and split
    dataset = load_slices(data.folder(), data.image_size, data.channels, slicing=data.slicing, layout=data.layout)
    holdout, seed = data.holdout or 0.1, data.holdout_seed
    train_idx, ref_idx, floor_idx = run_split(data, dataset, holdout, seed)
    reference, _ = stack(dataset, ref_idx)
    floor, _ = stack(dataset, floor_idx)
    num = args.num or len(floor)

    model = load_run(run, "cpu")
    images, seconds = {}, {}
    for name in args.rows.split(","):
        sampling = predict.sampling_from_args(driver.parse(["sample", "--run", str(run), *SAMPLERS[name]]), model)
        torch.manual_seed(0)
        images[name], _, sec = predict.generate(model, sampling, num)
        seconds[name] = sec / num
    images["real (training)"] = stack(dataset, training_sample(train_idx, num, seed))[0]
    images["real (floor)"] = floor

    key = feature_key(data, dataset, train_idx, holdout, seed)
    features = feature_network(run, dataset, train_idx, key, "cpu", classifier_steps=args.classifier_steps)
    scores = score_rows(images, reference, features, "cpu")
    for name, sec in seconds.items():
        scores[name]["seconds_per_image"] = sec
    table = format_table(scores)
    timing = "\n".join(f"- {name}: {sec:.3f} s/image" for name, sec in seconds.items())
    (run / "samplers.json").write_text(json.dumps({"features": features.name, "scores": scores}, indent=2))
    (run / "samplers.md").write_text(f"features: {features.name}\n\n{table}\n\n{timing}\n")
    print(f"features: {features.name}\n{table}\n{timing}")


if __name__ == "__main__":
    main()
