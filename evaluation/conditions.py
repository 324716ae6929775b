"""`driver.py evaluate` on a run conditioned on a participants table: does each condition do what it says?

A network of the domain classifier's shape (evaluation/classifier.py) learns every condition of the run from the real
training slices at once: a regression head per continuous covariate, a classifier head per category, beside the
rotation task. It then reads the conditions back from real held-out slices (the floor: what it can tell at best)
and from samples generated at those very slices' values, one condition given at a time, at each guidance scale:

    continuous   Pearson r and mean absolute error (in the covariate's own units) of the value read against the value
                 set (real: the table's value); w = 0 (no guidance, the condition ignored) is the null, r near 0
    category     how often the value read is the value set

One figure per continuous covariate: a sweep over its range, a row per value, every row from the same noise
(eval_sweep_<name>.png).

A sample set (`evaluate --samples SET`) is read back the same way, each of its images against the values its manifest
row says it was drawn at (`set_values`; after --withhold-flagged, the images it keeps): does a slice labelled 80 years
old look 80 to the network that reads real ones, as well as a real slice of that age does?
"""
from __future__ import annotations

import math
from pathlib import Path

import torch
import torch.nn.functional as F

from conditions.participants import Table, saved_table
from conditions.table import CLASS, Condition, condition_matrix, saved_conditions, subjects_of
from evaluation.classifier import ClassifierConfig, SliceClassifier, cached_classifier
from export.figures import save_rows
from export.sample_set import manifest_rows
from runtime.checkpoint import load_checkpoint
from runtime.errors import BadInputError
from runtime.process import progress

SWEEP_VALUES = 5          # rows of a covariate's sweep figure
SWEEP_IMAGES = 8          # images per row


def heads(conditions: list[Condition]) -> list[slice]:
    """Which outputs of the condition network belong to each condition: n logits for a category, 1 for a covariate."""
    sizes = [c.size or 1 for c in conditions]
    starts = [sum(sizes[:k]) for k in range(len(sizes))]
    return [slice(s, s + n) for s, n in zip(starts, sizes)]


def condition_losses(outputs: torch.Tensor, y: torch.Tensor, conditions: list[Condition]) -> torch.Tensor:
    """The mean cross-entropy or squared error of each condition, over the images where it is given; summed."""
    total = outputs.new_zeros(())
    for c, part, k in zip(conditions, heads(conditions), range(len(conditions))):
        given = ~y[:, k].isnan()
        if not given.any():
            continue
        out, target = outputs[given, part], y[given, k]
        total = total + (F.cross_entropy(out, target.long()) if c.size else F.mse_loss(out[:, 0], target))
    return total


def _batches(dataset, indices: list[int], y: torch.Tensor, batch_size: int, seed: int):
    """(images, conditions) of random batches of the images `indices`, endlessly (a new order each pass)."""
    g = torch.Generator().manual_seed(seed)
    while True:
        order = torch.tensor(indices)[torch.randperm(len(indices), generator=g)]
        for chunk in order.split(batch_size):
            if len(chunk) < min(batch_size, len(indices)):
                break
            yield torch.stack([dataset[int(i)][0] for i in chunk]), y[chunk]


