"""What a UNet is conditioned on: the class folders and the columns of a participants table (read and joined to each
image by conditions/participants.py), and the values asked for when sampling (`--set`, `--sweep`).

A column whose values are all numbers is a continuous covariate, scaled to [0, 1] by the training images' range;
any other is a category (`name:category` or `name:continuous` says which). Missing values (`n/a`, empty), subjects
the table lacks and categories the run does not know are "not given" (NaN): that condition is left unconditioned
for them, never guessed, and counted in the one-line report.

    python driver.py train-unet --run runs/demo_c --condition group,age,sex   # conditions built from the table
    python driver.py sample --run runs/demo_c --set group=NC --sweep age=55,65,75,85
"""
from __future__ import annotations

import argparse
import math
import os
from dataclasses import asdict, dataclass, field
from typing import Callable

import torch

from conditions.participants import SESSION_ID, Table, subject_key
from runtime.errors import BadInputError

CLASS = "class"                                         # the condition of the class folders (AD, NC ...)
MISSING = {"", "n/a", "na", "nan", "none", "null"}      # missing values, compared in lower case
KINDS = ("category", "continuous")


def condition_list(text: str) -> list[str]:
    """--condition: 'group,age,sex:category' -> ['group', 'age', 'sex:category']."""
    names = [n.strip() for n in text.split(",") if n.strip()]
    for name in names:
        kind = name.partition(":")[2]
        if kind and kind not in KINDS:
            raise argparse.ArgumentTypeError(f"{name!r}: the kind after ':' is 'category' or 'continuous'")
    if not names or len({n.partition(":")[0] for n in names}) < len(names):
        raise argparse.ArgumentTypeError(f"expected distinct comma-separated column names, got {text!r}")
    return names


@dataclass
class Condition:
    """One condition of a UNet, saved in its checkpoint: a category (its values, in index order) or a continuous
    covariate (the training subjects' range [low, high], mapped to [0, 1])."""
    name: str
    kind: str
    values: list[str] = field(default_factory=list)
    low: float = 0.0
    high: float = 1.0

    @property
    def width(self) -> float:
        """The units of a covariate's scale: its training range, or 1 where training had one value (which is 0)."""
        return (self.high - self.low) or 1.0

    @property
    def size(self) -> int:
        """What the UNet's config holds for it: the number of categories, 0 for a continuous covariate."""
        return len(self.values) if self.kind == "category" else 0

    def encode(self, text: str | None) -> float:
        """A table's value as the UNet takes it: a category's index, a covariate scaled; NaN when it is missing or an
        unknown category."""
        if text is None or text.strip().lower() in MISSING:
            return math.nan
        if self.kind == "category":
            return float(self.values.index(text.strip())) if text.strip() in self.values else math.nan
        number = as_number(text)
        return math.nan if number is None else (number - self.low) / self.width

    def unknown(self, text: str | None) -> bool:
        """Whether a table's value is given and yet not one the UNet knows: a category training never had."""
        return math.isnan(self.encode(text)) and not (text is None or text.strip().lower() in MISSING)

    def parse(self, text: str) -> float:
        """A value asked for by --set or --sweep, checked: a known category, or a number (a warning outside the
        training range, where the model has seen nobody; an error beyond ten times its width from it, where the
        covariate's embedding only extrapolates: 1e39 gave NaN images, 1e41 a crash)."""
        if self.kind == "category":
            if text not in self.values:
                raise BadInputError(f"{self.name}={text}: {self.name} is one of {', '.join(self.values)} in this run")
        elif as_number(text) is None:
            raise BadInputError(f"{self.name}={text}: {self.name} is a number in this run")
        elif not -10 <= self.encode(text) <= 11:
            raise BadInputError(f"{self.name}={text} is far outside the training subjects' range {self.low:g}-"
                                f"{self.high:g}: nothing can be said of it")
        elif not self.low <= as_number(text) <= self.high:
            print(f"warning: {self.name}={text} is outside the training subjects' range {self.low:g}-{self.high:g}")
        return self.encode(text)

    def in_units(self, values: torch.Tensor) -> torch.Tensor:
        """Scaled covariate values back in the covariate's units (a category's indices as they are)."""
        return values if self.size else values * self.width + self.low

    def decode(self, value: float) -> str | None:
        """`encode` undone: the value as a table writes it (a category's name, a covariate in its units), None for
        NaN."""
        if math.isnan(value):
            return None
        if self.kind == "category":
            return self.values[int(value)]
        return f"{self.low + value * self.width:.6g}"

    def describe(self) -> str:
        return f"{self.name} ({'/'.join(self.values)})" if self.kind == "category" else \
               f"{self.name} ({self.low:g}-{self.high:g})"


