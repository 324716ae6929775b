"""`sample --cohort`: a synthetic set whose conditions follow the training cohort's, each sample drawn under the
conditions of a training scan picked at random (`--cohort-from held-out`: of a held-out scan).

A conditional run's `--set` and `--sweep` ask for chosen values; a synthetic dataset that stands in for the real one
needs its class, age, sex ... together, in the proportions and combinations the training scans have (the AD
subjects older than the NC ones, say). The cohort is the training images' distinct scans (subject and session, or
subject where the table has no sessions), each with its condition vector as stage 2 trained on it: the run's data
checked to be stage 1's files (`stage1_data`) and its participants table read again, its contents checked. A scan
with no value at all is left out (a sample drawn at it would be unconditional), and so is one whose values lie
outside those the UNet trained on (a file `--skip-bad-images` left out of training). `draw` picks scans with
replacement, uniformly over scans or over subjects (then a scan of the subject), from `--seed`. Nothing of it is
kept in `unet.pt`, which is shared more often than a run's data: the run's data folder and table must be at hand, as
for `evaluate`.

The held-out scans (`--cohort-from held-out`) are those of the subjects stage 1 held out, read the same way: patients
the UNet never saw. Left out of them, besides: a scan whose covariate lies beyond the training scans' range (values
the UNet did not train on), one with a category training never had (sex `U`; drawn open, it would be labelled
blank), and one whose given values (binned, where asked) are a training scan's exact ones, a covariate among them
(`at_training_values`), so that no sample is drawn at a training patient's own values, where a model that learned
that patient's exact age, sex and group can give back the patient's slices.

`--cohort-bins age=5` moves each scan's age to the middle of its 5-year bin ([70, 75) -> 72.5) before any is drawn:
the set's labels (manifest, participants.tsv) then carry no patient's exact age, and its line counts the scans whose
values are still one subject's alone, and those whose middle lies outside the training range (up to half a bin, where
the UNet extrapolates; a bin wider than the range is refused). The images are drawn at those middles; whether they
are copies is the screen's question (`evaluate --withhold-flagged`), which binning does not answer.
"""
from __future__ import annotations

import hashlib
from collections import Counter
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch

from conditions.participants import saved_table
from conditions.table import CLASS, Condition, as_number, condition_matrix, subjects_of
from runtime.errors import BadInputError
from volumes.run_data import split_files, stage1_data

UNITS = ("scan", "subject")   # what --cohort draws uniformly
PARTS = ("training", "held-out")   # whose scans --cohort-from draws: volumes/run_data.split_files' keys
# why usable() leaves a scan out, in the order its line names them
EMPTY, OUTSIDE, SHARED = ("with no value", "with values the UNet did not train on",
                          "at a training scan's own values, a covariate among them")


@dataclass
class Cohort:
    """The training (or held-out) scans: their condition vectors y (M, K), NaN where not given, and the subject of
    each."""
    y: torch.Tensor
    subjects: list[str]
    part: str = "training"


def run_cohort(run: Path, conditions: list[Condition], record: dict | None, root: str | None = None,
               labels: str | None = None, part: str = "training",
               bins: dict[str, float] | None = None) -> tuple[Cohort, str]:
    """The training scans of `run` (part "held-out": its held-out subjects' scans, less those at a training scan's
    own values, `at_training_values`) for `conditions` as its UNet saved them, from the table of its record (None: the
    class folders); `root` (--data) and `labels` (--labels): where the data and table are now, if they moved; `bins`:
    covariates binned ({name: width}, `binned`). With a line saying what it holds and what it left out."""
    _, data = stage1_data(run, root)
    if part == "held-out" and data.holdout <= 0:
        raise BadInputError("--cohort-from held-out draws the values of the subjects stage 1 held out, and this run "
                            "held out none (train-vqvae --holdout 0)")
    table = saved_table(record, data.folder(), labels) if record else None
    if table is not None and table.sha1 != record["sha1"]:
        files = f" (or its sessions files: {', '.join(table.session_files)})" if table.session_files else ""
        raise BadInputError(f"the participants table {table.file}{files} changed since this run was trained: "
                            f"--cohort would draw values it did not train on; restore it")
    split, _ = split_files(data, expand_volumes=False)
    scans, unseen = scans_of(split[part], conditions, table, data)
    training = None
    if part == "held-out":  # the values the UNet saw, exact
        training = torch.stack([row for _, row in scans_of(split["training"], conditions, table, data)[0]])
    return usable(scans, conditions, part, bins, training, unseen)


