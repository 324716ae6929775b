"""`driver.py counterfactual --input held-out`: the counterfactuals of the run's held-out subjects, each image under its
own values, and where the change lands on average, against a null.

    python driver.py counterfactual --run R --input held-out --set group=NC             # every held-out image
    python driver.py counterfactual --run R --input held-out --set group=NC --num 100   # 100 changed, 100 null

One image's counterfactual shows one patient; what a condition changes is a question about many. Each image of the
subjects stage 1 held out (patients neither model trained on) is read as `evaluate` reads it, inverted by DDIM under
its own values (its class folder and the table columns the UNet is conditioned on, joined as stage 2 joined them; a
value not given stays open) and denoised under the same values with --set's changed, as `driver.py counterfactual
--from ... --set ...` changes one image. The images whose own values already equal --set's (the NC images, for --set
group=NC) go through the same steps as the null: what inversion and denoising change by themselves, which the change
of the others must exceed before it says anything of the condition. A covariate set to a value (age=85) has no null.
Subjects, not images, are the independent units: the summary gives the spread of the subjects' means.

Writes into OUT (default RUN/counterfactual_held-out):
    counterfactuals.csv   a row per image: its file (and slice of its volume), subject, class folder, its role
                          (changed, or null), its own values (own_age ...) and those it was denoised under (to_age
                          ...), its mean |change|
    changes.npy           (N, S, S) float16, counterfactual - reconstruction of each image (channels averaged), in the
                          CSV's order; the change to the reconstruction, so that the VQ-VAE's own error is not counted
    counterfactual.png    the mean input; the mean change of the changed images, signed and |.|; the null's mean
                          |change|; and what the changed images' exceeds the null's
    examples.png          8 changed images, spread over them, above their counterfactuals
    counterfactual.json   the run, its data and hold-out, the settings, and each group's counts and mean |change|,
                          written last
"""
from __future__ import annotations

import csv
import io
import json
import os
import statistics
from dataclasses import dataclass
from pathlib import Path

import matplotlib
matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np
import torch

import predict
from conditions.participants import saved_table
from conditions.table import CLASS, condition_matrix, subjects_of
from dataset import dataset_labels, load_slices
from export.figures import save_figure, save_png
from runtime.checkpoint import atomic_write
from runtime.errors import BadInputError
from runtime.models import LatentDiffusion
from runtime.process import progress
from volumes.run_data import stage1_data

HELD_OUT = "held-out"             # --input held-out
GROUPS = ("changed", "null")      # an image whose own values --set changes, and one that has them already


@dataclass
class HeldOut:
    """Held-out images (N, C, S, S) in [-1, 1], their own condition vectors (N, K), NaN where not given, and a row of
    where each comes from (file, slice, subject, class)."""
    images: torch.Tensor
    own: torch.Tensor
    rows: list[dict]
    data: dict          # the data folder and the hold-out they come from, for the record


def held_out_images(run: Path, model: LatentDiffusion) -> HeldOut:
    """The images of the subjects stage 1 held out, in the run's data folder (its files checked to be stage 1's), with
    the values the UNet's conditions take for each: the class folder, and the participants table stage 2 read (its
    contents checked to be the same)."""
    _, data = stage1_data(run)
    table = saved_table(model.labels, data.folder()) if model.labels else None
    if table is not None and table.sha1 != model.labels["sha1"]:
        raise BadInputError(f"the participants table {table.file} changed since this run was trained: the held-out "
                            f"images would be inverted under values the run did not join to them; restore it")
    dataset = load_slices(data.folder(), data.image_size, data.channels, skip_bad=data.skip_bad_images,
                          slicing=data.slicing, layout=data.layout)
    _, held = data.split(dataset.samples, dataset.classes)
    paths = [dataset.samples[i][0] for i in held]
    subjects = subjects_of(paths, data.subject())
    labels = dataset_labels(dataset)[held]
    own, _ = condition_matrix(model.conditions, table, subjects, labels, paths, str(data.folder()))
    slices = getattr(dataset, "slice_numbers", None)
    rows = [{"file": os.path.relpath(path, data.folder()), "slice": "" if slices is None else slices[i],
             "subject": subject, CLASS: dataset.classes[label]}
            for i, path, subject, label in zip(held, paths, subjects, labels.tolist())]
    images = torch.stack([dataset[i][0] for i in held])
    return HeldOut(images, own, rows, {"data": str(data.folder().resolve()), "holdout": data.holdout,
                                       "holdout_seed": data.holdout_seed})


