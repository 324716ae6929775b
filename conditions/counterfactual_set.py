"""`driver.py counterfactual --input held-out`: the counterfactuals of the run's held-out subjects, each image under its
own values, with what the change of conditions does alone told apart from what inversion does by itself.

    python driver.py counterfactual --run R --input held-out --set group=NC             # every held-out AD image
    python driver.py counterfactual --run R --input held-out --shift age=10 --num 200   # 200 images, 10 years older

One image's counterfactual shows one patient; what a condition changes is a question about many. Each image of the
subjects stage 1 held out (patients neither model trained on) is read as `evaluate` reads it, inverted by DDIM under
its own values (its class folder and the table columns the UNet is conditioned on, joined as stage 2 joined them; a
value not given stays open) and denoised twice from that same latent: under its own values with --set's (or
--shift's) change, the counterfactual, and under its own values unchanged, its twin. Counterfactual - twin is what
the change of conditions does alone, the *effect*; twin - reconstruction is what inversion and denoising change by
themselves, the *drift*: the null, which the effect must stand out from before it says anything of the condition.
Images that have --set's values already (the NC images, for --set group=NC) have no effect by construction, and
those with no own value of what changes (n/a in the table, a category the run does not know) none to change from:
both are left out and counted. Subjects, not images, are the independent units: the summary compares the subjects'
means, and the voxel-wise test (--permutations sign flips) their mean maps.

Writes into OUT (default RUN/counterfactual_held-out):
    counterfactuals.csv   a row per image: its file (and slice of its volume), subject, class folder, its own values
                          (own_age ...) and those of its counterfactual (to_age ...), its mean |effect| and |drift|,
                          and what a network trained on the training subjects reads of each changed condition in the
                          counterfactual and its twin (read_age, twin_read_age ...: conditions/read_back.py)
    effects.npy           (N, S, S) float16, counterfactual - twin of each image (channels averaged), in the CSV's
                          order
    counterfactual.png    the mean input, the mean effect signed and |.|, and the mean |drift| on the |effect|'s scale
    examples.png          8 images, spread over them: inputs, twins and counterfactuals, a row each
    voxelwise.npz, .png   where the change has one direction across subjects: t and family-wise p of a sign-flip
                          test over the subjects' mean effects (conditions/effect_test.py; 6 subjects or more; --num
                          keeps whole slice positions of volumes, which it compares)
    counterfactual.json   the run, its data and hold-out, the settings, the counts, the effect and drift of the images
                          and of the subjects' means, the test's and the read-back's summaries, written last
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
from conditions import effect_test, read_back
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
ONE_FILES = ("counterfactual.png", "counterfactual_image.png", "difference.npy", "difference.nii.gz",  # of one image
             "effect.npy", "effect.nii.gz")
SET_FILES = ("counterfactuals.csv", "effects.npy", "counterfactual.png", "examples.png",  # of --input held-out
             *effect_test.FILES)


@dataclass
class HeldOut:
    """Held-out images (N, C, S, S) in [-1, 1], their own condition vectors (N, K), NaN where not given, and a row of
    where each comes from (file, slice, subject, class); and what a reader of the conditions trains on: the run's
    data set, its training images' indices, the conditions of every image (M, K), the table and the data config."""
    images: torch.Tensor
    own: torch.Tensor
    rows: list[dict]
    data: dict          # the data folder and the hold-out they come from, for the record
    dataset: object
    training: list[int]
    y: torch.Tensor
    table: object
    config: object


