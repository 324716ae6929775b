"""The card of a sample set, SET/samples/dataset_card.md: what a reader of a shared synthetic set needs to know of it.

`sample` writes it when a set is whole (a `--resume` that finishes one too), and `evaluate --samples SET
--withhold-flagged` writes it again with what that checked (`record_checks`, into the set's checks.json): the screen
for copies of training patients, whether its images show the table's values they were drawn at (age, sex: read back
as real held-out images are) and, with `--utility`, what a classifier trained on the set knows of real held-out
subjects. In the spirit of datasheets for datasets (Gebru et al. 2021): what the images are, how each was made, what
was left out and why, what they were checked for. It is made from the set's own files (sampling.json, manifest.csv,
withheld.csv, checks.json), and names no training image or subject.

    python driver.py sample --run RUN --class all --num 1000 --out SET      # SET/samples/dataset_card.md
    python driver.py evaluate --run RUN --samples SET --withhold-flagged --utility 500 --out CHECKED   # again
"""
from __future__ import annotations

import datetime
import json
from collections import Counter
from pathlib import Path

from export.sample_set import CARD, CHECKS, MANIFEST, SETTINGS, TABLE, WITHHELD, manifest_rows, withheld_rows
from runtime.checkpoint import atomic_write, json_text

SHOWN_VALUES = 6           # a condition of this many values or fewer is listed value by value, with their counts


def write_card(folder: Path):
    """The card of the set in `folder` (its samples/), written whole, from the set's files as they are now."""
    settings = json.loads((folder / SETTINGS).read_text())
    rows, withheld = manifest_rows(folder), withheld_rows(folder)
    checks = json.loads((folder / CHECKS).read_text()) if (folder / CHECKS).is_file() else {}
    lines = [*_what(settings, rows, withheld), *_how(settings, rows), *_screen(checks.get("screen"), withheld),
             *_read_back(checks.get("conditions")), *_usefulness(checks.get("utility")), *_files(folder)]
    text = "\n".join(lines) + "\n"
    atomic_write(folder / CARD, lambda f: f.write(text.encode()))


def record_checks(folder: Path, memorisation: dict, utility: dict | None, run: Path, conditions: dict | None = None):
    """`evaluate --samples SET --withhold-flagged`: what it checked into the set's checks.json, then the card.
    memorisation: `memorisation_check`'s summary, with "withheld"; utility: {per_class, seeds, rows, classes, table
    (markdown)} of `evaluate --utility` on the set, or None (not yet, or not asked); conditions: {rows, table} of the
    table's conditions read back from the set's images (evaluation/conditions.py), or None (the run has none)."""
    floor = memorisation["rows"]["real (held out, B)"]
    repeats = sum(r["flagged"] for r in floor.get("flagged_subjects", [])  # the signature of a patient scanned again
                  if 2 * r["flagged"] > r["images"] and 2 * r["nearest_count"] > r["images"])
    screen = {"date": datetime.date.today().isoformat(), "checked_against": str(run.resolve()),
              "percentile": memorisation["percentile"], "thresholds": memorisation["thresholds"],
              "screened": memorisation["rows"]["samples"]["count"], "withheld": memorisation["withheld"],
              "held_out_flagged": {"features": floor["flagged_features"], "pixels": floor["flagged_pixels"],
                                   "images": floor["count"], "likely_repeat_scans": repeats}}
    checks = {"screen": screen, **({"utility": utility} if utility else {}),
              **({"conditions": conditions} if conditions else {})}
    text = json_text(checks)
    atomic_write(folder / CHECKS, lambda f: f.write(text.encode()))
    write_card(folder)


def _what(settings: dict, rows: list[dict], withheld: list[dict]) -> list[str]:
    classes = Counter(row["file"].split("/")[0] for row in rows)
    folders = ", ".join(f"{count:,} in {name}/" for name, count in sorted(classes.items()))
    left_out = f"left out as possible copies of training patients ({WITHHELD})"
    if not rows:
        return ["# Synthetic brain MRI slices", "", f"No slice is left in this set: all {len(withheld):,} drawn were "
                f"{left_out}."]
    return ["# Synthetic brain MRI slices", "",
            f"{len(rows):,} synthetic 2D slices ({settings['format']} files; {folders}), drawn by a latent diffusion "
            f"model: none of them is a scan of a person."
            + (f" {len(withheld):,} more {_were(len(withheld))} drawn and {left_out}." if withheld else "")]


