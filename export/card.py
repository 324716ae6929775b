"""The card of a sample set, SET/samples/dataset_card.md: what a reader of a shared synthetic set needs to know of it.

`sample` writes it when a set is whole (a `--resume` that finishes one too), and `evaluate --samples SET
--withhold-flagged` writes it again with what that checked (`record_checks`, into the set's checks.json): the screen
for copies of training patients and, with `--utility`, what a classifier trained on the set knows of real held-out
subjects. In the spirit of datasheets for datasets (Gebru et al. 2021): what the images are, how each was made, what
was left out and why, what they were checked for. It is made from the set's own files (sampling.json, manifest.csv,
withheld.csv, checks.json), and names no training image or subject.
"""
from __future__ import annotations

import datetime
import json
from collections import Counter
from pathlib import Path

from export.sample_set import CARD, CHECKS, MANIFEST, SETTINGS, TABLE, WITHHELD, manifest_rows, withheld_rows
from runtime.checkpoint import atomic_write

SHOWN_VALUES = 6           # a category's values listed on the card; more are counted


def write_card(folder: Path):
    """The card of the set in `folder` (its samples/), written whole, from the set's files as they are now."""
    settings = json.loads((folder / SETTINGS).read_text())
    rows, withheld = manifest_rows(folder), withheld_rows(folder)
    checks = json.loads((folder / CHECKS).read_text()) if (folder / CHECKS).is_file() else {}
    lines = [*_what(settings, rows, withheld), *_how(settings, rows), *_screen(checks.get("screen"), withheld),
             *_usefulness(checks.get("utility")), *_files(folder)]
    text = "\n".join(lines) + "\n"
    atomic_write(folder / CARD, lambda f: f.write(text.encode()))


def record_checks(folder: Path, memorisation: dict, utility: dict | None, run: Path):
    """`evaluate --samples SET --withhold-flagged`: what it checked into the set's checks.json, then the card.
    memorisation: `memorisation_check`'s summary, with "withheld"; utility: {per_class, seeds, rows, table (markdown)}
    of `evaluate --utility` on the set, or None."""
    floor = memorisation["rows"]["real (held out, B)"]
    screen = {"date": datetime.date.today().isoformat(), "checked_against": str(run.resolve()),
              "percentile": memorisation["percentile"], "thresholds": memorisation["thresholds"],
              "screened": memorisation["rows"]["samples"]["count"], "withheld": memorisation["withheld"],
              "held_out_flagged": {"features": floor["flagged_features"], "pixels": floor["flagged_pixels"],
                                   "images": floor["count"]}}
    checks = {"screen": screen, **({"utility": utility} if utility else {})}
    text = json.dumps(checks, indent=2) + "\n"
    atomic_write(folder / CHECKS, lambda f: f.write(text.encode()))
    write_card(folder)


def _what(settings: dict, rows: list[dict], withheld: list[dict]) -> list[str]:
    classes = Counter(row["file"].split("/")[0] for row in rows)
    folders = ", ".join(f"{count:,} in {name}/" for name, count in sorted(classes.items()))
    return ["# Synthetic brain MRI slices", "",
            f"{len(rows):,} synthetic 2D slices ({settings['format']} files; {folders}), drawn by a latent diffusion model: "
            f"none of them is a scan of a person."
            + (f" {len(withheld):,} more were drawn and left out as possible copies of training patients ({WITHHELD})."
               if withheld else "")]


def _how(settings: dict, rows: list[dict]) -> list[str]:
    ema = settings.get("posthoc_ema_sigma_rel")
    sampler = f"{settings['sampler']}, {settings['steps']} steps" + (
        f", eta {settings['eta']}" if settings.get("eta") is not None else "") + (
        f"; the last {settings['repeat_last']} steps repeated {settings['repeat_times']} times"
        if settings.get("repeat_times") else "")
    table = [("model", f"the UNet at step {settings['unet_step']:,} (weights' fingerprint {settings['unet_fingerprint']}"
                       + (f", post-hoc EMA sigma_rel {ema}" if ema else "") + f"), decoded by the VQ-VAE "
                       f"{settings['vqvae_fingerprint']}"),
             ("sampler", sampler),
             ("guidance", f"{settings['guidance']:g}" if settings.get("guidance") is not None else "none"),
             ("seed", f"{settings['seed']} (batch b from {settings.get('batch_seeds', 'seed + b')})"),
             *((name, values) for name, values in _conditions(rows))]
    return ["", "## How they were drawn", "", "| | |", "|---|---|", *(f"| {k} | {v} |" for k, v in table), "",
            f"Each file's own settings and seed are in {MANIFEST}, the set's in {SETTINGS}: `sample` with them and "
            f"the same run draws each sample again."]