def train_condition_net(dataset, indices: list[int], y: torch.Tensor, conditions: list[Condition], input_size: int,
                        channels: int, steps: int, device, seed: int = 0) -> SliceClassifier:
    """The domain classifier's network with a head per condition, trained on the images `indices` (and rotations):
    AdamW, batch 64, `steps` steps; y (N, K) the conditions of every image of `dataset`."""
    torch.manual_seed(seed)
    cfg = ClassifierConfig(in_channels=channels, input_size=input_size, num_classes=sum(c.size or 1 for c in conditions))
    model = SliceClassifier(cfg).to(device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    batches = _batches(dataset, indices, y, 64, seed)
    for _ in progress(range(steps), desc="condition network", dynamic_ncols=True):
        x, targets = (t.to(device) for t in next(batches))
        k = torch.randint(0, 4, (len(x),), device=device)
        rotated = torch.stack([torch.rot90(img, int(r), dims=(1, 2)) for img, r in zip(x, k)])
        outputs, _ = model(x)
        _, rotation = model(rotated)
        loss = F.cross_entropy(rotation, k) + condition_losses(outputs, targets, conditions)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    return model.eval()


def condition_net(run: Path, dataset, train_idx: list[int], y: torch.Tensor, conditions: list[Condition], key: dict,
                  steps: int, device) -> SliceClassifier:
    """RUN/condition_net.pt, trained once and reused while the data, split, conditions and steps are unchanged."""
    key = {**key, "steps": steps, "conditions": [c.describe() for c in conditions]}
    return cached_classifier(run / "condition_net.pt", "condition_net", key, device,
                             lambda: (train_condition_net(dataset, train_idx, y, conditions, min(key["image_size"], 128),
                                                          key["channels"], steps, device), {}))


@torch.no_grad()
def read_back(model: SliceClassifier, images: torch.Tensor, conditions: list[Condition], k: int, device) -> torch.Tensor:
    """Condition k as the network reads it from the images: a category's index, or a covariate in its own units."""
    outputs = torch.cat([model(x.to(device))[0].cpu() for x in images.split(256)])[:, heads(conditions)[k]]
    c = conditions[k]
    return outputs.argmax(1).float() if c.size else c.in_units(outputs[:, 0])


def agreement(read: torch.Tensor, truth: torch.Tensor, c: Condition) -> dict:
    """Category: the fraction read as the value set. Covariate: Pearson r and the mean absolute error, in its units."""
    if c.size:
        return {"recognised": (read == truth).float().mean().item()}
    r = torch.corrcoef(torch.stack([read, truth]))[0, 1].item() if truth.std() > 0 and read.std() > 0 else math.nan
    return {"r": r, "mae": (read - truth).abs().mean().item()}


# ----------------------------------------------------------------------------- the check

def condition_values(args, conditions: list[Condition], record: dict | None, table: Table | None, dataset
                     ) -> torch.Tensor:
    """y (N, K): the run's `conditions` of every image of `dataset` (the evaluation's images: training and held out),
    from its participants table (`saved_table`'s; `record`: what the run saved of it) and class folders; NaN where not
    given."""
    if table is not None and table.sha1 != record["sha1"]:
        print(f"warning: {table.file} changed since the run was trained; the check reads it as it is now")
    paths = [p for p, _ in dataset.samples]
    y, _ = condition_matrix(conditions, table, subjects_of(paths, args.data_config.subject()), dataset.labels,
                            paths, str(args.data_config.folder()))
    return y


def set_values(folder: Path, names: list[str], conditions: list[Condition]) -> torch.Tensor:
    """y (N, K) of a sample set's images `names` (its files as its manifest names them): the values each was drawn at,
    from its manifest row; NaN where a condition was not given (or the set's run had no such condition)."""
    rows = {row["file"]: row for row in manifest_rows(folder)}
    return torch.tensor([[c.encode(rows.get(name, {}).get(c.name) or None) for c in conditions] for name in names])


def set_conditions(args, run: Path, dataset, folder: Path, names: list[str]
                   ) -> tuple[list[Condition], Table | None, torch.Tensor, torch.Tensor] | None:
    """`evaluate --samples SET` of a run conditioned on table columns: (its conditions, its participants table, y of
    the data's images, y of the set's images `names`: `set_values`), to read back; None where there is nothing to: the
    run has no table condition, no image of the set was drawn at a value of one (`sample --class all`), or the run's
    table is not found (said so; --labels FILE, where it is now, is refused if it is not the run's)."""
    unet = load_checkpoint(run / "unet.pt", "unet")
    conditions, record = saved_conditions(unet), unet.get("labels")
    table_columns = [k for k, c in enumerate(conditions) if c.name != CLASS]
    drawn = set_values(folder, names, conditions)
    if not table_columns or drawn[:, table_columns].isnan().all():
        return None
    try:
        table = saved_table(record, args.data_config.folder(), args.labels) if record else None
    except BadInputError as e:
        if args.labels:
            raise
        print(f"warning: the set's values are not read back: {e}")
        return None
    return conditions, table, condition_values(args, conditions, record, table, dataset), drawn


def condition_check(args, run: Path, conditions: list[Condition], table: Table | None, y: torch.Tensor, dataset,
                    train_idx: list[int], held_idx: list[int], key: dict, device, out: Path, generate=None,
                    drawn: tuple[torch.Tensor, torch.Tensor] | None = None) -> tuple[list[dict], list[str]]:
    """Every condition of the run from its participants table (`saved_table`'s; y: `condition_values`): rows of the
    real held-out floor, then of samples at each guidance scale with the sweep figures written (generate(y (N, K),
    guidance) -> images), or of a sample set's own images `drawn` (images, y (M, K): `set_values`), each read back
    against the values it was drawn at."""
    out.mkdir(parents=True, exist_ok=True)
    key = {**key, "table": table.sha1 if table is not None else None}  # its values are what the network learns
    net = condition_net(run, dataset, train_idx, y, conditions, key, args.classifier_steps, device)
    rows, figures = [], []
    budget = args.num or 256
    for k, c in enumerate(conditions):
        if c.name == CLASS:
            continue  # the class folders: --class all scores them, per class
        held = [i for i in held_idx if not math.isnan(y[i, k])]
        if len(held) < 2:  # the table lacks the held-out subjects' values: the other checks stand, this one cannot
            print(f"warning: only {len(held)} held-out images have a value of {c.name}; it is not read back")
            rows.append({"condition": c.name, "images": "not checked: held-out images with a value",
                         "count": len(held)})
            continue
        held = [held[int(j)] for j in torch.linspace(0, len(held) - 1, min(budget, len(held))).round().long()]
        real = torch.stack([dataset[i][0] for i in held])
        truth = y[held, k]
        rows.append({"condition": c.name, "images": "real (held out)", "count": len(held),
                     **agreement(read_back(net, real, conditions, k, device), c.in_units(truth), c)})
        if drawn is not None:
            images, values = drawn
            given = ~values[:, k].isnan()
            rows.append({"condition": c.name, "images": "the set", "count": int(given.sum()),
                         **(agreement(read_back(net, images[given], conditions, k, device),
                                      c.in_units(values[given, k]), c) if given.sum() > 1 else {})})
        if generate is None:
            continue
        asked = torch.full((len(held), len(conditions)), math.nan)
        asked[:, k] = truth
        for w in args.guidance:
            samples = generate(asked, w)
            rows.append({"condition": c.name, "images": f"samples, w={w:g}", "count": len(samples),
                         **agreement(read_back(net, samples, conditions, k, device), c.in_units(truth), c)})
        if not c.size:
            figures.append(sweep_figure(c, k, conditions, generate, max(args.guidance), out))
    return rows, figures


def sweep_figure(c: Condition, k: int, conditions: list[Condition], generate, guidance: float, out: Path) -> str:
    """eval_sweep_<name>.png: SWEEP_VALUES values across the training range, a row each, all from the same noise."""
    values = torch.linspace(c.low, c.high, SWEEP_VALUES)
    rows = []
    for v in values.tolist():
        asked = torch.full((SWEEP_IMAGES, len(conditions)), math.nan)
        asked[:, k] = (v - c.low) / c.width
        rows.append((f"{c.name}={v:.3g}", generate(asked, guidance)))
    name = f"eval_sweep_{''.join(ch if ch.isalnum() else '_' for ch in c.name)}.png"
    save_rows(rows, out / name)
    return name


def format_condition_table(rows: list[dict]) -> str:
    """Markdown table of the check's rows: r and MAE for covariates, the fraction recognised for categories."""
    cell = lambda r, key, form: format(r[key], form) if key in r and not math.isnan(r[key]) else ""  # noqa: E731
    lines = ["| condition | images | n | r | MAE | recognised |", "|---|---|---|---|---|---|"]
    lines += [f"| {r['condition']} | {r['images']} | {r['count']} | {cell(r, 'r', '.3f')} | {cell(r, 'mae', '.3g')} | "
              f"{cell(r, 'recognised', '.1%')} |" for r in rows]
    return "\n".join(lines)