def scans_of(samples: list[tuple[str, int]], conditions: list[Condition], table, data) -> tuple[list, dict]:
    """The distinct scans of the (path, class index) `samples` as (subject, conditions (K,)), less those with a
    category the UNet never saw (a held-out subject's sex `U` where training had F and M, which would be drawn open
    and labelled blank); with {"with a category the UNet never saw (sex 'U')": how many} where any."""
    paths, folder = [p for p, _ in samples], str(data.folder())
    subjects = subjects_of(paths, data.subject())
    y, _ = condition_matrix(conditions, table, subjects, torch.tensor([k for _, k in samples]), paths, folder)
    rows, visits = table.image_rows(subjects, paths, folder) if table is not None else ([None] * len(y), subjects)
    scans, unseen = {}, {}
    for subject, visit, row, values in zip(subjects, visits, rows, y):
        strange = [f"{c.name} {row[c.name]!r}" for c in conditions
                   if c.size and c.name != CLASS and row and c.unknown(row.get(c.name))]
        if strange:
            unseen[(visit, subject)] = ", ".join(strange)
        else:
            scans.setdefault((visit, values.numpy().tobytes()), (subject, values))  # a scan's slices, once
    left = {f"with a category the UNet never saw ({', '.join(sorted(set(unseen.values())))})": len(unseen)}
    return list(scans.values()), left if unseen else {}


def usable(scans: list[tuple[str, torch.Tensor]], conditions: list[Condition], part: str = "training",
           bins: dict[str, float] | None = None, training: torch.Tensor | None = None,
           left: dict[str, int] | None = None) -> tuple[Cohort, str]:
    """The (subject, conditions) scans that can be drawn: not those of no value (a sample drawn at one would be
    unconditional), nor those with a covariate outside the range the UNet trained on ([0, 1] once scaled), their
    covariates then binned by `bins`, nor, of held-out scans, those at one of the `training` scans' exact values
    (`at_training_values`); with a line saying what it holds and what it left out (`left`: {reason: count} left out
    before)."""
    left = {EMPTY: 0, OUTSIDE: 0, **(left or {}), SHARED: 0}
    total, kept = len(scans) + sum(left.values()), []
    for subject, row in scans:
        if row.isnan().all():
            left[EMPTY] += 1
        elif any(not c.size and not -1e-6 <= v <= 1 + 1e-6 for c, v in zip(conditions, row.tolist()) if v == v):
            left[OUTSIDE] += 1
        else:
            kept.append((subject, row))
    cohort = binned(Cohort(torch.stack([row for _, row in kept]) if kept else torch.zeros(0, len(conditions)),
                           [subject for subject, _ in kept], part), conditions, bins or {})
    if training is not None and len(cohort.y):
        new = ~at_training_values(cohort.y, training, conditions)
        left[SHARED] = int((~new).sum())
        cohort = replace(cohort, y=cohort.y[new], subjects=[s for s, keep in zip(cohort.subjects, new) if keep])
    if not len(cohort.y):
        raise BadInputError(f"--cohort: none of the {total} {part} scans can be drawn (left out: "
                            f"{_reasons(left, part)})")
    return cohort, describe(cohort, conditions, left, bins or {})


def at_training_values(y: torch.Tensor, training: torch.Tensor, conditions: list[Condition]) -> torch.Tensor:
    """(N,) bool: which rows of y (N, K) would draw a sample at a training patient's own values: those whose given
    values (NaN: left open, which the UNet also learned, each condition dropped apart) equal a `training` scan's exact
    ones (M, K), a covariate among them. Categories alone (class AD, sex F) are many patients' and are not counted."""
    given = ~y.isnan()
    counted = given & torch.tensor([not c.size for c in conditions])
    same = (y[:, None, :] == training[None]) | ~given[:, None, :]       # (N, M, K): equal, or left open
    return counted.any(1) & same.all(2).any(1)