def as_number(text: str) -> float | None:
    try:
        value = float(text)
    except (TypeError, ValueError):
        return None
    return value if math.isfinite(value) else None


# ----------------------------------------------------------------------------- conditions of a training set

def build_conditions(names: list[str], table: Table | None, subjects: list[str], classes: list[str],
                     paths: list[str] | None = None, root: str | None = None) -> list[Condition]:
    """The conditions `names` (from --condition), as the training images of `subjects` (at `paths` in the data folder
    `root`, for a table of sessions) define them: `class` the class folders; a table column a category of the values
    it takes, or a covariate with their range."""
    rows, visits = table.image_rows(subjects, paths, root) if table is not None else ([], [])
    by_visit = dict(zip(visits, rows))  # each scan (subject, session) once
    conditions = []
    for spec in names:
        name, _, kind = spec.partition(":")
        if name == CLASS:
            conditions.append(Condition(CLASS, "category", list(classes)))
            continue
        if table is None:
            raise BadInputError(f"--condition {name}: no participants table (give --labels FILE, or put a "
                                f"participants.tsv in the data folder)")
        if name not in table.columns:
            raise BadInputError(f"--condition {name}: {table.file} has no column {name!r} (its columns: "
                                f"{', '.join(table.columns)}; the class folders are 'class')")
        given = [row[name] for row in by_visit.values() if row and row.get(name, "").lower() not in MISSING]
        if not given:
            raise BadInputError(f"--condition {name}: no training subject has a value of it in {table.file}")
        numbers = [as_number(v) for v in given]
        words = sorted({v for v, n in zip(given, numbers) if n is None})
        if not kind and words and len(words) < sum(n is not None for n in numbers):  # mostly numbers: a typo, or 90+
            raise BadInputError(f"--condition {name}: {table.file} holds numbers and {', '.join(map(repr, words[:3]))}"
                                f"{' ...' if len(words) > 3 else ''} in it: correct those, write them n/a, or say "
                                f"{name}:category (every value a category) or {name}:continuous")
        kind = kind or ("continuous" if not words else "category")
        if kind == "continuous":
            if any(n is None for n in numbers):
                bad = next(v for v, n in zip(given, numbers) if n is None)
                raise BadInputError(f"--condition {name}:continuous: {table.file} holds {bad!r} in it, not a number")
            conditions.append(Condition(name, kind, low=min(numbers), high=max(numbers)))
        else:
            conditions.append(Condition(name, kind, sorted(set(given))))
    return conditions


def condition_matrix(conditions: list[Condition], table: Table | None, subjects: list[str], class_labels: torch.Tensor,
                     paths: list[str] | None = None, root: str | None = None) -> tuple[torch.Tensor, str]:
    """(y (N, K) float, NaN where not given; a one-line report) for N images of `subjects` with `class_labels` (at
    `paths` in the data folder `root`, for a table of sessions)."""
    rows, visits = table.image_rows(subjects, paths, root) if table is not None else ([None] * len(subjects), [])
    columns, notes = [], []
    for c in conditions:
        if c.name == CLASS:
            columns.append(class_labels.float())
            continue
        values = [row.get(c.name) if row else None for row in rows]
        column = torch.tensor([c.encode(v) for v in values], dtype=torch.float32)
        per_visit = {visit: (v, e) for visit, row, v, e in zip(visits, rows, values, column.tolist())
                     if row is not None}
        missing = sum(1 for v, _ in per_visit.values() if v is None or v.strip().lower() in MISSING)
        unknown = sum(1 for _, e in per_visit.values() if math.isnan(e)) - missing
        notes.append(f"{c.name}: {missing} n/a" + (f", {unknown} unknown" if unknown else ""))
        columns.append(column)
    y = torch.stack(columns, dim=1) if columns else torch.zeros(len(subjects), 0)
    report = "conditions " + ", ".join(c.describe() for c in conditions)
    if table is not None:
        known = {subject_key(s) for s, row in zip(subjects, rows) if row is not None}
        absent = sorted({s for s in subjects if subject_key(s) not in known})
        slices = sum(1 for s in subjects if subject_key(s) not in known)
        everyone = len(known) + len(absent)
        report += (f" from {table.file} (subjects by {table.subject_column}): {len(known)} of {everyone} subjects in "
                   f"the table" + (f"; {len(absent)} not ({slices} images, unconditioned on its columns: "
                                   f"{', '.join(absent[:3])}{' ...' if len(absent) > 3 else ''})" if absent else ""))
        if table.sessions and paths:
            report += "; " + _sessions_found(table, dict(zip(paths, visits)), root)
        report += f"; per {'session' if table.sessions else 'subject'} " + ", ".join(notes)
    return y, report


