"""How much a quality.py number moves with the sampling seed alone: the same trained rows, sampled again with
several seeds, every metric's mean and standard deviation over them.

    python bench/seed_spread.py --out runs/bench_quality --rows ours --seeds 5 [--sample ddpm] [--weights model]
    python bench/seed_spread.py --out runs/bench_quality --rows ours --seeds 5 --ema-lengths 0.02,0.05,0.15
    python bench/seed_spread.py --out runs/bench_quality --rows ours --seeds 3 --autoguidance 2@0.25,3@0.25
    python bench/seed_spread.py --out runs/bench_quality --rows ours --seeds 3 --variant "unq=--decode unquantised"

OUT is a finished `bench/quality.py --out` folder: its rows' runs (OUT/ROW), its feature network (OUT), its
held-out split and its number of samples are reused, so seed 1 reproduces quality.py's row exactly: --data,
--holdout and --classifier-steps come from OUT (the feature network's key in OUT/classifier.pt, else
OUT/quality.json), and one given with another value is refused, as is a row trained on another split. `--sample`
takes `bench/samplers.py`'s names (default: `driver.py sample`'s sampler, as quality.py samples). `--weights model`
samples the UNet's last trained weights instead of their EMA, which every sampling command uses. `--ema-lengths`
also samples the post-hoc EMA of each length (EDM2; the rows trained with `quality.py --unet-flags "--posthoc-ema
EVERY"`), so a point of `evaluate --ema-lengths`' curve comes with its spread. `--autoguidance W@F,...` also samples
each row under autoguidance of weight W by the row's snapshot at the fraction F of its steps (`driver.py sample
--autoguidance W --guide-at F`; rows ROW+ag W@F). `--variant NAME=FLAGS` also samples each row with these
`driver.py sample` flags (rows ROW+NAME), so options can be measured together; with `--ema-lengths`, each length
with each (rows ROW@LENGTH+NAME). Writes OUT/seed_spread_SAMPLE[_model|_ema_lengths|_autoguidance|_variants].json,
and the same under the call's date and time (..._YYYYmmdd-HHMMSS.json) so that a later call does not take it
away; prints a table, and each row's paired difference from the first row (seed by seed, the same noise).
"""
from __future__ import annotations

import argparse
import itertools
import json
import shlex
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import driver  # noqa: E402
import predict  # noqa: E402
from evaluation.ema_lengths import ema_lengths_arg  # noqa: E402
from evaluation.evaluate import feature_network, score_rows, stack  # noqa: E402
from quality import held_out_split, layout_version  # noqa: E402
from runtime.checkpoint import load_checkpoint  # noqa: E402
from runtime.models import LatentDiffusion, load_run  # noqa: E402
from runtime.posthoc_ema import reconstruct_many  # noqa: E402
from samplers import SAMPLERS  # noqa: E402
from volumes.run_data import DataConfig  # noqa: E402

