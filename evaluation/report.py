"""What `driver.py evaluate` writes and prints: the tables of its scores (FID, KID, SWD and MS-SSIM; SWD per
Laplacian level; per class), the crops at full resolution, and each optional part of report.md and metrics.json as a
`Section`. evaluate.py computes; this file words it.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from evaluation.conditions import format_condition_table
from evaluation.ema_lengths import format_ema_table
from evaluation.memorisation import each_sample_csv, format_memorisation_table
from evaluation.utility import UTILITY_SEEDS, format_condition_utility_table, format_utility_table
from export.figures import save_png
from runtime.checkpoint import atomic_write

# ----------------------------------------------------------------------------- the score tables

def format_table(scores: dict[str, dict]) -> str:
    """Markdown table of FID / KID / SWD / MS-SSIM; FID, KID and SWD of each model row with its ratio to the real rows."""
    bars = [name for name in ("real (training)", "real (floor)") if name in scores]
    lines = ["| images | n | FID | KID x1e3 | SWD x1e3 | MS-SSIM (pairs) |", "|---|---|---|---|---|---|"]

    def cell(name, key, text):
        # a real row's KID at or below 0 (its unbiased estimate scatters around 0) has no ratio: a dash holds its place
        ratios = [f"{scores[name][key] / scores[b][key]:.1f}x" if scores[b][key] > 0 else "–" for b in bars]
        return text if name in bars or not bars else f"{text} ({' / '.join(ratios)})"

    for name, s in scores.items():
        fid, swd = cell(name, "fid", f"{s['fid']:.3f}"), cell(name, "swd", f"{s['swd']:.1f}")
        kid = cell(name, "kid", f"{1e3 * s['kid']:.2f} ± {1e3 * s['kid_std']:.2f}")
        lines.append(f"| {name} | {s['count']} | {fid} | {kid} | {swd} | {s['ms_ssim']:.3f} |")
    if bars:
        lines.append(f"\nRatios: the row over {' / over '.join(bars)} (1.0x = as close to the reference as real images get).")
    return "\n".join(lines)


def swd_levels(scores: dict[str, dict]) -> list[int]:
    """The pyramid levels (px) the SWD of `scores` was measured at, finest first: the run's resolution down to 16."""
    return sorted((int(k[4:]) for k in next(iter(scores.values())) if k.startswith("swd_")), reverse=True)


def format_level_table(scores: dict[str, dict]) -> str:
    """Markdown table of SWD per Laplacian level: one row per image set, one column per level, finest band first.

    The finest band is where a blurry first stage shows (bench/README.md): read it against the real rows.
    """
    levels = swd_levels(scores)
    names = [f"{r} px" + (" (finest band)" if i == 0 else " (low-pass)" if r == levels[-1] else "")
             for i, r in enumerate(levels)]
    lines = ["| images | " + " | ".join(names) + " |", "|---" * (len(levels) + 1) + "|"]
    lines += [f"| {name} | " + " | ".join(f"{s[f'swd_{r}']:.1f}" for r in levels) + " |" for name, s in scores.items()]
    return "\n".join(lines)


def format_class_table(rows: list[dict]) -> str:
    """Markdown table of the per-class rows: the classifier's accuracy and the quality metrics."""
    lines = ["| class | images | n | recognised as the class | FID | KID x1e3 | SWD x1e3 | MS-SSIM (pairs) |",
             "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        metrics = (f"{r['fid']:.3f} | {1e3 * r['kid']:.2f} ± {1e3 * r['kid_std']:.2f} | {r['swd']:.1f} | {r['ms_ssim']:.3f}"
                   if "fid" in r else "| | |")
        lines.append(f"| {r['class']} | {r['images']} | {r['count']} | {r['recognised']:.1%} | {metrics} |")
    return "\n".join(lines)


# ----------------------------------------------------------------------------- crops at full resolution