def _reasons(left: dict[str, int], part: str) -> str:
    """"2 with no value, 1 with values the UNet did not train on (...)": the reasons of `usable`'s line."""
    why = "files --skip-bad-images left out?" if part == "training" else "beyond the training scans' range"
    return ", ".join(f"{n} {reason}" + (f" ({why})" if reason == OUTSIDE else "") for reason, n in left.items() if n)


def binned(cohort: Cohort, conditions: list[Condition], bins: dict[str, float]) -> Cohort:
    """The cohort with each covariate named in `bins` moved to the middle of its bin of that width in the
    covariate's units, bins counted from 0 ([70, 75) -> 72.5 for width 5); NaN stays NaN. A value read back from its
    float32 scaling (75 as 74.99999) is put in the bin its table's text is in."""
    y = cohort.y.clone()
    for k, c in enumerate(conditions):
        if c.name in bins:
            width = bins[c.name]
            slack = (c.high - c.low) * 2.0 ** -20 / width + 1e-9  # many times float32's error, far below a table's
            middle = (torch.floor(c.in_units(y[:, k].double()) / width + slack) + 0.5) * width
            y[:, k] = ((middle - c.low) / c.width).float()
    return replace(cohort, y=y)


def parse_bins(settings: list[str], conditions: list[Condition]) -> dict[str, float]:
    """--cohort-bins NAME=WIDTH ... -> {name: width}: each a covariate of the run and a positive width."""
    bins, covariates = {}, [c.name for c in conditions if not c.size]
    for text in settings:
        name, _, width = text.partition("=")
        if name not in covariates:
            raise BadInputError(f"--cohort-bins {text}: {name!r} is not a covariate of this run (its covariates: "
                                f"{', '.join(covariates) or 'none'}; categories are drawn as they are)")
        if name in bins:
            raise BadInputError(f"--cohort-bins names {name} twice: give one width")
        c, bins[name] = next(c for c in conditions if c.name == name), as_number(width)
        if bins[name] is None or bins[name] <= 0:
            raise BadInputError(f"--cohort-bins {text}: the width is a positive number in {name}'s units, e.g. "
                                f"{name}=5")
        if c.high == c.low:
            raise BadInputError(f"--cohort-bins {text}: the training scans' {name} has one value, {c.low:g}: nothing "
                                f"to bin")
        if bins[name] < (c.high - c.low) * 2.0 ** -14:
            raise BadInputError(f"--cohort-bins {text}: finer than the float32 values of {name} hold over "
                                f"{c.low:g}-{c.high:g}: a width of at least {(c.high - c.low) * 2.0 ** -14:.3g}")
        if bins[name] > c.high - c.low:
            raise BadInputError(f"--cohort-bins {text}: wider than the training scans' {name}, {c.low:g}-{c.high:g} "
                                f"(its bins' middles would lie outside it, where the UNet saw nobody): a width below "
                                f"{c.high - c.low:g}")
    return bins