def spread(indices: list[int], num: int | None) -> list[int]:
    """At most `num` of `indices`, evenly spread over them (over the subjects, in the listing's order); all without
    `num`."""
    if num is None or num >= len(indices):
        return indices
    return [indices[int(j)] for j in torch.linspace(0, len(indices) - 1, num).round().long()]


def groups(own: torch.Tensor, asked: torch.Tensor) -> torch.Tensor:
    """(N,) booleans: whether each image is of the null, its own values already those --set asks for (`asked`, (K,),
    NaN where none is asked); an image whose own value is not given is changed."""
    return ((own == asked) | asked.isnan()).all(dim=1)


@torch.no_grad()
def change_all(model: LatentDiffusion, images: torch.Tensor, source: torch.Tensor, target: torch.Tensor, change,
               device, autocast, batch_size: int = 64) -> tuple[torch.Tensor, torch.Tensor]:
    """(reconstructions, counterfactuals) of `images` on the CPU, in batches: `change(z0, source, target)` takes the
    scaled latents of a batch and its rows of the (N, K) condition vectors to the counterfactual latents."""
    recons, outs = [], []
    batches = list(zip(images.split(batch_size), source.split(batch_size), target.split(batch_size)))
    for x, s, t in progress(batches, desc="counterfactuals (batches)", dynamic_ncols=True):
        with autocast:
            z0 = model.vqvae.encode(x.to(device)).float() * model.latent_scale
            recons.append(predict.decode(model.vqvae, z0, model.latent_scale).cpu())
            outs.append(predict.decode(model.vqvae, change(z0, s.to(device), t.to(device)), model.latent_scale).cpu())
    return torch.cat(recons), torch.cat(outs)


def counterfactuals_of_held_out(args, run: Path, out: Path, model: LatentDiffusion, asked: torch.Tensor, change,
                                device, autocast, how: dict) -> dict:
    """The command with --input held-out (the module's docstring): pick, change, summarise, write. `asked`: (K,) the
    --set values, NaN elsewhere; `how`: the record's entries of how each image was changed."""
    held = held_out_images(run, model)
    null = groups(held.own, asked)
    picked = {group: spread([i for i in range(len(null)) if bool(null[i]) == (group == "null")], args.num)
              for group in GROUPS}
    if not picked["changed"]:
        raise BadInputError(f"every held-out image already has {', '.join(args.set_values)}: nothing to change")
    order = picked["changed"] + picked["null"]
    own = held.own[order]
    target = torch.where(asked.isnan(), own, asked)  # what --set does not change stays each image's own
    images = held.images[order]
    recon, changed = change_all(model, images, own, target, change, device, autocast)
    changes = (changed - recon).float().mean(1)  # (N, S, S), signed
    rows = [{**held.rows[i], "role": group} for group in GROUPS for i in picked[group]]
    for row, values, to, change_map in zip(rows, own, target, changes):  # own_age, to_age: no table column clashes
        row.update({f"own_{c.name}": c.decode(v) or "" for c, v in zip(model.conditions, values.tolist())})
        row.update({f"to_{c.name}": c.decode(w) or "" for c, w in zip(model.conditions, to.tolist())})
        row["mean_abs_change"] = f"{change_map.abs().mean().item():.6g}"

    summary = {group: group_summary([r for r in rows if r["role"] == group]) for group in GROUPS}
    out.mkdir(parents=True, exist_ok=True)
    (out / "counterfactual.json").unlink(missing_ok=True)  # written last: files beside none are of no finished command
    atomic_write(out / "counterfactuals.csv", lambda f: f.write(csv_text(rows).encode()))
    atomic_write(out / "changes.npy", lambda f: np.save(f, changes.half().numpy()))
    n_changed = len(picked["changed"])
    mean_maps_figure(images, changes, n_changed, f"{', '.join(args.set_values)}: {n_changed} held-out images changed, "
                     f"{len(order) - n_changed} of the null", out / "counterfactual.png")
    shown = spread(list(range(n_changed)), 8)  # of several subjects
    save_png(torch.cat([images[shown], changed[shown]]), out / "examples.png", nrow=len(shown), normalize=True,
             value_range=(-1, 1))
    record = {**how, "input": HELD_OUT, **held.data, "num": args.num, **summary}
    atomic_write(out / "counterfactual.json", lambda f: f.write(json.dumps(record, indent=2).encode()))
    print(summary_line(args.set_values, summary) + f"; wrote counterfactuals.csv, changes.npy, counterfactual.png, "
          f"examples.png and counterfactual.json to {out}")
    return record