CROP_SIZE = 96  # px: a third of a 256-px slice, enough to see sulci; the whole image below 96 px
CROPS_PER_ROW = 4


def central_crops(images: torch.Tensor, size: int) -> torch.Tensor:
    """The central size x size pixels of every image, not resampled: (N, C, size, size)."""
    top, left = (images.shape[-2] - size) // 2, (images.shape[-1] - size) // 2
    return images[..., top:top + size, left:left + size]


def save_crops(rows: list[torch.Tensor], size: int, path: Path) -> int:
    """The central crops of the first CROPS_PER_ROW images of each set, one set per row, at full resolution (1:1)."""
    n = min(CROPS_PER_ROW, *(len(images) for images in rows))
    save_png(torch.cat([central_crops(images[:n], size) for images in rows]), path, nrow=n, padding=2,
             normalize=True, value_range=(-1, 1))
    return n


# ----------------------------------------------------------------------------- the optional parts of a report

# the optional sections in the order report.md and the printout give them, and in the order metrics.json holds them
REPORT_ORDER = ("memorisation", "ema", "utility", "utility_conditions", "class", "conditions")
METRICS_ORDER = ("utility", "utility_conditions", "ema", "memorisation", "conditions", "class")


@dataclass
class Section:
    """An optional part of `evaluate`: what it adds to metrics.json, its section of report.md, what it prints."""
    metrics: dict
    report: list[str]
    printed: str