def _conditions(rows: list[dict]) -> list[tuple[str, str]]:
    """Each condition the samples were drawn at (the manifest's columns between `row` and `seed`): a category's
    counts, a covariate's range and mean, and how many samples were drawn without it."""
    if not rows:
        return []
    columns = list(rows[0])
    out = []
    for name in columns[columns.index("row") + 1:columns.index("seed")]:
        values = [row[name] for row in rows if row[name] not in ("", None)]
        unset = f"; left open for {len(rows) - len(values):,}" if len(values) < len(rows) else ""
        try:
            numbers = [float(v) for v in values]
        except ValueError:
            counts = Counter(values).most_common()
            shown = ", ".join(f"{value} {count:,}" for value, count in counts[:SHOWN_VALUES])
            out.append((name, shown + (f" and {len(counts) - SHOWN_VALUES} more values" if len(counts) > SHOWN_VALUES
                                       else "") + unset))
            continue
        out.append((name, (f"{min(numbers):g} to {max(numbers):g}, mean {sum(numbers) / len(numbers):.3g}"
                           if numbers else "left open (drawn without it)") + (unset if numbers else "")))
    return out


def _screen(screen: dict | None, withheld: list[dict]) -> list[str]:
    if not screen and withheld:  # screened before the set kept a record of how (checks.json, 2026-12-07)
        return ["", "## Screened for copies of training patients", "",
                f"{len(withheld):,} samples were left out as possible copies of training patients ({WITHHELD} says "
                f"what flagged each, and against which run); the screen's thresholds were not kept with the set: "
                f"`evaluate --samples DIR --withhold-flagged` again writes them here."]
    if not screen:
        return ["", "## Not screened for copies of training patients", "",
                "Before it is shared: `python driver.py evaluate --run RUN --samples DIR --withhold-flagged` leaves out "
                "every sample closer to a training image than new subjects come, and writes what it found here."]
    held, t = screen["held_out_flagged"], screen["thresholds"]
    return ["", "## Screened for copies of training patients", "",
            f"On {screen['date']}, `evaluate --withhold-flagged` compared each of {screen['screened']:,} samples with "
            f"every training image of the run that drew them. A sample closer to one than {100 - screen['percentile']:g}"
            f"% of real held-out subjects' images come (pixel correlation above {t['correlation']:.4f}, or "
            f"distance in the evaluation network's features below {t['distance']:.3g}) was left out: "
            f"{screen['withheld']:,} withheld in all ({WITHHELD} says what flagged each). The same threshold flags "
            f"{held['pixels']:.1%} (pixels) and {held['features']:.1%} (features) of {held['images']:,} real held-out "
            f"images, of people the run never saw: the screen's cost, and what it can promise. A near-copy drawn "
            f"differently (another slice of a training brain, a shifted one) may pass it."]


def _usefulness(utility: dict | None) -> list[str]:
    if not utility:
        return ["", "## Usefulness not measured", "",
                "`evaluate --samples DIR --withhold-flagged --utility N` trains a classifier on the set and tests it "
                "on real held-out subjects, and writes the result here."]
    return ["", "## Train on this set, test on real subjects", "",
            f"The AD/NC classifier trained on {utility['per_class']:,} images per class of each set below (the set's "
            f"own, picked at random in each class), tested on every real held-out image, subjects the run never "
            f"saw: mean ± standard deviation over {utility['seeds']} training seeds.", "", utility["table"]]


def _files(folder: Path) -> list[str]:
    there = [(name, what) for name, what in (
        (MANIFEST, "one row per sample: its file, conditions, seed and every sampling setting"),
        (TABLE, "participant_id and the table conditions of each sample, for `train-unet --condition`"),
        (SETTINGS, "the settings of the whole set"),
        (WITHHELD, "the rows of the samples left out, and what flagged each (against which run)"),
        (CHECKS, "what `evaluate --withhold-flagged` checked, as this card shows it")) if (folder / name).is_file()]
    return ["", "## Files", "", *(f"- `{name}`: {what}" for name, what in there),
            "- `<class>/sub-NNNNNN.<format>`: the samples, one subject each (`--data` reads the folder as a dataset)"]
