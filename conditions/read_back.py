"""Whether the counterfactuals of `counterfactual --input held-out` have the values they were changed to, as a network
trained on the run's real training images reads them: the *effectiveness* of Monteiro et al. 2023 ("Measuring
axiomatic soundness of counterfactual image models"), whose *composition* is the drift
(conditions/counterfactual_set.py).

The reader is `evaluate`'s condition network (evaluation/conditions.py: a head per condition of the run, the class
folders' included, trained on the training subjects' images, never on a held-out one, and cached in the run folder
as RUN/condition_net.pt, shared with `evaluate`: without --classifier-steps, the cached one of the same data, split,
table and conditions is used whatever its steps, else one of 1,000 trained).
For each condition that changes, over the images it changes:
- a category: the fraction of counterfactuals read as the value asked for, beside the fraction of their twins read
  so (the same images with their own value: what the reader says without the change) and the fraction of the inputs
  read as their own value (how well the reader reads real held-out images at all);
- a covariate: the change the reader sees, read(counterfactual) - read(twin) in the covariate's units, against the
  change asked for, image by image: its mean along each image's asked direction beside the mean size asked, the slope
  of read on asked through 0 (1: read as asked), their correlation where the asked changes differ (--set), and the
  reader's mean absolute error on the inputs.
A reader of real images may be fooled by what the model draws, and cannot see what it never learnt to see; so this
says how far the change reads as the value asked for, not that it is right.
"""
from __future__ import annotations

from pathlib import Path

import torch

from conditions.table import Condition
from runtime.checkpoint import load_checkpoint

STEPS = 1000            # evaluate's --classifier-steps


def read_changes(run: Path, conditions: list[Condition], held, own: torch.Tensor, target: torch.Tensor,
                 inputs: torch.Tensor, changed: torch.Tensor, twins: torch.Tensor, rows: list[dict], steps: int | None,
                 device) -> dict:
    """The record's entry for each condition that changes (the module's docstring), and each image's readings added
    to its `rows` (read_<name> of the counterfactual, twin_read_<name> of its twin; empty where it does not change).
    `held`: conditions/counterfactual_set.HeldOut; own, target: (N, K) of the images `inputs`, `changed`, `twins`;
    `steps`: the reader's training steps, None for those of the run's cached reader of this split (`cached_steps`)."""
    from evaluation.conditions import condition_net, read_back
    from evaluation.evaluate import feature_key
    data = held.config
    key = {**feature_key(data, held.dataset, held.training, data.holdout, data.holdout_seed),
           "table": held.table.sha1 if held.table is not None else None}  # as `evaluate` keys it: shared
    steps = cached_steps(run, key, conditions) if steps is None else steps
    net = condition_net(run, held.dataset, held.training, held.y, conditions, key, steps, device)
    record = {}
    for k, c in enumerate(conditions):
        moved = (target[:, k] != own[:, k]) & ~target[:, k].isnan()
        for row in rows:
            row.update({f"read_{c.name}": "", f"twin_read_{c.name}": ""})
        if not moved.any():
            continue
        read = {name: read_back(net, images[moved], conditions, k, device)
                for name, images in (("counterfactual", changed), ("twin", twins), ("input", inputs))}
        for i, cf, tw in zip(moved.nonzero().flatten().tolist(), read["counterfactual"].tolist(),
                             read["twin"].tolist()):
            rows[i].update({f"read_{c.name}": reading(c, cf), f"twin_read_{c.name}": reading(c, tw)})
        to, was = target[moved, k], own[moved, k]
        record[c.name] = {"images": int(moved.sum()), **(category_entry(read, to, was) if c.size else
                                                          covariate_entry(c, read, to, was))}
    return {"reader": "condition network (evaluate's), trained on the training subjects", "steps": steps,
            "conditions": record}


def cached_steps(run: Path, key: dict, conditions: list[Condition]) -> int:
    """The steps of RUN/condition_net.pt where it was trained on this data, split, table and conditions (by `evaluate
    --classifier-steps N` or an earlier counterfactual), so that the two commands share it rather than retrain it in
    turn; else STEPS."""
    path = run / "condition_net.pt"
    if path.is_file():
        saved = dict(load_checkpoint(path, "condition_net")["key"])
        steps = saved.pop("steps", None)
        if saved == {**key, "conditions": [c.describe() for c in conditions]} and steps:
            return steps
        print(f"{path} was trained on another data folder, split, table or conditions (its key names the data "
              f"folder: a moved one counts as another): a reader of {STEPS} steps is trained, and replaces it")
    return STEPS


def reading(c: Condition, value: float) -> str:
    return c.values[int(value)] if c.size else f"{value:.4g}"


def category_entry(read: dict, to: torch.Tensor, was: torch.Tensor) -> dict:
    share = lambda values, wanted: (values == wanted).float().mean().item()  # noqa: E731
    return {"counterfactuals_read_as_asked": share(read["counterfactual"], to),
            "twins_read_as_asked": share(read["twin"], to), "inputs_read_as_their_own": share(read["input"], was)}


def covariate_entry(c: Condition, read: dict, to: torch.Tensor, was: torch.Tensor) -> dict:
    """The change read, read(counterfactual) - read(twin), against the change asked, per image: --set's changes have
    either sign (an age set to 70 moves a 60-year-old up and an 80-year-old down), so their plain means would cancel;
    the change read along each image's asked direction, and the slope of read on asked through 0, do not."""
    asked = c.in_units(to) - c.in_units(was)
    seen = read["counterfactual"] - read["twin"]
    along = seen * asked.sign()
    varies = len(asked) > 2 and asked.std() > 0 and seen.std() > 0
    return {"mean_abs_asked_change": asked.abs().mean().item(), "read_along_asked": along.mean().item(),
            "read_along_asked_sd": along.std().item() if len(along) > 1 else None,
            "slope_read_on_asked": ((seen * asked).sum() / (asked * asked).sum()).item(),
            "r_read_asked": torch.corrcoef(torch.stack([seen, asked]))[0, 1].item() if varies else None,
            "reader_mae_on_inputs": (read["input"] - c.in_units(was)).abs().mean().item()}


def summary(record: dict) -> str:
    """The read-back's part of the command's line."""
    parts = []
    for name, e in record["conditions"].items():
        if "read_along_asked" in e:
            parts.append(f"{name} read {e['read_along_asked']:.3g} along changes of {e['mean_abs_asked_change']:.3g} "
                         f"asked (slope {e['slope_read_on_asked']:.2f}; reader's error on the inputs "
                         f"{e['reader_mae_on_inputs']:.3g})")
        else:
            parts.append(f"{name} read as asked in {e['counterfactuals_read_as_asked']:.0%} of the counterfactuals, "
                         f"{e['twins_read_as_asked']:.0%} of their twins (reader right on "
                         f"{e['inputs_read_as_their_own']:.0%} of the inputs)")
    return "read back: " + "; ".join(parts) if parts else "nothing read back"