def memorisation_section(memorisation: dict, closest: torch.Tensor, each: list[dict], out: Path) -> Section:
    """Are the samples copies of training images? `memorisation_check`'s figures; its most correlated pairs into
    eval_memorisation.png, each sample's verdict into eval_memorisation.csv."""
    save_png(closest, out / "eval_memorisation.png", nrow=len(closest) // 2, normalize=True, value_range=(-1, 1))
    atomic_write(out / "eval_memorisation.csv", lambda f: f.write(each_sample_csv(each)))
    flagged = sum(row["flagged_features"] or row["flagged_pixels"] for row in each)
    table = format_memorisation_table(memorisation) + (
        f"\n\n{flagged} of {len(each)} samples flagged by either measure: eval_memorisation.csv names them (and the "
        "training images nearest to each: keep it to yourself), " + (
            f"now left out of the set ({memorisation['withheld']} withheld in all: its withheld.csv)."
            if "withheld" in memorisation else "the files to leave out of a set before it is shared "
                                               "(--withhold-flagged)."))
    return Section({"memorisation": memorisation}, [
        "", "## Memorisation", "", "Each image's nearest training image, in the features above (distance) and by pixel "
        "correlation. The held-out subjects were never seen: their images show how close a new brain comes. A sample "
        f"closer than the reference half A's percentile {memorisation['percentile']:g} is flagged; half B shows what "
        "that threshold flags among real new subjects.", "", table, "", f"The {len(closest) // 2} samples most "
        "correlated with a training image (top) and those training images (bottom):", "", "![](eval_memorisation.png)"],
        table)


def ema_section(curve: dict, samples_row: dict, run: Path) -> Section:
    """The samples of each post-hoc EMA length against the run's own EMA (`evaluate --ema-lengths`)."""
    table = format_ema_table(curve, samples_row)
    return Section({"ema_lengths": curve}, [
        "", "## EMA length", "", "The samples of the UNet's weights averaged over the training with power-function "
        "EMAs of each length sigma_rel (EDM2's post-hoc EMA, reconstructed from the run's snapshots; fit: the relative "
        "error of that reconstruction), drawn with the same sampler and seed as the samples row, against reference "
        f"half A. The run's own EMA is the first row. `driver.py ema --run {run} --sigma-rel best` samples from the "
        f"lowest FID, sigma_rel {curve['best']:g}.", "", table, "", "![](eval_ema_lengths.png)"], table)


def class_section(rows: list[dict], guidance: list[float]) -> Section:
    """Each class at each guidance scale against its own held-out subjects (`evaluate --class`)."""
    table = format_class_table(rows)
    return Section({"guidance": guidance, "per_class": rows}, [
        "", "## Per class", "", f"Samples of each class at guidance scales {guidance}, scored against the reference "
        "half of that class's held-out subjects. *Recognised*: how often the AD/NC classifier (trained on the training "
        "subjects) assigns the images to the class.", "", table, "", "Eight samples per class and scale, one row each, "
        "in the order of the table:", "", "![](eval_classes.png)"], table)


def utility_section(rows: list[dict], per_class: int, asked: int, sample_set: str | None = None,
                    withholding: bool = False) -> Section:
    """Train on synthetic, test on real (`evaluate --utility`; of the set `sample_set`: --samples, less what
    --withhold-flagged left out of it with `withholding`)."""
    table = format_utility_table(rows)
    return Section({"utility": rows, "utility_per_class": per_class, "utility_asked": asked,
                    **({"utility_of": sample_set} if sample_set else {})}, [
        "", "## Train on synthetic, test on real", "",
        f"The AD/NC classifier trained on {per_class} images per class of "
        "each set below (the same network and steps each time), tested on every held-out image: mean ± standard "
        f"deviation over {UTILITY_SEEDS} training seeds."
        + (f" The synthetic images are the set's own ({sample_set}), picked at random in each class"
           + (", less those it withheld." if withholding else ".") if sample_set else ""), "", table], table)


def condition_utility_section(rows: list[dict], count: int, sample_set: str | None = None,
                              held_out_values: bool = False) -> Section:
    """Train on synthetic, test on real for the participants table's conditions (`evaluate --utility` of a run
    conditioned on its columns, or of a `sample_set` of one; `held_out_values`: a set drawn at the held-out scans'
    values, on whose images it is then tested)."""
    table = format_condition_utility_table(rows)
    samples = (f"as many images of the set {sample_set} with a value, at the values its manifest gives them" if
               sample_set else "as many samples generated at those images' values (every condition the table gives)")
    return Section({"utility_conditions": rows, "utility_conditions_images": count}, [
        "", "## Train on synthetic, test on real: the table's conditions", "",
        f"The condition network trained on {count} real training images, on {samples}, and on both (the same network "
        "and steps each time), reads "
        "each condition back from every held-out image with a value of it (images: those of the set with a value of "
        "it; r: Pearson correlation with the table's value, MAE in the covariate's units; recognised: how often a "
        f"category is read right): mean ± standard deviation over {UTILITY_SEEDS} training seeds."
        + (" The set was drawn at the held-out subjects' own values (`sample --cohort-from held-out`), and is tested "
           "on those subjects' images: its rows know the spread of the labels they are tested on, which the real "
           "rows do not." if held_out_values else ""), "", table], table)


def condition_section(rows: list[dict], sweeps: list[str], guidance: list, sample_set: str | None = None) -> Section:
    """Each condition of the participants table read back from samples, or from a `sample_set`'s own images
    (evaluation/conditions.py)."""
    table = format_condition_table(rows)
    read_from = (f"from the images of the set {sample_set}, each against the values its manifest row gives (those "
                 f"the set keeps, where --withhold-flagged left some out)" if sample_set else
                 "from samples generated at those images' values, one condition given at a time, at each guidance "
                 "scale (w = 0 ignores it: the null)")
    return Section({"guidance": guidance, "per_condition": rows, "sweeps": sweeps,
                    **({"samples": sample_set} if sample_set else {})}, [
        "", "## Conditions", "", "A network trained on the real training images to read each condition reads it back "
        f"from real held-out images (the floor) and {read_from}. r: Pearson correlation with the value set, "
        "MAE: mean absolute error in the covariate's units; recognised: how often a category is read as the one set.",
        "", table, "", *[f"![]({name})" for name in sweeps]], table)