def held_out_images(run: Path, model: LatentDiffusion, root: str | None = None, labels: str | None = None) -> HeldOut:
    """The images of the subjects stage 1 held out, in the run's data folder (its files checked to be stage 1's; `root`,
    --data: where it is now), with the values the UNet's conditions take for each: the class folder, and the
    participants table stage 2 read (its contents checked to be the same; `labels`, --labels: where it is now)."""
    _, data = stage1_data(run, root)
    table = saved_table(model.labels, data.folder(), labels) if model.labels else None
    if table is not None and table.sha1 != model.labels["sha1"]:
        raise BadInputError(f"the participants table {table.file} changed since this run was trained: the held-out "
                            f"images would be inverted under values the run did not join to them; restore it")
    dataset = load_slices(data.folder(), data.image_size, data.channels, disk_cache=run,  # training's cache, if large
                          skip_bad=data.skip_bad_images, slicing=data.slicing, layout=data.layout)
    training, held = data.split(dataset.samples, dataset.classes)
    every = [path for path, _ in dataset.samples]
    owners, labels = subjects_of(every, data.subject()), dataset_labels(dataset)
    y, _ = condition_matrix(model.conditions, table, owners, labels, every, str(data.folder()))
    slices = getattr(dataset, "slice_numbers", None)
    rows = [{"file": os.path.relpath(every[i], data.folder()), "slice": "" if slices is None else slices[i],
             "subject": owners[i], CLASS: dataset.classes[int(labels[i])]} for i in held]
    images = torch.stack([dataset[i][0] for i in held])
    return HeldOut(images, y[held], rows, {"data": str(data.folder().resolve()), "holdout": data.holdout,
                                           "holdout_seed": data.holdout_seed}, dataset, training, y, table, data)


def spread(indices: list[int], num: int | None) -> list[int]:
    """At most `num` of `indices`, evenly spread over them (over the subjects, in the listing's order); all without
    `num`."""
    if num is None or num >= len(indices):
        return indices
    return [indices[int(j)] for j in torch.linspace(0, len(indices) - 1, num).round().long()]


