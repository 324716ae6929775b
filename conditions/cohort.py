"""`sample --cohort`: a synthetic set whose conditions follow the training cohort's, each sample drawn under the
conditions of a training scan picked at random.

A conditional run's `--set` and `--sweep` ask for chosen values; a synthetic dataset that stands in for the real one
needs its class, age, sex ... together, in the proportions and combinations the training scans have (the AD
subjects older than the NC ones, say). The cohort is the training images' distinct scans (subject and session, or
subject where the table has no sessions), each with its condition vector as stage 2 trained on it (the run's
participants table read again, its contents checked); `draw` picks `num` of them with replacement, uniformly over
scans, from `--seed`. Nothing of it is kept in `unet.pt`, which is shared more often than a run's data: the run's
data folder and table must be at hand, as for `evaluate`.
"""
from __future__ import annotations

import hashlib
from pathlib import Path

import torch

from conditions.table import condition_matrix, saved_table, subjects_of
from runtime.errors import BadInputError
from volumes.run_data import DataConfig, training_files


def training_cohort(run: Path, conditions: list, labels: dict | None) -> torch.Tensor:
    """(M, K): the condition vector of each of the M distinct training scans of `run` (NaN where not given), for
    `conditions` as the run's UNet saved them, from the table of its record `labels` (None: the class folders)."""
    data = DataConfig.of_run(run)
    samples, _ = training_files(data, expand_volumes=False)
    paths, root = [p for p, _ in samples], str(data.folder())
    subjects = subjects_of(paths, data.subject())
    table = saved_table(labels, data.folder()) if labels else None
    if table is not None and table.sha1 != labels["sha1"]:
        raise BadInputError(f"the participants table {table.file} changed since this run was trained: --cohort would "
                            f"draw values it did not train on; restore it")
    y, _ = condition_matrix(conditions, table, subjects, torch.tensor([k for _, k in samples]), paths, root)
    visits = table.image_rows(subjects, paths, root)[1] if table is not None else subjects
    scans = {}
    for visit, row in zip(visits, y):
        scans.setdefault((visit, row.numpy().tobytes()), row)  # a scan's slices, or its files of one class, once
    return torch.stack(list(scans.values()))


def draw(cohort: torch.Tensor, num: int, seed: int) -> torch.Tensor:
    """(num, K): `num` rows of the cohort picked uniformly with replacement, from a generator of its own seeded by
    `seed` (the samples' noise is drawn apart from it)."""
    picks = torch.randint(len(cohort), (num,), generator=torch.Generator().manual_seed(seed))
    return cohort[picks]


def fingerprint(drawn: torch.Tensor) -> str:
    """What a set's settings hold of its drawn conditions: a set resumed must draw the same."""
    return hashlib.sha1(drawn.float().numpy().tobytes()).hexdigest()
