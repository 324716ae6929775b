"""The subject-level hold-out, for volumes/run_data.py's DataConfig and `evaluate`: a seeded fraction of subjects
left out of training, whole, drawn within each class from data layout version 5 on (no class is left out of
training by chance), from all classes at once before; from version 6 on drawn from every file listed, readable or
not. Whose each file is: volumes/layouts.py's `subject_id`.
"""
from __future__ import annotations

from typing import Callable

import numpy as np

from runtime.errors import BadInputError
from volumes.layouts import subject_id


def split_by_subject(paths: list[str], holdout: float, seed: int = 0, subject: Callable[[str], str] = subject_id,
                     labels: list[str] | None = None, listing: tuple | None = None) -> tuple[list[int], list[int]]:
    """Indices (train, held_out): a seeded random `holdout` fraction of subjects, whole subjects only.
    subject: whose each path is (a run's `Layout.subject`; default: the current rules).
    labels: each path's class name (layout version 5): the fraction is drawn within each class, rounded, and never the
    whole of one, so that no class is left out of training; a subject with images in several classes is drawn with
    the others of the same classes. One subject is held out where the rounding leaves none; none at all is an error.
    Without labels (versions 1-4) the subjects are drawn from all classes at once.
    listing: (paths, labels) of every file the data folder lists, readable or not (layout version 6): the subjects
    are drawn from it, and `paths` split by whose they are, so that a file unreadable today (--skip-bad-images) moves
    no subject between training and the held-out ones."""
    drawn, drawn_labels = listing if listing is not None else (paths, labels)
    owners = [subject(p) for p in drawn]
    rng = np.random.default_rng(seed)
    if drawn_labels is None:
        subjects = sorted(set(owners))
        n_held = min(len(subjects) - 1, max(1, round(holdout * len(subjects))))
        held = set(rng.permutation(subjects)[:n_held].tolist())
    else:
        held = _held_within_classes(owners, drawn_labels, holdout, rng)
    owners = [subject(p) for p in paths] if listing is not None else owners
    train_idx = [i for i, s in enumerate(owners) if s not in held]
    held_idx = [i for i, s in enumerate(owners) if s in held]
    return train_idx, held_idx


def subjects_by_class(owners: list[str], labels: list[str]) -> dict[tuple[str, ...], list[str]]:
    """{classes: their subjects, sorted}: each subject under the classes its images are of (most subjects: one)."""
    classes = {}
    for owner, label in zip(owners, labels):
        classes.setdefault(owner, set()).add(label)
    groups = {}
    for owner in sorted(classes):
        groups.setdefault(tuple(sorted(classes[owner])), []).append(owner)
    return dict(sorted(groups.items()))


def _held_within_classes(owners: list[str], labels: list[str], holdout: float, rng: np.random.Generator) -> set[str]:
    """The held-out subjects of split_by_subject's `labels` case: each class's rounded share, never all of one."""
    groups = subjects_by_class(owners, labels)
    held = [s for subjects in groups.values()
            for s in rng.permutation(subjects)[:min(len(subjects) - 1, round(holdout * len(subjects)))].tolist()]
    largest = max(groups.values(), key=len)
    if not held and len(largest) > 1:  # each class too small for its share: one subject of the largest
        held = [largest[rng.integers(len(largest))]]
    if not held:
        found = ", ".join(f"{'+'.join(k)} {len(s)}" for k, s in groups.items())
        raise BadInputError(f"--holdout {holdout:g} leaves out no subject: the naming rules find one subject per class "
                            f"({found}), and each class keeps one for training; if the files are of more people, "
                            "name them with --subject-pattern")
    return set(held)
