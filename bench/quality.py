"""Quality benchmark, side by side at the same wall-clock budget (issue 4):

    pip install -r requirements.txt -r bench/requirements.txt
    python bench/quality.py --data ../shared/data/adni_ad_nc --vq-minutes 8 --unet-minutes 15 --out runs/bench_quality

`--steps VQ,UNET` trains our rows for fixed step counts instead (the same training on any machine), `--seed` with
another training seed: together they measure the training noise of a row at a given budget.

Rows, all scored by `driver.py evaluate`'s metrics against the same held-out subjects (reference half A,
with the real-vs-real floor B beside them):
    ours     this project's `tiny` pipeline (64x64 -> 4x16x16), trained with --max-minutes (or --steps) per stage,
             sampled as `driver.py sample` does (SDE-DPM-Solver++ 20, the ODE form before 2026-12-06; predicted
             x0 clipped to the latents' range)
    ours-unclamped     the same with stage 1's reconstruction error measured on the raw decoder output
             (--no-clamped-loss; both presets measure it on the output clamped to [-1, 1], as it is shown)
    ours-constant      the same with stage 1's learning rate constant to the end (--cooldown 0; the `tiny`
             default lets it fall to zero over the last 20% of the run)
    ours-adversarial   the same with stage 1's adversarial patch loss (--adversarial-weight, from
             --adversarial-start; `--adversarial` sets both), at the same budget
    ours-laplacian     the same with stage 1's Laplacian-pyramid L1 loss (`--laplacian` sets its weight)
    ours-codes         the same with another codebook size (`--codes`; the `tiny` preset had 512 until 2026-11-26, and
             has 2048 since)
    ours-former        the same with the `tiny` stage 1 as it was until 2026-11-26: batch 32, learning rate 2e-3,
             512 codes (now batch 8, 1e-3, 2048 codes)
    peer     diffusers VQModel + UNet2DModel + DDPMScheduler, plain loops, same budgets (bench/peer_diffusers.py),
             sampled with DDIM-100
    defect   the original report's sampler on *our* trained models: DDPM-1000 with noise 1.15*(n1+n2)*sigma,
             x_t clamped to [-1, 1] every step, no latent scale
    ours-NAME   the same with the stage-1 flags of `--variant NAME='FLAGS'` (the losses of losses/, for example),
             or with the flags of `--variant-both NAME='FLAGS'` in both stages (`bf16='--precision bf16'`)
`--unet-flags` gives every row of ours the same stage-2 flags (`--posthoc-ema 100` keeps the snapshots from which
`driver.py evaluate --run OUT/ROW --ema-lengths auto` draws the curve of quality against EMA length).
`--stage1-only` trains stage 1 alone and scores the rows' reconstructions of the floor half (a first screen of
stage-1 recipes: samples cannot hold finer detail than the reconstructions do).

A row whose run is in OUT already (OUT/ROW, a stage at a time) is not trained again: it is scored as it is, if the
command that would have trained it agrees with it (`driver.py`'s --resume check: another seed, hold-out, data or
flag of the row's is refused, since its scores would be labelled with settings it was not trained with, or taken on
subjects it trained on); the JSON then records it as reused, with the budget it was trained with.
Writes OUT/quality.json and OUT/quality.md, the same under the call's date and time (quality_YYYYmmdd-HHMMSS.*) so
that a later call does not take them away, OUT/samples.pt (every row's images, this call's replacing a row's
earlier ones) and sample grids; prints the table.
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import shlex
import sys
import time
from pathlib import Path

import torch
from torchmetrics.image import PeakSignalNoiseRatio, StructuralSimilarityIndexMeasure
from torchvision.utils import save_image
from tqdm import tqdm

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import driver  # noqa: E402
import predict  # noqa: E402
from dataset import load_slices  # noqa: E402
from evaluation.evaluate import (class_mix, evaluation_split, feature_network, score_rows, stack,  # noqa: E402
                                 training_sample)
from evaluation.report import format_level_table, format_table  # noqa: E402
from evaluation.metrics import reconstruction_metrics  # noqa: E402
from runtime.checkpoint import load_checkpoint  # noqa: E402
from runtime.errors import BadInputError  # noqa: E402
from runtime.models import load_run, load_vqvae  # noqa: E402
from volumes.layouts import LAYOUT_VERSION, Layout  # noqa: E402
from volumes.run_data import DataConfig  # noqa: E402

ROWS = ("ours", "ours-unclamped", "ours-adversarial", "ours-laplacian", "ours-constant", "ours-codes", "ours-former",
        "peer", "defect")


@torch.no_grad()
def original_report_samples(vqvae, unet, diffusion, num: int, shape, batch_size: int = 100) -> torch.Tensor:
    """The report's reverse process on our models: posterior mean + 1.15*sqrt(var)*(n1+n2), x_t clamped, no scale."""
    out = []
    for start in range(0, num, batch_size):
        x = torch.randn(min(batch_size, num - start), *shape)
        for step in tqdm(range(diffusion.num_steps - 1, -1, -1), desc="original sampler", leave=False):
            t = torch.full((len(x),), step, dtype=torch.long)
            x0, _ = diffusion.predict_x0_eps(unet, x, t)
            mean, var = diffusion.q_posterior(x0, x, t)
            if step > 0:
                mean = mean + 1.15 * var.sqrt() * (torch.randn_like(x) + torch.randn_like(x))
            x = mean.clamp(-1, 1)
        out.append(vqvae.decode(x).float().clamp(-1, 1))  # no latent scale: x is decoded as it is
    return torch.cat(out)