METRICS = {"fid": 1, "kid": 1e3, "swd": 1, "swd_64": 1, "swd_32": 1, "swd_16": 1}  # name -> scale as printed


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True, help="a finished bench/quality.py --out folder")
    parser.add_argument("--data", default=None, help="quality.py's --data (default: OUT's)")
    parser.add_argument("--holdout", type=float, default=None, help="quality.py's --holdout (default: OUT's)")
    parser.add_argument("--classifier-steps", type=int, default=None,
                        help="quality.py's --classifier-steps (default: OUT's)")
    parser.add_argument("--rows", default="ours", help="rows of that run to sample again (default: %(default)s)")
    parser.add_argument("--seeds", type=int, default=5, help="sampling seeds 1..N; quality.py samples `ours` with 1")
    parser.add_argument("--sample", choices=sorted(SAMPLERS), default=None,
                        help="a bench/samplers.py sampler (default: driver.py sample's, as quality.py)")
    parser.add_argument("--weights", choices=["ema", "model"], default="ema",
                        help="the UNet's EMA weights, as sampling uses, or its last trained ones (default: %(default)s)")
    parser.add_argument("--ema-lengths", type=ema_lengths_arg, default=(),
                        help="also the post-hoc EMA of these lengths sigma_rel (auto or a,b,...), from each row's "
                             "snapshots: rows ROW@SIGMA_REL")
    parser.add_argument("--autoguidance", default="", metavar="W@F,...",
                        help="also each row under autoguidance W by its snapshot at the fraction F of its steps: rows "
                             "ROW+ag W@F")
    parser.add_argument("--variant", action="append", default=[], metavar="NAME=FLAGS",
                        help="also each row sampled with these driver.py sample flags, e.g. "
                             "unq='--decode unquantised': rows ROW+NAME (repeatable)")
    args = parser.parse_args()
    if args.seeds < 2:
        parser.error("--seeds: a spread needs at least 2")
    if args.ema_lengths and args.weights == "model":
        parser.error("--ema-lengths samples EMA weights; drop --weights model")
    out = Path(args.out)
    data, holdout, classifier_steps, num = quality_settings(out, args, args.rows.split(",")[0])

    # quality.py's reference half A, its number of samples and its feature network
    version = layout_version([out / row for row in args.rows.split(",")])  # the rows' rules of the hold-out
    dataset, (train_idx, ref_idx, floor_idx), key = held_out_split(data, holdout, version)
    reference, _ = stack(dataset, ref_idx)
    features = feature_network(out, dataset, train_idx, key, "cpu", classifier_steps=classifier_steps)
    num = num or len(floor_idx)

    seeds, result = range(1, args.seeds + 1), {}
    for row in args.rows.split(","):
        trained = DataConfig.of_run(out / row)
        if (trained.holdout, trained.holdout_seed) != (holdout, 0):
            raise SystemExit(f"error: {out / row} was trained with --holdout {trained.holdout} (seed "
                             f"{trained.holdout_seed}), not OUT's {holdout}: its samples would be scored against "
                             "subjects it trained on")
        model = load_run(out / row, "cpu")
        if args.weights == "model":
            model.unet.load_state_dict(load_checkpoint(out / row / "unet.pt", "unet")["model"])
        flags = SAMPLERS[args.sample] if args.sample else []
        sampling = predict.sampling_from_args(driver.parse(["sample", "--run", str(out / row), *flags]), model)
        jobs = [(name, weights, sampling) for name, weights in weight_variants(out / row, row, model, args.ema_lengths).items()]
        extra = [(f"ag {guide}", ["--autoguidance", guide.split("@")[0], "--guide-at", guide.split("@")[1]])
                 for guide in filter(None, args.autoguidance.split(","))]
        extra += [(name, shlex.split(text)) for name, _, text in (v.partition("=") for v in args.variant)]
        for (weights_name, weights, _), (name, sample_flags) in itertools.product(list(jobs), extra):
            jobs.append((f"{weights_name}+{name}", weights, predict.sampling_from_args(driver.parse(
                ["sample", "--run", str(out / row), *flags, *sample_flags]), model)))
        for name, weights, sampling in jobs:
            model.unet.load_state_dict(weights)
            images = {}
            for seed in seeds:
                torch.manual_seed(seed)
                images[seed] = predict.generate(model, sampling, num)[0]
            scores = score_rows(images, reference, features, "cpu")
            result[name] = {m: [scale * scores[s][m] for s in seeds] for m, scale in METRICS.items()}

    weights = "" if args.weights == "ema" else ", last trained weights"
    lines = [f"| row ({args.sample or 'driver.py sample'}{weights}, seeds 1-{args.seeds}) | " + " | ".join(METRICS) + " |",
             "|---" * (len(METRICS) + 1) + "|"]
    for row, values in result.items():
        cells = [f"{statistics.mean(v):.2f} ± {statistics.stdev(v):.2f}" for v in values.values()]
        lines.append(f"| {row} | " + " | ".join(cells) + " |")
    first = next(iter(result))
    lines += ["", f"| paired difference from {first} | " + " | ".join(METRICS) + " |", "|---" * (len(METRICS) + 1) + "|"]
    for row, values in list(result.items())[1:]:
        cells = []
        for m, v in values.items():
            d = [a - b for a, b in zip(v, result[first][m])]
            cells.append(f"{statistics.mean(d):+.2f} ± {statistics.stdev(d):.2f} ({sum(x < 0 for x in d)} of {len(d)} lower)")
        lines.append(f"| {row} | " + " | ".join(cells) + " |")
    record = {"rows": args.rows.split(","), "data": data, "holdout": holdout, "features": features.name,
              "classifier_steps": classifier_steps, "samples": num, "sampler": args.sample, "weights": args.weights,
              "ema_lengths": list(args.ema_lengths), "autoguidance": args.autoguidance, "variants": args.variant,
              "seeds": list(seeds), "values": result}
    suffix = ("_model" if args.weights == "model" else "_ema_lengths" if args.ema_lengths else
              "_autoguidance" if args.autoguidance else "_variants" if args.variant else "")
    for stamp in ("", time.strftime("_%Y%m%d-%H%M%S")):  # the latest call's, and this call's for good
        (out / f"seed_spread_{args.sample or 'default'}{suffix}{stamp}.json").write_text(json.dumps(record, indent=2))
    print("\n".join(lines))
    print("(mean ± standard deviation over the seeds; KID x1e3, SWD x1e3)")