def group_summary(rows: list[dict]) -> dict:
    """A group's images and subjects, its mean |change| over images, and the mean and spread of its subjects' means."""
    per_subject = {}
    for row in rows:
        per_subject.setdefault(row["subject"], []).append(float(row["mean_abs_change"]))
    means = [statistics.fmean(v) for v in per_subject.values()]
    return {"images": len(rows), "subjects": len(per_subject),
            "mean_abs_change": statistics.fmean(float(r["mean_abs_change"]) for r in rows) if rows else None,
            "subject_mean_abs_change": statistics.fmean(means) if means else None,
            "subject_sd_abs_change": statistics.stdev(means) if len(means) > 1 else None}


def summary_line(set_values: list[str], summary: dict) -> str:
    def part(s: dict) -> str:
        sd = f" ± {s['subject_sd_abs_change']:.4f}" if s["subject_sd_abs_change"] is not None else ""
        return (f"{s['images']} images of {s['subjects']} subjects, mean |change| {s['mean_abs_change']:.4f} (of the "
                f"range 2; subjects' means {s['subject_mean_abs_change']:.4f}{sd})")
    line = f"counterfactuals of the held-out subjects ({', '.join(set_values)}): changed {part(summary['changed'])}"
    if summary["null"]["images"]:
        return line + f"; the null, already {', '.join(set_values)}: {part(summary['null'])}"
    return line + "; no null (no held-out image has those values already)"


def csv_text(rows: list[dict]) -> str:
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, list(rows[0]), lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    return buffer.getvalue()


def mean_maps_figure(images: torch.Tensor, changes: torch.Tensor, n_changed: int, title: str, path: Path):
    """The changed images' mean input, their mean signed change and mean |change|, the null's mean |change| and the
    changed images' mean |change| less the null's, side by side (|change| maps on one scale)."""
    changed, null = changes[:n_changed], changes[n_changed:]
    panels = [("mean input (changed)", ((images[:n_changed].float().mean((0, 1)) + 1) / 2).numpy(), "gray", (0, 1))]
    signed = changed.mean(0).numpy()
    top = max(float(np.abs(signed).max()), 1e-8)
    panels.append(("mean change (signed)", signed, "RdBu_r", (-top, top)))
    magnitude = changed.abs().mean(0).numpy()
    null_magnitude = null.abs().mean(0).numpy() if len(null) else None
    top = max(float(magnitude.max()), float(null_magnitude.max()) if null_magnitude is not None else 0, 1e-8)
    panels.append(("mean |change|", magnitude, "hot", (0, top)))
    if null_magnitude is not None:
        excess = magnitude - null_magnitude
        bound = max(float(np.abs(excess).max()), 1e-8)
        panels += [("mean |change|, null", null_magnitude, "hot", (0, top)),
                   ("changed - null", excess, "RdBu_r", (-bound, bound))]
    fig, axes = plt.subplots(1, len(panels), figsize=(3.3 * len(panels), 3.6))
    for ax, (name, values, cmap, (low, high)) in zip(axes, panels):
        shown = ax.imshow(values, cmap=cmap, vmin=low, vmax=high)
        ax.set_title(name)
        ax.axis("off")
        if cmap != "gray":
            fig.colorbar(shown, ax=ax, fraction=0.046)
    fig.suptitle(title)
    fig.tight_layout()
    save_figure(fig, path)
    plt.close(fig)