def held_out_split(data: str, holdout: float, version: int = LAYOUT_VERSION) -> tuple:
    """The slices at 64x64, their subjects split as train-vqvae --holdout and evaluate split them by the rules of data
    layout `version` (training, reference half A, floor half B; version 5 draws both within classes), and the key
    under which OUT keeps the feature network trained on that split: the folder resolved, so that another spelling of
    it (relative, absolute, a link) finds the same network instead of training and saving another over it, which
    would move every FID of OUT."""
    config = DataConfig(root=data, image_size=64, holdout=holdout, layout=Layout(version=version))
    dataset = load_slices(data, 64, 1, layout=config.layout)
    # version 5: the subjects train-vqvae names; before: as OUT folders of those rows were split (the folder not given)
    subject = config.subject() if version >= 5 else config.layout.subject
    split = evaluation_split([p for p, _ in dataset.samples], holdout, 0, subject,
                             config.strata(dataset.samples, dataset.classes), config.listing())
    key = {"data": str(Path(data).resolve()), "image_size": 64, "channels": 1, "holdout": holdout, "holdout_seed": 0,
           "count": len(dataset), **({"layout": version} if version >= 5 else {})}
    return dataset, split, key


def split_rules(version: int) -> int:
    """The data layout version whose split `version` draws here: 6 draws from every file listed, 5 from the files
    read, alike where every file reads, as load_slices reads them here (no --skip-bad-images)."""
    return 5 if version == 6 else version


def layout_version(runs: list[Path]) -> int:
    """The data layout version (`split_rules`) the runs' stage 1s split their data by (today's where none is trained
    yet): the split that scores them must be theirs, or a row would be scored on subjects it trained on."""
    versions = {run: split_rules(DataConfig.of_run(run).layout.version)
                for run in dict.fromkeys(runs) if (run / "vqvae.pt").exists()}
    if len(set(versions.values())) > 1:
        found = ", ".join(f"{run} {version}" for run, version in versions.items())
        raise SystemExit(f"error: these rows were trained with different data layouts ({found}), whose held-out "
                         "subjects differ: score them in separate --out folders")
    return next(iter(versions.values()), split_rules(LAYOUT_VERSION))