def quality_settings(out: Path, args, row: str) -> tuple[str, float, int, int | None]:
    """(data, holdout, classifier steps, samples per row; None: the floor half's size) of quality.py's call on OUT:
    the feature network's key (OUT/classifier.pt) first, then OUT/quality.json, then the data config the row OUT/ROW
    was trained with, then quality.py's defaults. A flag given with another value is refused: another split would
    score rows on subjects they trained on, and another feature network would be trained and saved over OUT's,
    moving every FID of OUT."""
    path = out / "classifier.pt"
    saved = load_checkpoint(path, "classifier")["key"] if path.exists() else {}
    info = json.loads((out / "quality.json").read_text())["info"] if (out / "quality.json").exists() else {}
    vqvae = out / row / "vqvae.pt"
    trained = DataConfig.from_checkpoint(load_checkpoint(vqvae, "vqvae")).saved() if vqvae.exists() else {}
    resolved = {"data": saved.get("data", info.get("data", trained.get("root", "../shared/data/adni_ad_nc"))),
                "holdout": saved.get("holdout", info.get("holdout", trained.get("holdout", 0.1))),
                "classifier_steps": saved.get("steps", info.get("classifier_steps", 1000))}
    for name, value in resolved.items():
        given = getattr(args, name)
        same = given is None or (Path(given).resolve() == Path(value).resolve() if name == "data" else given == value)
        if not same:
            raise SystemExit(f"error: --{name.replace('_', '-')} {given} is not OUT's {value} (its feature network, "
                             "held-out split and rows were made with it): leave it out")
    return resolved["data"], resolved["holdout"], resolved["classifier_steps"], info.get("samples")


def weight_variants(run: Path, row: str, model: LatentDiffusion, ema_lengths: tuple[float, ...]) -> dict:
    """{row: the model's UNet weights as loaded, f"{row}@{sigma_rel}": the post-hoc EMA of each length} (full state
    dicts: buffers come from the loaded weights)."""
    loaded = {k: v.clone() for k, v in model.unet.state_dict().items()}
    variants = {row: loaded}
    for s, (weights, how) in zip(ema_lengths, reconstruct_many(run, list(ema_lengths)) if ema_lengths else []):
        if how["step"] != model.unet_step:
            raise SystemExit(f"{run}: the last EMA snapshot is of step {how['step']}, unet.pt of step {model.unet_step}")
        variants[f"{row}@{s:g}"] = {**loaded, **weights}
    return variants


if __name__ == "__main__":
    main()