def _sessions_found(table: Table, visits: dict[str, tuple[str, str | None]], root: str | None) -> str:
    """How many of the files (`visits`: file -> (subject, session or None)) a table of sessions names the session of,
    with one it does not, of a subject it has sessions of (its values of sessions are not given)."""
    ours = {p: visit for p, visit in visits.items() if visit[0] in table.sessions}  # of subjects with sessions
    found = sum(1 for _, session in ours.values() if session is not None)
    text = (f"sessions by {table.session_column or SESSION_ID}: {found} of the {len(ours)} files of subjects with "
            f"sessions found in the table")
    lost = next(((p, s) for p, (s, session) in ours.items() if session is None), None)
    if lost:
        named = ", ".join(sorted(table.sessions[lost[1]])[:4])
        text += (f" ({len(ours) - found} not, their values of sessions not given: e.g. "
                 f"{os.path.relpath(lost[0], root) if root else lost[0]}, whose subject's sessions there are {named})")
    return text


# ----------------------------------------------------------------------------- the values asked for when sampling

def asked_values(conditions: list[Condition], settings: list[str]) -> torch.Tensor:
    """--set NAME=VALUE ... -> the (K,) conditions vector, NaN where none is set."""
    y = torch.full((len(conditions),), math.nan)
    for name, value in (_pair(s) for s in settings):
        k = _index(conditions, name)
        y[k] = conditions[k].parse(value)
    return y


def asked_shifts(conditions: list[Condition], shifts: list[str]) -> torch.Tensor:
    """--shift NAME=DELTA ... -> (K,) each covariate's change on the UNet's scale (DELTA / its training range), 0 where
    none is asked: a counterfactual's target is then each input's own value moved by DELTA (ten years older)."""
    delta, named = torch.zeros(len(conditions)), set()
    for name, value in (_pair(s) for s in shifts):
        k = _index(conditions, name)
        c = conditions[k]
        if c.size:
            raise BadInputError(f"--shift {name}={value}: {name} is a category, which --set {name}=VALUE changes")
        if not as_number(value) or name in named:
            raise BadInputError(f"--shift {name}={value}: give each covariate once, and a number other than 0 in its "
                                f"units (--shift {name}=10)")
        named.add(name)
        delta[k] = as_number(value) / c.width
    return delta


def sweep_rows(conditions: list[Condition], base: torch.Tensor, sweep: str | None) -> list[tuple[str, torch.Tensor]]:
    """--sweep NAME=V1,V2,... -> [(caption, conditions vector)] one per value, the --set values kept in each; without a
    sweep one row of `base`. `NAME=all` sweeps every category of NAME."""
    if sweep is None:
        return [("", base)]
    name, values = _pair(sweep)
    k = _index(conditions, name)
    if values == "all" and conditions[k].kind == "category":
        values = ",".join(conditions[k].values)
    rows = []
    for value in values.split(","):
        y = base.clone()
        y[k] = conditions[k].parse(value)
        rows.append((f"{name}={value}", y))
    return rows


def _pair(text: str) -> tuple[str, str]:
    name, sep, value = text.partition("=")
    if not sep or not name or not value:
        raise BadInputError(f"expected NAME=VALUE, got {text!r}")
    return name.strip(), value.strip()


def _index(conditions: list[Condition], name: str) -> int:
    names = [c.name for c in conditions]
    if name not in names:
        known = ", ".join(names) or "none: it was trained unconditional"
        raise BadInputError(f"{name!r} is not a condition of this run (its conditions: {known})")
    return names.index(name)


def saved_conditions(ckpt: dict) -> list[Condition]:
    """The conditions a UNet checkpoint was trained with; a class-conditional one written before tables existed has
    the class folders (`classes`)."""
    if "conditions" in ckpt:
        return [Condition(**c) for c in ckpt["conditions"]]
    if ckpt["config"].get("num_classes"):
        return [Condition(CLASS, "category", list(ckpt.get("classes") or []))]
    return []


def to_saved(conditions: list[Condition]) -> list[dict]:
    return [asdict(c) for c in conditions]


def subjects_of(paths: list[str], subject: Callable[[str], str]) -> list[str]:
    """The subject of each path by the run's rules, each worked out once."""
    owners = {p: subject(p) for p in set(paths)}
    return [owners[p] for p in paths]