def train_or_reuse(stage: str, command: list[str], run: Path) -> dict:
    """Train a row's stage, or, where its checkpoint is there, check that `command` (what would have trained it)
    agrees with it: driver.py's --resume check refuses a flag of another value (seed, hold-out, data, the variant's
    flags). {"minutes": of training} or {"reused": the budget it was trained with}."""
    if not (run / f"{stage}.pt").exists():
        t0 = time.perf_counter()
        driver.main([f"train-{stage}", *command])
        return {"minutes": (time.perf_counter() - t0) / 60}
    try:
        driver.parse([f"train-{stage}", *command, "--resume"])
    except BadInputError as e:
        raise SystemExit(f"error: {run} is reused, not trained again, and the call differs from it: {e} (to train "
                         "the row anew, give another --out)") from None
    own = load_checkpoint(run / f"{stage}.pt", stage).get("args", {})
    return {"reused": {k: own.get(k) for k in ("max_steps", "max_minutes", "seed")}}


def grid(images: torch.Tensor, path: Path):
    save_image(images[:64], path, nrow=8, normalize=True, value_range=(-1, 1))


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", default="../shared/data/adni_ad_nc", help="image folder (default: %(default)s)")
    parser.add_argument("--out", default="runs/bench_quality", help="output folder (default: %(default)s)")
    parser.add_argument("--vq-minutes", type=float, default=8.0, help="wall-clock budget of stage 1, both pipelines")
    parser.add_argument("--unet-minutes", type=float, default=15.0, help="wall-clock budget of stage 2, both pipelines")
    parser.add_argument("--steps", default=None,
                        help="VQ,UNET: train our rows for these step counts instead of the minutes, the same on any machine")
    parser.add_argument("--seed", type=int, default=0, help="training seed of our rows (driver.py --seed; default: 0)")
    parser.add_argument("--holdout", type=float, default=0.1, help="fraction of subjects held out (default: %(default)s)")
    parser.add_argument("--classifier-steps", type=int, default=1000, help="domain feature network training steps")
    parser.add_argument("--num", type=int, default=None, help="samples per row (default: as many as the floor half)")
    parser.add_argument("--rows", default="ours,peer,defect",
                        help="rows to compute: ours, ours-unclamped, ours-adversarial, ours-laplacian, ours-constant, "
                             "ours-codes, ours-former, peer, defect (default: %(default)s)")
    parser.add_argument("--codes", default="512", help="codebook size of the ours-codes row (default: %(default)s, "
                                                      "the `tiny` preset's until 2026-11-26; 2048 since)")
    parser.add_argument("--laplacian", default="1.0", help="Laplacian L1 weight of the ours-laplacian row (default: %(default)s)")
    parser.add_argument("--adversarial", default="0.5,500",
                        help="weight,start[,discriminator lr] of the ours-adversarial row (default: %(default)s)")
    parser.add_argument("--variant", action="append", default=[], metavar="NAME=FLAGS",
                        help="a row ours-NAME whose stage 1 gets these train-vqvae flags, e.g. "
                             "lsgan='--reconstruction-loss l1 --adversarial-weight 0.01 --adversarial-weighting fixed' "
                             "(repeatable; each is computed)")
    parser.add_argument("--variant-both", action="append", default=[], metavar="NAME=FLAGS",
                        help="a row ours-NAME whose stages 1 and 2 both get these flags, e.g. bf16='--precision bf16' "
                             "(repeatable; each is computed)")
    parser.add_argument("--unet-flags", default="", metavar="FLAGS",
                        help="train-unet flags for every row of ours, e.g. '--posthoc-ema 100' to choose the EMA length "
                             "afterwards with `driver.py evaluate --run OUT/ROW --ema-lengths auto`")
    parser.add_argument("--stage1-only", action="store_true",
                        help="train and score stage 1 alone: the rows' reconstructions of the floor half, no samples")
    args = parser.parse_args()
    out, rows = Path(args.out), args.rows.split(",")
    if "peer" in rows and not args.stage1_only and importlib.util.find_spec("diffusers") is None:  # before training
        parser.error("the peer row needs diffusers: pip install -r bench/requirements.txt")
    out.mkdir(parents=True, exist_ok=True)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    torch.manual_seed(0)

    # the held-out subjects, exactly as train-vqvae --holdout and evaluate split them (by the rules of OUT's rows)
    version = layout_version([out / row for row in ROWS if row != "peer"] + sorted(out.glob("ours-*")))
    dataset, (train_idx, ref_idx, floor_idx), key = held_out_split(args.data, args.holdout, version)
    reference, _ = stack(dataset, ref_idx)
    floor, _ = stack(dataset, floor_idx)
    n = args.num or len(floor)
    images = {"real (training)": stack(dataset, training_sample(train_idx, n, 0))[0], "real (floor)": floor}
    info = {"data": args.data, "vq_minutes": args.vq_minutes, "unet_minutes": args.unet_minutes,
            "steps": args.steps, "seed": args.seed, "unet_flags": args.unet_flags, "holdout": args.holdout,
            "classifier_steps": args.classifier_steps, "peer_budget_minutes": [args.vq_minutes, args.unet_minutes],
            "train_images": len(train_idx), "reference": len(ref_idx), "floor": len(floor_idx), "samples": n,
            "class_mix": {"training": class_mix(dataset, train_idx), "reference": class_mix(dataset, ref_idx),
                          "floor": class_mix(dataset, floor_idx)}}

    adversarial = args.adversarial.split(",")
    variants = {"ours": [], "ours-adversarial": ["--adversarial-weight", adversarial[0], "--adversarial-start", adversarial[1],
                                                 *(["--adversarial-lr", adversarial[2]] if len(adversarial) > 2 else [])],
                "ours-laplacian": ["--laplacian-weight", args.laplacian], "ours-unclamped": ["--no-clamped-loss"],
                "ours-constant": ["--cooldown", "0"], "ours-codes": ["--codebook-size", args.codes],
                "ours-former": ["--batch-size", "32", "--lr", "2e-3", "--codebook-size", "512"]}
    both_stages = {}   # row -> the flags its stage 2 gets too
    for text, both in [(t, False) for t in args.variant] + [(t, True) for t in args.variant_both]:
        name, _, flags = text.partition("=")
        variants[f"ours-{name}"] = shlex.split(flags)
        if both:
            both_stages[f"ours-{name}"] = shlex.split(flags)
        rows.append(f"ours-{name}")
    unknown = [r for r in rows if r not in (*ROWS, *variants)]
    if unknown:
        parser.error(f"--rows: no row {', '.join(unknown)} (rows: {', '.join(ROWS)}; --variant NAME=FLAGS adds "
                     "ours-NAME)")
    info["variants"] = {name: variants[name] for name in rows if name in variants}
    info["variants_both_stages"] = both_stages
    for name, stage1_flags in variants.items():
        if name not in rows and not (name == "ours" and "defect" in rows):
            continue
        run = out / name
        common = ["--run", str(run), "--data", args.data, "--preset", "tiny", "--seed", str(args.seed)]
        if args.steps:
            vq_budget, unet_budget = (["--max-steps", count] for count in args.steps.split(","))
        else:
            vq_budget, unet_budget = (["--max-steps", "1000000000", "--max-minutes", str(m)]
                                      for m in (args.vq_minutes, args.unet_minutes))
        if version != split_rules(LAYOUT_VERSION) and not (run / "vqvae.pt").exists():  # beside earlier rows
            raise SystemExit(f"error: OUT's rows were trained with data layout version {version}, and {run} would be "
                             f"trained with {LAYOUT_VERSION}, whose held-out subjects differ: give a new --out")
        info[f"{name}_vqvae_training"] = train_or_reuse(
            "vqvae", [*common, *vq_budget, "--holdout", str(args.holdout), *stage1_flags], run)
        if not args.stage1_only:
            info[f"{name}_unet_training"] = train_or_reuse(
                "unet", [*common, *unet_budget, *shlex.split(args.unet_flags), *both_stages.get(name, [])], run)
        info[f"{name}_decoder"] = load_vqvae(run, "cpu")[1].get("decoder")  # RUN/decoder.pt's step, fingerprint
        if args.stage1_only:
            vqvae, vq_ckpt = load_vqvae(run, "cpu")
            info[f"{name}_steps"] = {"vqvae": vq_ckpt["step"]}
            info[f"{name}_vqvae"], images[f"{name} (reconstructions)"] = reconstruction_metrics(vqvae, floor)
            continue
        model = load_run(run, "cpu")
        info[f"{name}_steps"] = {"vqvae": torch.load(run / "vqvae.pt", weights_only=True)["step"], "unet": model.unet_step}
        info[f"{name}_vqvae"], recons = reconstruction_metrics(model.vqvae, floor)
        images[f"{name} (reconstructions)"] = recons
        if name in rows:
            sampling = predict.sampling_from_args(driver.parse(["sample", "--run", str(run)]), model)
            torch.manual_seed(1)
            images[name], _, seconds = predict.generate(model, sampling, n)
            info[f"{name}_seconds_per_image"] = seconds / n
        if name == "ours":
            ours = model
    if "defect" in rows and not args.stage1_only:
        t0 = time.perf_counter()
        torch.manual_seed(2)
        images["defect"] = original_report_samples(ours.vqvae, ours.unet, ours.diffusion, n, ours.latent_shape)
        info["defect_seconds_per_image"] = (time.perf_counter() - t0) / n
    if "peer" in rows and not args.stage1_only:
        from peer_diffusers import sample_peer, train_peer  # here: diffusers is needed for this row only
        train_images, _ = stack(dataset, train_idx)
        peer = train_peer(train_images, args.vq_minutes, args.unet_minutes, seed=0, log=tqdm.write)
        info["peer_steps"] = {"vqvae": peer["vq_steps"], "unet": peer["unet_steps"]}
        info["peer_params"] = {"vqvae": peer["vq_params"], "unet": peer["unet_params"]}
        t0 = time.perf_counter()
        images["peer"] = sample_peer(peer, n, seed=3, steps=100)
        info["peer_seconds_per_image"] = (time.perf_counter() - t0) / n
        with torch.no_grad():
            recon = torch.cat([peer["vqvae"](x).sample.clamp(-1, 1) for x in floor.split(64)])
        info["peer_vqvae"] = {"psnr": PeakSignalNoiseRatio(data_range=2.0)(recon, floor).item(),
                              "ssim": StructuralSimilarityIndexMeasure(data_range=2.0)(recon, floor).item()}

    # one feature network and one reference for every row
    features = feature_network(out, dataset, train_idx, key, "cpu", classifier_steps=args.classifier_steps)
    order = [r for r in images if not r.startswith("real")] + ["real (training)", "real (floor)"]
    earlier = torch.load(out / "samples.pt", weights_only=True) if (out / "samples.pt").exists() else {}
    torch.save({**earlier, **{r: images[r] for r in order if not r.startswith("real")}},
               out / "samples.pt")  # rescoring needs no resampling
    scores = score_rows({r: images[r] for r in order}, reference, features, "cpu")
    for name in order:
        grid(images[name], out / f"grid_{name.replace(' (', '_').rstrip(')')}.png")
    table = f"{format_table(scores)}\n\nSWD x1e3 per Laplacian level:\n\n{format_level_table(scores)}"
    for name in ("quality", f"quality_{stamp}"):  # the latest call's, and this call's for good
        (out / f"{name}.json").write_text(json.dumps({"info": info, "features": features.name, "scores": scores},
                                                     indent=2))
        (out / f"{name}.md").write_text(f"features: {features.name}\n\n{table}\n\n"
                                        f"```\n{json.dumps(info, indent=2)}\n```\n")
    print(f"features: {features.name}")
    print(table)
    print(json.dumps(info, indent=2))


if __name__ == "__main__":
    main()