def describe(cohort: Cohort, conditions: list[Condition], left: dict[str, int],
             bins: dict[str, float] | None = None) -> str:
    """One line: scans and subjects, what was left out and why, the values missing, the binned values outside the
    training range, and how many scans' values (once binned) are one subject's alone (a set to be shared carries
    them)."""
    owners = {}
    for subject, row in zip(cohort.subjects, cohort.y):
        owners.setdefault(row.numpy().tobytes(), set()).add(subject)
    alone = sum(1 for row in cohort.y if len(owners[row.numpy().tobytes()]) == 1)
    missing = [f"{int(cohort.y[:, k].isnan().sum())} lack {c.name}" for k, c in enumerate(conditions)
               if cohort.y[:, k].isnan().any()]
    outside = (cohort.y < -1e-6) | (cohort.y > 1 + 1e-6)  # a bin's middle past the training range
    beyond = [f"{int(outside[:, k].sum())} of {c.name} outside {c.low:g}-{c.high:g}" for k, c in enumerate(conditions)
              if c.name in (bins or {}) and outside[:, k].any()]
    return (f"cohort: {len(cohort.y)} {cohort.part} scans of {len(set(cohort.subjects))} subjects"
            + (f" ({', '.join(missing)}: drawn with it open)" if missing else "")
            + (f"; left out: {_reasons(left, cohort.part)}" if any(left.values()) else "")
            + "".join(f"; {name} in bins of {width:g} (their middles)" for name, width in (bins or {}).items())
            + (f" ({', '.join(beyond)}, the training range: the UNet extrapolates there)" if beyond else "")
            + f"; the values of {alone} scans are one subject's alone, and each sample drawn at them carries them")


def among(cohort: Cohort, wanted: torch.Tensor, conditions: list[Condition], asked: str = "") -> Cohort:
    """The scans whose categories are those `wanted` (K,) sets (NaN: any), a sub-cohort: `--cohort --class AD` draws
    AD scans with the ages and sexes AD scans have. A covariate cannot be set: the scans have its values."""
    fixed = [k for k in range(len(conditions)) if not wanted[k].isnan()]
    covariates = [conditions[k].name for k in fixed if not conditions[k].size]
    if covariates:
        raise BadInputError(f"--cohort draws {', '.join(covariates)} from the {cohort.part} scans; --set with --cohort "
                            f"picks categories only (leave out --set {covariates[0]}=...)")
    keep = torch.ones(len(cohort.y), dtype=torch.bool)
    for k in fixed:
        keep &= cohort.y[:, k] == wanted[k]
    if not keep.any():
        raise BadInputError(f"--cohort: no {cohort.part} scan has the values asked for{f' ({asked})' if asked else ''}")
    return Cohort(cohort.y[keep], [s for s, kept in zip(cohort.subjects, keep.tolist()) if kept], cohort.part)


def draw(cohort: Cohort, num: int, seed: int, unit: str = "scan", row: int = 0) -> torch.Tensor:
    """(num, K): `num` scans' conditions picked with replacement, uniformly over scans, or over subjects (then one of
    the subject's scans), from a generator of their own seeded by `seed` (the samples' noise is drawn apart); a row
    after the first of a set (--cohort --class all) by numpy's SeedSequence(seed, row, 1), so the rows draw apart, and
    apart from the noise of batch `row` (SeedSequence(seed, batch))."""
    entropy = seed if row == 0 else int(np.random.SeedSequence([seed, row, 1]).generate_state(1)[0])
    g = torch.Generator().manual_seed(entropy)
    if unit == "scan":
        return cohort.y[torch.randint(len(cohort.y), (num,), generator=g)]
    scans_of = {}
    for i, subject in enumerate(cohort.subjects):
        scans_of.setdefault(subject, []).append(i)
    subjects = sorted(scans_of)
    picks = []
    for s in torch.randint(len(subjects), (num,), generator=g).tolist():
        scans = scans_of[subjects[s]]
        picks.append(scans[int(torch.randint(len(scans), (1,), generator=g))])
    return cohort.y[torch.tensor(picks)]


def fingerprint(drawn: torch.Tensor) -> str:
    """What a set's settings hold of its drawn conditions: a set resumed must draw the same."""
    return hashlib.sha1(drawn.float().numpy().tobytes()).hexdigest()


def proportions(drawn: torch.Tensor, conditions: list[Condition]) -> str:
    """The drawn categories' shares, e.g. "class AD 42%, NC 58%", for the printout."""
    parts = []
    for k, c in enumerate(conditions):
        if c.size:
            counts = Counter(int(v) for v in drawn[:, k].tolist() if v == v)
            shares = (f"{c.values[i]} {n / len(drawn):.0%}" for i, n in sorted(counts.items()))
            parts.append(f"{c.name} " + ", ".join(shares))
    return "; ".join(parts)
