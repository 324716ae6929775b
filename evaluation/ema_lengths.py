"""Choosing the EMA length of the sampling weights after training (EDM2's post-hoc EMA, runtime/posthoc_ema.py).

    python driver.py evaluate --run RUN --ema-lengths auto     # the curve: FID, KID and each SWD band against sigma_rel
    python driver.py ema --run RUN --sigma-rel best            # sample from the length with the lowest FID of that curve
    python driver.py ema --run RUN --sigma-rel 0.08            # ... or from a length of your choice
    python driver.py ema --run RUN --sigma-rel none            # ... or from the run's own EMA again (--ema-decay)

`evaluate --ema-lengths` reconstructs the UNet's weights at each length from the run's snapshots (train-unet
--posthoc-ema EVERY), samples them with the evaluation's sampler and seed, and scores them against the held-out
reference half A exactly as the samples row; the run's own EMA is the first row, with the sigma_rel its warm-up
and decay give it. `driver.py ema` writes the chosen weights into RUN/unet.pt ("sampling_ema"), which every
sampling command then uses and names in its records (`posthoc_ema_sigma_rel`); training the run further drops
the choice, since it was made for the weights of one step.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from export.figures import save_figure  # noqa: E402
from runtime.checkpoint import atomic_save, fingerprint, load_checkpoint, lock_holder, remove_unfinished  # noqa: E402
from runtime.errors import BadInputError  # noqa: E402
from runtime.models import LatentDiffusion  # noqa: E402
from runtime.posthoc_ema import (GOOD_FIT, PROFILES, reconstruct, reconstruct_many, running_ema_sigma_rel,  # noqa: E402
                                  sigma_rel_to_gamma, snapshot_files)

AUTO = (0.01, 0.02, 0.03, 0.05, 0.07, 0.10, 0.15, 0.20, 0.25)  # `--ema-lengths auto`: EDM2's range and around it
RUNNING = "run's EMA"


def ema_lengths_arg(text: str) -> tuple[float, ...]:
    """'auto' or 'a,b,...' -> the sigma_rel values, each checked (argparse type)."""
    try:
        lengths = AUTO if text == "auto" else tuple(float(v) for v in text.split(","))
        for s in lengths:
            sigma_rel_to_gamma(s)
    except (ValueError, BadInputError) as e:
        raise argparse.ArgumentTypeError(f"expected auto or comma-separated EMA lengths sigma_rel, got {text!r} ({e})") from None
    return lengths


def sigma_rel_arg(text: str) -> str:
    """best, none or one EMA length (argparse type)."""
    if text in ("best", "none"):
        return text
    try:
        sigma_rel_to_gamma(float(text))
    except (ValueError, BadInputError) as e:
        raise argparse.ArgumentTypeError(f"expected one EMA length sigma_rel, best or none, got {text!r} ({e})"
                                         ) from None
    return text


def running_sigma_rel(run: Path) -> float:
    """The sigma_rel of the run's own EMA (modules.EMA's warm-up and --ema-decay over its updates so far)."""
    ckpt = load_checkpoint(run / "unet.pt", "unet")
    return running_ema_sigma_rel(ckpt["args"]["ema_decay"], ckpt["ema_updates"])


def refuse_unready(run: Path, samples: str | None):
    """`evaluate --ema-lengths`, before any work (the samples row, the features and the memorisation check take
    minutes before the curve): the run's own samples, not --samples; its snapshots; no command training it (it would
    write later snapshots and checkpoints while the curve is measured); its unet.pt, at the step of the last
    snapshot (the curve reconstructs the lengths there, and `ema` checks that it is unet.pt's)."""
    if samples:
        raise BadInputError("--ema-lengths scores the run's own samples; not with --samples")
    if not snapshot_files(run):
        raise BadInputError(f"--ema-lengths scores the run's own samples at each EMA length, reconstructed from its "
                            f"snapshots; {run} has none (train-unet --posthoc-ema EVERY keeps them)")
    holder = lock_holder(run)
    if holder:
        raise BadInputError(f"another command is training or changing {run} ({holder}): --ema-lengths measures the "
                            f"weights of one step; evaluate it when that command has finished")
    if not (run / "unet.pt").exists():
        raise BadInputError(f"--ema-lengths scores the samples of {run / 'unet.pt'}, which does not exist: "
                            f"train-unet first")
    last, step = max(snapshot_files(run)), load_checkpoint(run / "unet.pt", "unet")["step"]
    if last != step:
        raise BadInputError(f"the last EMA snapshot in {run} is of step {last}, unet.pt of step {step}; train-unet "
                            f"--resume writes the snapshot of its last step")


def ema_length_curve(run: Path, lengths: tuple[float, ...], model: LatentDiffusion, generate, score) -> dict:
    """{"samples_row": whose weights the evaluation's samples row drew, "samples_sigma_rel": their length, "unet_step",
    "rows": [{sigma_rel, fit, snapshots, scores}], "best": the sigma_rel of the lowest FID}. generate(model) ->
    samples as the evaluation draws them (its seed set inside); score({name: images}) -> the evaluation's scores of
    those rows. The model's weights are put back afterwards."""
    saved = {k: v.clone() for k, v in model.unet.state_dict().items()}
    images, how = {}, {}
    try:
        for s, (weights, how[s]) in zip(lengths, reconstruct_many(run, list(lengths))):
            if how[s]["step"] != model.unet_step:
                raise BadInputError(f"the last EMA snapshot in {run} is of step {how[s]['step']}, unet.pt of step "
                                    f"{model.unet_step}; train-unet --resume writes the snapshot of its last step")
            model.unet.load_state_dict({**saved, **weights})
            images[s] = generate(model)
    finally:
        model.unet.load_state_dict(saved)
    scores = score({f"sigma_rel {s:g}": x for s, x in images.items()})
    rows = [{"sigma_rel": s, "fit": how[s]["fit"], "snapshots": how[s]["snapshots"], "scores": scores[f"sigma_rel {s:g}"]}
            for s in lengths]
    fitted = [r for r in rows if r["fit"] <= GOOD_FIT] or rows  # lengths the snapshots cannot make are not chosen
    best = min(fitted, key=lambda r: r["scores"]["fid"])["sigma_rel"]
    chosen = model.posthoc_ema  # the samples row's weights: the run's EMA, or a length chosen before
    trained = load_checkpoint(run / "unet.pt", "unet")["model"]  # which stage 2 this was: `ema` checks it
    return {"samples_row": "post-hoc, chosen before" if chosen else RUNNING,
            "samples_sigma_rel": chosen["sigma_rel"] if chosen else running_sigma_rel(run),
            "unet_step": model.unet_step, "unet_trained_fingerprint": fingerprint(trained), "rows": rows, "best": best}


def format_ema_table(curve: dict, samples_scores: dict) -> str:
    """Markdown: one row per EMA length (the run's own first), FID, KID, SWD and its finest band."""
    finest = max(int(k[4:]) for k in samples_scores if k.startswith("swd_"))
    lines = [f"| EMA | sigma_rel | FID | KID x1e3 | SWD x1e3 | finest band ({finest} px) | fit |", "|---" * 7 + "|"]

    def line(name, s, scores, fit):
        return (f"| {name} | {s:.3f} | {scores['fid']:.3f} | {1e3 * scores['kid']:.2f} | {scores['swd']:.1f} | "
                f"{scores[f'swd_{finest}']:.1f} | {fit} |")

    lines.append(line(f"{curve['samples_row']} (the samples row)", curve["samples_sigma_rel"], samples_scores, "-"))
    for r in curve["rows"]:
        mark = (" (lowest FID)" if r["sigma_rel"] == curve["best"] else
                " (not fitted: never chosen)" if r["fit"] > GOOD_FIT else "")
        lines.append(line(f"post-hoc{mark}", r["sigma_rel"], r["scores"], f"{r['fit']:.1e}"))
    return "\n".join(lines)


def plot_ema_curve(curve: dict, samples_scores: dict, reals: dict, path: Path):
    """FID and the finest SWD band against sigma_rel (log scale), the run's EMA and the real rows marked."""
    finest = f"swd_{max(int(k[4:]) for k in samples_scores if k.startswith('swd_'))}"
    x = [r["sigma_rel"] for r in curve["rows"]]
    fig, axes = plt.subplots(1, 2, figsize=(9, 3.5))
    for ax, key, title in ((axes[0], "fid", "FID"), (axes[1], finest, "SWD x1e3, finest band")):
        ax.plot(x, [r["scores"][key] for r in curve["rows"]], "o-", label="post-hoc EMA")
        ax.plot([curve["samples_sigma_rel"]], [samples_scores[key]], "s", label=curve["samples_row"])
        for name, s in reals.items():
            ax.axhline(s[key], ls="--", lw=0.8, color="grey" if "floor" in name else "black", label=name)
        ax.set_xscale("log")
        ax.set_xlabel("sigma_rel (EMA length / training length)")
        ax.set_title(title)
    axes[0].legend(fontsize=7)
    fig.tight_layout()
    save_figure(fig, path)
    plt.close(fig)


def choose_ema(args):
    """`driver.py ema`: write the sampling weights of one EMA length (or of the curve's best, or none) into RUN/unet.pt."""
    run = Path(args.run)
    path = run / "unet.pt"
    remove_unfinished(run, path.name)  # an earlier `ema` killed as it saved (the run's lock is held)
    ckpt = load_checkpoint(path, "unet")
    if args.sigma_rel == "none":
        ckpt.pop("sampling_ema", None)
        atomic_save(ckpt, path)
        print(f"{path}: sampling uses the run's own EMA (decay {ckpt['args']['ema_decay']}, sigma_rel "
              f"{running_ema_sigma_rel(ckpt['args']['ema_decay'], ckpt['ema_updates']):.3f})")
        return
    chosen_by = {}
    if args.sigma_rel == "best":
        metrics = run / "metrics.json"
        try:
            evaluation = json.loads(metrics.read_text()) if metrics.exists() else {}
        except ValueError:  # JSON's or UTF-8's: a file cut short (by an evaluate from before 2026-12-07) or edited
            raise BadInputError(f"{metrics} cannot be read as JSON: run `driver.py evaluate --run {run} "
                                f"--ema-lengths auto` again") from None
        curve = evaluation.get("ema_lengths")
        if not curve:
            raise BadInputError(f"no EMA-length curve in {metrics}: run `driver.py evaluate --run {run} --ema-lengths "
                                f"auto` first, or give --sigma-rel a number")
        trained = fingerprint(ckpt["model"])
        measured_on = curve.get("unet_trained_fingerprint", trained)  # a curve from before it: checked by its step
        if curve["unet_step"] != ckpt["step"] or measured_on != trained:
            raise BadInputError(f"the curve in {metrics} was measured on another stage 2 (or at step "
                                f"{curve['unet_step']}; unet.pt is at step {ckpt['step']}): evaluate it again")
        sigma_rel = curve["best"]
        # the length is best for the samples that evaluation drew: its sampler, decoder and seed go with the choice
        chosen_by = {"chosen_by": {"metrics": str(metrics.resolve()), "features": evaluation.get("features"),
                                   "fid": next(r["scores"]["fid"] for r in curve["rows"]
                                               if r["sigma_rel"] == sigma_rel),
                                   "sampling": evaluation.get("sampling")}}
    else:
        sigma_rel = float(args.sigma_rel)
    weights, how = reconstruct(run, sigma_rel)
    if how["fit"] > GOOD_FIT:
        raise BadInputError(f"sigma_rel {sigma_rel:g} cannot be made from the {how['snapshots']} snapshots in {run} "
                            f"(the fit of its response is off by {how['fit']:.0%}; the weights would be another "
                            f"average, shrunk): a length nearer {PROFILES[0]:g}-{PROFILES[1]:g}, or snapshots kept "
                            f"more often (--posthoc-ema)")
    if how["step"] != ckpt["step"]:
        raise BadInputError(f"the last EMA snapshot in {run} is of step {how['step']}, unet.pt of step {ckpt['step']}; "
                            f"train-unet --resume sets them right (those beyond its step dropped, its own written)")
    ckpt["sampling_ema"] = {**how, **chosen_by, "weights": weights}
    atomic_save(ckpt, path)
    print(f"{path}: sampling uses the post-hoc EMA of sigma_rel {sigma_rel:g} at step {how['step']}, from "
          f"{how['snapshots']} snapshots (fit of its response: {how['fit']:.1e} relative error)")
    if chosen_by:
        by = chosen_by["chosen_by"]
        drawn = by["sampling"] or {}
        how_drawn = (f"drawn by {drawn['sampler']} in {drawn['steps']} steps" if drawn.get("sampler")
                     else f"from {drawn.get('from', 'a sampling it does not record')}")
        print(f"chosen by the lowest FID ({by['fid']:.3f}, {by['features']}) in {by['metrics']}, its samples "
              f"{how_drawn}: the best length for that sampling, not necessarily for another")


def add_arguments(p: argparse.ArgumentParser):
    p.add_argument("--run", required=True, help="a run trained with train-unet --posthoc-ema EVERY")
    p.add_argument("--sigma-rel", required=True, type=sigma_rel_arg,
                   help="the EMA length relative to the training so far (e.g. 0.08), `best` (the lowest FID of "
                        "`evaluate --ema-lengths`, from RUN/metrics.json) or `none` (the run's own EMA again)")
    p.set_defaults(func=choose_ema, stage=None)