def _how(settings: dict, rows: list[dict]) -> list[str]:
    ema = settings.get("posthoc_ema_sigma_rel")
    sampler = f"{settings['sampler']}, {settings['steps']} steps" + (
        f", eta {settings['eta']}" if settings.get("eta") is not None else "") + (
        f"; the last {settings['repeat_last']} steps repeated {settings['repeat_times']} times"
        if settings.get("repeat_times") else "") + (
        f"; x0 clipped to ±{settings['clip_x0']:.3g}" if settings.get("clip_x0") is not None else "")
    decoder = (f"the decoder fine-tuned alone ({settings['decoder_fingerprint']}) of the VQ-VAE "
               if settings.get("decoder_fingerprint") else "the VQ-VAE ") + settings["vqvae_fingerprint"] + (
        ", from latents not rounded to the codebook" if settings.get("decode") == "unquantised" else "")
    guidance = f"{settings['guidance']:g}" if settings.get("guidance") is not None else "none"
    if settings.get("autoguidance"):
        guidance += (f"; autoguidance {settings['autoguidance']:g} by the UNet at step {settings.get('guide_step')}"
                     + (f" (post-hoc EMA {settings['guide_sigma_rel']})" if settings.get("guide_sigma_rel") else ""))
    if settings.get("guide_interval"):
        guidance += f", at the steps {settings['guide_interval'][0]} to {settings['guide_interval'][1]}"
    cohort = [row[1] for row in settings.get("rows", []) if isinstance(row[1], dict) and "drawn" in row[1]]
    table = [("model", f"the UNet at step {settings['unet_step']:,} (weights' fingerprint "
                       f"{settings['unet_fingerprint']}" + (f", post-hoc EMA sigma_rel {ema}" if ema else "")
                       + f"), decoded by {decoder}"),
             ("sampler", sampler), ("guidance", guidance),
             ("seed", f"{settings['seed']} (batch b from {settings.get('batch_seeds', 'seed + b')})"),
             *((("conditions", _drawn_from(cohort[0])),) if cohort else ()),
             *_conditions(rows)]
    return ["", "## How they were drawn", "", "| | |", "|---|---|", *(f"| {k} | {v} |" for k, v in table), "",
            f"Each file's own settings and seed are in {MANIFEST}, the set's in {SETTINGS}: `sample` with them and "
            f"the same run draws each sample again."]


def _drawn_from(cohort: dict) -> str:
    """How a --cohort set's conditions were drawn, from its row's record in sampling.json."""
    part, bins = cohort.get("from", "training"), cohort.get("bins", {})
    command = " ".join(["sample --cohort", *([f"--cohort-from {part}"] if "from" in cohort else []),
                        *(f"--cohort-bins {name}={width:g}" for name, width in bins.items())])
    return (f"each sample at the values of a {part} scan picked at random, uniformly over "
            f"{cohort.get('unit', 'scan')}s (`{command}`): the cohort's own values"
            + "".join(f", {name} moved to the middle of its bin of {width:g}" for name, width in bins.items()))


def _conditions(rows: list[dict]) -> list[tuple[str, str]]:
    """Each condition the samples were drawn at (the manifest's columns between `row` and `seed`): the counts of its
    values where it has few (a category, or a covariate swept), else its range and mean; and how many samples were
    drawn without it."""
    if not rows:
        return []
    columns = list(rows[0])
    out = []
    for name in columns[columns.index("row") + 1:columns.index("seed")]:
        values = [row[name] for row in rows if row[name] not in ("", None)]
        unset = f"; left open for {len(rows) - len(values):,}" if len(values) < len(rows) else ""
        numeric = all(_number(v) for v in values)
        counts = (sorted(Counter(values).items(), key=lambda kv: float(kv[0])) if numeric  # in order of value
                  else Counter(values).most_common())
        if not values:
            out.append((name, "left open (drawn without it)"))
        elif len(counts) <= SHOWN_VALUES or not numeric:
            shown = ", ".join(f"{value} {count:,}" for value, count in counts[:SHOWN_VALUES])
            out.append((name, shown + (f" and {len(counts) - SHOWN_VALUES} more values" if len(counts) > SHOWN_VALUES
                                       else "") + unset))
        else:
            numbers = [float(v) for v in values]
            out.append((name, f"{min(numbers):g} to {max(numbers):g}, mean {sum(numbers) / len(numbers):.3g}" + unset))
    return out


def _number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


def _were(count: int) -> str:
    return "was" if count == 1 else "were"


