"""Does the memorisation screen catch copies, and what else does it take? `evaluate --withhold-flagged` on a set
with copies of training patients planted in it.

    python bench/memorisation_screen.py --run runs/adni_tiny --num 400 --plant 20 --out runs/screen

A run trained with `--holdout` draws a set of `--num` samples (`driver.py sample`, its defaults). In place of
`--plant` of them goes a training slice as the set stores a sample (8-bit PNG at the run's size: an exact copy), and
in place of as many more that slice as the run's VQ-VAE reconstructs it (a copy as the model would draw one: the
decoder's blur, the codebook's rounding). `driver.py evaluate --samples SET --withhold-flagged --features domain`
then screens the set; which of the planted and which of the model's own samples it withheld is read from the set's
withheld.csv. The training slices are picked at random (`--seed`) from the run's own training split. Writes
OUT/screen.json and OUT/screen.md (the set in OUT/set, the evaluation in OUT/eval).
"""
from __future__ import annotations

import argparse
import csv
import json
import sys
from pathlib import Path

import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import driver  # noqa: E402
from dataset import load_slices  # noqa: E402
from evaluation.evaluate import run_split  # noqa: E402
from runtime.models import load_vqvae  # noqa: E402
from volumes.run_data import DataConfig  # noqa: E402


def training_slices(run: Path, count: int, seed: int) -> tuple[torch.Tensor, list[str]]:
    """`count` of the run's training images (count, C, S, S) in [-1, 1], picked at random, and their paths."""
    data = DataConfig.of_run(run)
    dataset = load_slices(data.folder(), data.image_size, data.channels, skip_bad=data.skip_bad_images,
                          slicing=data.slicing, layout=data.layout)
    train_idx, _, _ = run_split(data, dataset)
    order = torch.randperm(len(train_idx), generator=torch.Generator().manual_seed(seed))
    picked = [train_idx[i] for i in order[:count].tolist()]
    return torch.stack([dataset[i][0] for i in picked]), [dataset.samples[i][0] for i in picked]


@torch.no_grad()
def reconstructed(run: Path, images: torch.Tensor) -> torch.Tensor:
    """The run's VQ-VAE (stage 1's decoder) reconstructions of `images`."""
    vqvae, _ = load_vqvae(run, "cpu", finetuned=False)
    return vqvae.decoder(vqvae.quantize(vqvae.encode(images))[0]).clamp(-1, 1)


def save_as_sample(image: torch.Tensor, path: Path):
    """An image (C, S, S) in [-1, 1] as `sample --format png` stores one: 8-bit grey."""
    pixels = ((image.clamp(-1, 1) + 1) * 127.5).round().byte()
    Image.fromarray(pixels[0].numpy() if len(pixels) == 1 else pixels.permute(1, 2, 0).numpy()).save(path)


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--run", required=True, help="a run trained with --holdout")
    p.add_argument("--num", type=int, default=400, help="samples in the set")
    p.add_argument("--plant", type=int, default=20, help="exact copies planted, and as many reconstructed copies")
    p.add_argument("--seed", type=int, default=0, help="the set's seed, and which training slices are planted")
    p.add_argument("--out", required=True)
    p.add_argument("--evaluate-flags", default="--features domain", help="more flags for evaluate")
    args = p.parse_args()
    run, out = Path(args.run), Path(args.out)

    driver.main(["sample", "--run", str(run), "--num", str(args.num), "--seed", str(args.seed),
                 "--out", str(out / "set")])
    folder = out / "set" / "samples"
    files = [row["file"] for row in csv.DictReader((folder / "manifest.csv").open())]
    exact, paths = training_slices(run, args.plant, args.seed)
    planted = {"exact copy": exact, "reconstructed copy": reconstructed(run, exact)}
    places = torch.randperm(len(files), generator=torch.Generator().manual_seed(args.seed + 1))[:2 * args.plant]
    kinds = {}
    for k, place in enumerate(places.tolist()):
        kind = list(planted)[k // args.plant]
        save_as_sample(planted[kind][k % args.plant], folder / files[place])
        kinds[files[place]] = kind

    driver.main(["evaluate", "--run", str(run), "--samples", str(out / "set"), "--out", str(out / "eval"),
                 "--withhold-flagged", *args.evaluate_flags.split()])
    withheld = {row["file"]: row["flagged_by"] for row in csv.DictReader((folder / "withheld.csv").open())} \
        if (folder / "withheld.csv").exists() else {}
    rows = []
    for kind in [*planted, "the model's own samples"]:
        mine = [f for f in files if kinds.get(f, "the model's own samples") == kind]
        caught = [f for f in mine if f in withheld]
        rows.append({"images": kind, "n": len(mine), "withheld": len(caught),
                     "by features": sum("features" in withheld[f] for f in caught),
                     "by pixels": sum("pixels" in withheld[f] for f in caught)})
    metrics = json.loads((out / "eval" / "metrics.json").read_text())["memorisation"]
    result = {"run": str(run), "num": args.num, "plant": args.plant, "seed": args.seed, "planted_from": paths,
              "thresholds": metrics["thresholds"], "held_out_rows": {k: v for k, v in metrics["rows"].items()
                                                                   if k != "samples"}, "rows": rows}
    (out / "screen.json").write_text(json.dumps(result, indent=2) + "\n")
    lines = ["| images | n | withheld | by features | by pixels |", "|---|---|---|---|---|"]
    lines += [f"| {r['images']} | {r['n']} | {r['withheld']} ({r['withheld'] / max(r['n'], 1):.1%}) | "
              f"{r['by features']} | {r['by pixels']} |" for r in rows]
    (out / "screen.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