def chosen(rows: list[dict], indices: list[int], num: int | None) -> list[int]:
    """At most `num` of the images `indices` (all without it): of 2D images, spread over them; of volumes, every image
    at slice positions that every subject has, evenly spaced over them, so that the voxel-wise test, which compares
    subjects position by position, keeps them (images spread over a volume run leave no position shared); where one
    position alone holds more than `num`, spread over that one."""
    if num is None or num >= len(indices):
        return indices
    by_subject: dict[str, set] = {}
    for i in indices:
        by_subject.setdefault(rows[i]["subject"], set()).add(rows[i]["slice"])
    shared = sorted(set.intersection(*by_subject.values()) - {""})
    if not shared:
        return spread(indices, num)
    at = {p: [i for i in indices if rows[i]["slice"] == p] for p in shared}
    for k in range(len(shared), 0, -1):  # the most positions whose images fit in num
        picked = [i for j in spread(list(range(len(shared))), k) for i in at[shared[j]]]
        if len(picked) <= num:
            return sorted(picked)
    return spread(at[shared[len(shared) // 2]], num)


def left_out(own: torch.Tensor, asked: torch.Tensor, shifts: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(N,) booleans twice, for images of own values `own` (N, K): whether each has the values --set asks for already
    (`asked`, (K,), NaN where none is asked) and --shift moves none (`shifts`, (K,)), so that it has no effect; and
    whether it has no own value of a condition that changes (n/a, a category the run does not know), whose change
    would be from an open value, not from its own."""
    changes = ~asked.isnan() | (shifts != 0)
    unchanged = ((own == asked) | asked.isnan()).all(dim=1) & ~(shifts != 0).any()
    return unchanged, (own.isnan() & changes).any(dim=1)


@torch.no_grad()
def change_all(model: LatentDiffusion, images: torch.Tensor, source: torch.Tensor, target: torch.Tensor, change,
               device, autocast, batch_size: int = 64) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(reconstructions, counterfactuals, twins) of `images` on the CPU, in batches: `change(z0, source, target)` takes
    the scaled latents of a batch and its rows of the (N, K) condition vectors to the counterfactual latents and their
    twins' (denoised under `source`)."""
    recons, outs, twins = [], [], []
    batches = list(zip(images.split(batch_size), source.split(batch_size), target.split(batch_size)))
    for x, s, t in progress(batches, desc="counterfactuals (batches)", dynamic_ncols=True):
        with autocast:
            z0 = model.vqvae.encode(x.to(device)).float() * model.latent_scale
            recons.append(predict.decode(model.vqvae, z0, model.latent_scale).cpu())
            z, z_twin = change(z0, s.to(device), t.to(device))
            outs.append(predict.decode(model.vqvae, z, model.latent_scale).cpu())
            twins.append(predict.decode(model.vqvae, z_twin, model.latent_scale).cpu())
    return torch.cat(recons), torch.cat(outs), torch.cat(twins)


def counterfactuals_of_held_out(args, run: Path, out: Path, model: LatentDiffusion, asked: torch.Tensor,
                                shifts: torch.Tensor, change, device, autocast, how: dict) -> dict:
    """The command with --input held-out (the module's docstring): pick, change, summarise, write. `asked`: (K,) the
    --set values, NaN elsewhere; `shifts`: (K,) the --shift changes, 0 elsewhere (`asked_shifts`); `change`: as
    `change_all` takes it; `how`: the record's entries of how each image was changed."""
    held = held_out_images(run, model, args.data, args.labels)
    unchanged, unknown = left_out(held.own, asked, shifts)
    order = chosen(held.rows, [i for i in range(len(held.own)) if not unchanged[i] and not unknown[i]], args.num)
    if not order:
        raise BadInputError(f"no held-out image to change: each has {asking(args)} already, or no own value of it")
    own = held.own[order]
    target = torch.where(asked.isnan(), own, asked) + shifts  # what --set does not change stays each image's own
    if ((target < -10) | (target > 11)).any():  # as --set refuses: the covariate's embedding only extrapolates there
        raise BadInputError(f"--shift {', '.join(args.shift_values)} takes images far outside the training range: "
                            f"nothing can be said of it")
    images = held.images[order]
    recon, changed, twins = change_all(model, images, own, target, change, device, autocast)
    effects, drifts = (changed - twins).float().mean(1), (twins - recon).float().mean(1)  # (N, S, S), signed
    rows = [dict(held.rows[i]) for i in order]
    for row, values, to, effect, drift in zip(rows, own, target, effects, drifts):  # own_age, to_age: no clash
        row.update({f"own_{c.name}": c.decode(v) or "" for c, v in zip(model.conditions, values.tolist())})
        row.update({f"to_{c.name}": c.decode(w) or "" for c, w in zip(model.conditions, to.tolist())})
        row.update(mean_abs_effect=f"{effect.abs().mean().item():.6g}",
                   mean_abs_drift=f"{drift.abs().mean().item():.6g}")
    read = (read_back.read_changes(run, model.conditions, held, own, target, images, changed, twins, rows,
                                   args.classifier_steps, device) if args.classifier_steps != 0 else None)

    counts = {"images": len(order), "subjects": len({r["subject"] for r in rows}),
              "left_out_with_those_values": int(unchanged.sum()), "left_out_without_own_value": int(unknown.sum()),
              "beyond_training_range": int((((target < 0) | (target > 1)) & (shifts != 0)).any(dim=1).sum())}
    volumes = any(row["slice"] != "" for row in rows)
    tested = effect_test.voxelwise(effects, images, rows, args.permutations, args.seed,
                                   held.config.slicing.crop_foreground if volumes else None)
    begin_writing(out, [name for name in SET_FILES if name not in effect_test.FILES or name in tested.files])
    atomic_write(out / "counterfactuals.csv", lambda f: f.write(csv_text(rows).encode()))
    atomic_write(out / "effects.npy", lambda f: np.save(f, effects.half().numpy()))
    mean_maps_figure(images, effects, drifts, f"{asking(args)}: {len(order)} held-out images",
                     out / "counterfactual.png")
    shown = spread(list(range(len(order))), 8)  # of several subjects
    save_png(torch.cat([images[shown], twins[shown], changed[shown]]), out / "examples.png", nrow=len(shown),
             normalize=True, value_range=(-1, 1))
    effect_test.write(tested, out)
    record = {**how, "input": HELD_OUT, **held.data, "num": args.num, **counts, **effect_summary(rows),
              "voxelwise": tested.record, "read_back": read}
    atomic_write(out / "counterfactual.json", lambda f: f.write(json.dumps(record, indent=2).encode()))
    told = read_back.summary(read) if read else "nothing read back (--classifier-steps 0)"
    print(summary_line(asking(args), record) + f"; {effect_test.summary(tested.record)}; {told}; wrote "
          f"counterfactuals.csv, effects.npy, counterfactual.png, examples.png"
          f"{''.join(', ' + f for f in tested.files)} and counterfactual.json to {out}")
    return record


def asking(args) -> str:
    """What a counterfactual changes, in words: 'group=NC, age+10' (--set, --shift)."""
    return ", ".join([*args.set_values, *(f"{n}{'' if d.startswith(('-', '+')) else '+'}{d}"
                                          for n, _, d in (v.partition("=") for v in args.shift_values))])


def begin_writing(out: Path, written: list[str] | tuple[str, ...]):
    """The output folder made, its counterfactual.json (written last) removed, and every file of either kind of
    counterfactual that this one will not write: files beside no record are of no finished command, and none of an
    earlier command stays beside the new record (a NIfTI input's map beside a PNG input's). The files it writes are
    replaced whole as they are written, so that a full disk leaves the earlier ones as they were."""
    out.mkdir(parents=True, exist_ok=True)
    for name in ("counterfactual.json", *sorted(set(ONE_FILES + SET_FILES) - set(written))):
        (out / name).unlink(missing_ok=True)


def effect_summary(rows: list[dict]) -> dict:
    """The mean |effect| and |drift| over the images, and over the subjects' means (mean, sd), and how many subjects'
    mean |effect| exceeds their mean |drift|."""
    per_subject = {}
    for row in rows:
        per_subject.setdefault(row["subject"], []).append((float(row["mean_abs_effect"]), float(row["mean_abs_drift"])))
    means = [[statistics.fmean(v) for v in zip(*pairs)] for pairs in per_subject.values()]
    summary = {}
    for k, name in enumerate(("effect", "drift")):
        subjects = [m[k] for m in means]
        summary[f"mean_abs_{name}"] = statistics.fmean(float(r[f"mean_abs_{name}"]) for r in rows)
        summary[f"subjects_mean_abs_{name}"] = statistics.fmean(subjects)
        summary[f"subjects_sd_abs_{name}"] = statistics.stdev(subjects) if len(subjects) > 1 else None
    summary["subjects_effect_above_drift"] = sum(effect > drift for effect, drift in means)
    return summary


def summary_line(asking: str, record: dict) -> str:
    def part(name: str) -> str:
        sd = record[f"subjects_sd_abs_{name}"]
        means = record[f"subjects_mean_abs_{name}"]
        return (f"mean |{name}| {record[f'mean_abs_{name}']:.4f} (subjects' means {means:.4f}"
                f"{f' ± {sd:.4f}' if sd is not None else ''})")
    line = (f"counterfactuals of the held-out subjects ({asking}): {record['images']} images of {record['subjects']} "
            f"subjects, {part('effect')} against their twins' {part('drift')} (of the range 2): the effect exceeds the "
            f"drift in {record['subjects_effect_above_drift']} of {record['subjects']} subjects")
    if record["beyond_training_range"]:
        line += f"; {record['beyond_training_range']} shifted beyond the training range"
    if record["left_out_with_those_values"]:
        line += f"; {record['left_out_with_those_values']} left out, with those values already"
    if record["left_out_without_own_value"]:
        line += f"; {record['left_out_without_own_value']} left out, with no own value of what changes"
    return line


def csv_text(rows: list[dict]) -> str:
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, list(rows[0]), lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    return buffer.getvalue()


def mean_maps_figure(images: torch.Tensor, effects: torch.Tensor, drifts: torch.Tensor, title: str, path: Path):
    """The mean input, the mean effect signed and |.|, and the mean |drift|, side by side (|.| maps on one scale)."""
    signed, magnitude, drift = effects.mean(0).numpy(), effects.abs().mean(0).numpy(), drifts.abs().mean(0).numpy()
    bound, top = max(float(np.abs(signed).max()), 1e-8), max(float(magnitude.max()), float(drift.max()), 1e-8)
    panels = [("mean input", ((images.float().mean((0, 1)) + 1) / 2).numpy(), "gray", (0, 1)),
              ("mean effect (signed)", signed, "RdBu_r", (-bound, bound)),
              ("mean |effect|", magnitude, "hot", (0, top)),
              ("mean |drift| (the null)", drift, "hot", (0, top))]
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