def _screen(screen: dict | None, withheld: list[dict]) -> list[str]:
    if not screen and withheld:  # screened before the set kept a record of how (checks.json, 2026-12-07)
        return ["", "## Screened for copies of training patients", "",
                f"{len(withheld):,} {'sample was' if len(withheld) == 1 else 'samples were'} left out as possible "
                f"copies of training patients ({WITHHELD} says what flagged each, and against which run); the "
                f"screen's thresholds were not kept with the set: `evaluate --samples DIR --withhold-flagged` again "
                f"writes them here."]
    if not screen:
        return ["", "## Not screened for copies of training patients", "",
                "Before it is shared: `python driver.py evaluate --run RUN --samples DIR --withhold-flagged` (a run "
                "trained with `--holdout`, whose held-out subjects are the yardstick) leaves out every sample closer "
                "to a training image than new subjects come, and writes what it found here."]
    held, t = screen["held_out_flagged"], screen["thresholds"]
    repeats = held.get("likely_repeat_scans", 0)
    return ["", "## Screened for copies of training patients", "",
            f"On {screen['date']}, `evaluate --withhold-flagged` compared each of {screen['screened']:,} samples with "
            f"every training image of the run it was checked against ({CHECKS}). A sample closer to one than "
            f"{100 - screen['percentile']:g}% of real held-out subjects' images come (pixel correlation above "
            f"{t['correlation']:.4f}, or distance in the evaluation network's features below {t['distance']:.3g}) was "
            f"left out: " + (f"{screen['withheld']:,} withheld in all ({WITHHELD} says what flagged each)."
                             if screen["withheld"] else "none was flagged.")
            + f" The same threshold flags {held['pixels']:.1%} (pixels) and {held['features']:.1%} (features) of "
            f"{held['images']:,} real held-out images, subjects the run never trained on: the screen's cost, and what "
            f"it can promise."
            + (f" {repeats:,} of those flagged images {'is' if repeats == 1 else 'are'} of held-out subjects flagged "
               f"on most of their images, each nearest one training subject: likely training patients scanned again "
               f"under another ID, a split that leaks." if repeats else "")
            + " A near-copy the screen does not measure (another slice of a training brain, one moved or flipped) "
            "may pass it."]


def _usefulness(utility: dict | None) -> list[str]:
    if not utility:
        return ["", "## Usefulness not measured", "",
                "`evaluate --samples DIR --withhold-flagged --utility N` (a set in class folders: `sample --class "
                "all`) trains a classifier on the set, tests it on real held-out subjects, and writes the result here."]
    lines = ["", "## Train on this set, test on real subjects"]
    if "table" in utility:  # the classifier of the class folders
        lines += ["", f"The {'/'.join(utility.get('classes', ['AD', 'NC']))} classifier trained on "
                      f"{utility['per_class']:,} images per class of each set below (the set's own, picked at random "
                      f"in each class), tested on every real held-out image, subjects the run never trained on: mean ± "
                      f"standard deviation over {utility['seeds']} training seeds.", "", utility["table"]]
    if "conditions_table" in utility:  # the network of the table's conditions
        lines += ["", "A network that reads the table's conditions (age, sex ...) trained on real training images, on "
                      "as many of this set's images at their own values, and on both, read back from the real held-out "
                      "images with a value (mean ± standard deviation over training seeds).", "",
                  utility["conditions_table"]]
    return lines


def _read_back(conditions: dict | None) -> list[str]:
    if not conditions:
        return []
    return ["", "## Do the images show the values they were drawn at?", "",
            "A network trained on the real training images to read each condition of the table (age, sex ...) reads "
            "it from real held-out images and from this set's images, each against its own value (manifest.csv). "
            "r: Pearson correlation, MAE: mean absolute error in the condition's units, recognised: how often a "
            "category is read as the one given. The set's row near the real one: its images show their values as "
            "real scans do. Far above it: the reader, which learned the training subjects, knows these images, and "
            "they may be those subjects' own (read it with the screen above).", "", conditions["table"]]


def _files(folder: Path) -> list[str]:
    there = [(name, what) for name, what in (
        (MANIFEST, "one row per sample: its file, conditions, seed and every sampling setting"),
        (TABLE, "participant_id and the table conditions of each sample, for `train-unet --condition`"),
        (SETTINGS, "the settings of the whole set"),
        (WITHHELD, "the rows of the samples left out, and what flagged each, against which run (each one's "
                   "conditions: for a `--cohort` set a real scan's; leave it out of a shared copy if they should "
                   "not travel)"),
        (CHECKS, "what `evaluate --withhold-flagged` checked, as this card shows it")) if (folder / name).is_file()]
    return ["", "## Files", "", *(f"- `{name}`: {what}" for name, what in there),
            "- `<class>/sub-NNNNNN.<format>`: the samples, one subject each (`--data` reads the folder as a dataset)"]
