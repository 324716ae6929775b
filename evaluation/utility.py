"""Is synthetic data useful? Train on synthetic, test on real (TSTR), the check of `driver.py evaluate --utility N`.

The AD/NC classifier (the domain classifier's network, evaluation/classifier.py) is trained three ways, for the same
steps: on N real training slices per class, on N generated slices per class (the run's class-conditional samples at
each guidance scale), and on both together (real + synthetic: augmentation). Each is tested on every held-out image,
subjects the run never saw, and scored by accuracy and the area under the ROC curve (torchmetrics). The real row is
what N real slices buy; a synthetic row near it means the samples carry what tells the classes apart. Each row is
trained UTILITY_SEEDS times from different seeds, and the table gives the mean and standard deviation.

    python driver.py evaluate --run RUN --utility 200 --guidance 1,3     # a run trained with --conditional
    python driver.py evaluate --run RUN --samples SET --withhold-flagged --utility 200    # a set, as it is shared

With --samples the synthetic images are the set's own, N per class by their class folders (`set_labels`), less
those --withhold-flagged leaves out of it (`kept_for_utility`); the guidance is the set's.

A run conditioned on a participants table has its columns checked the same way (`condition_utility`): the condition
network of evaluation/conditions.py (a regression head per covariate, a classifier head per category) trained on N
real training slices, on N samples generated at those very slices' values (every condition the table gives, at once,
so the two sets differ by their images alone), and on both; read back from the held-out images: Pearson r and the mean
absolute error per covariate (a brain-age model trained on synthetic scans, tested on real ones), the fraction
recognised per category. With --samples the samples are N of the set's own images with a value, at the values its
manifest gives them (a `--cohort` set's are training or held-out scans' values, not those of the N real slices).
"""
from __future__ import annotations

import math
from collections import Counter
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F
from torch.utils.data import TensorDataset
from torchmetrics.functional.classification import auroc

import predict
from conditions.table import CLASS, Condition
from evaluation.classifier import ClassifierConfig, SliceClassifier
from evaluation.conditions import agreement, read_back, train_condition_net
from evaluation.memorisation import kept_samples
from runtime.errors import BadInputError

UTILITY_SEEDS = 3
BATCH = 64


def fit_classifier(images: torch.Tensor, labels: torch.Tensor, cfg: ClassifierConfig, steps: int, device,
                   seed: int) -> SliceClassifier:
    """The class head trained on `images` (N, C, H, W) in [-1, 1]: AdamW, random batches of BATCH, random
    horizontal flips (a brain's halves are alike), `steps` steps from `seed`."""
    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    model = SliceClassifier(cfg).to(device).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    for _ in range(steps):
        pick = torch.randint(0, len(images), (min(BATCH, len(images)),), generator=g)
        flip = torch.rand(len(pick), generator=g) < 0.5
        x = torch.where(flip[:, None, None, None], images[pick].flip(-1), images[pick]).to(device)
        loss = F.cross_entropy(model(x)[0], labels[pick].to(device))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    return model.eval()


@torch.no_grad()
def scores(model: SliceClassifier, images: torch.Tensor, labels: torch.Tensor, num_classes: int, device) -> dict:
    """Accuracy and AUC (one-vs-rest, macro over the classes when more than two) on a test set."""
    logits = torch.cat([model(x.to(device))[0].float().cpu() for x in images.split(256)])
    probs = logits.softmax(dim=1)
    if num_classes == 2:
        auc = auroc(probs[:, 1], labels, task="binary")
    else:
        auc = auroc(probs, labels, task="multiclass", num_classes=num_classes)
    return {"accuracy": (logits.argmax(1) == labels).float().mean().item(), "auc": auc.item()}


def per_class(images_of: Callable[[int, int], torch.Tensor], classes: list[int], n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """n images of each class, from `images_of(class index, n)`, with their labels."""
    images = [images_of(c, n) for c in classes]
    return torch.cat(images), torch.cat([torch.full((len(x),), c) for c, x in zip(classes, images)])


def images_per_class(n: int, classes: list[str], train_labels: list[int], test_labels: list[int], seen: bool) -> int:
    """`--utility N` checked before anything is drawn: the images per class every row trains on, N or, where the
    smallest class has fewer real training images, as many as it has, so that the rows differ in what they learn
    from and not in how much. Refused where the check cannot mean what it says: a run that trained on the test
    subjects (its samples carry them), one class, or held-out subjects of one class (AUC undefined)."""
    refuse_seen(seen)
    if len(classes) < 2:
        raise BadInputError(f"--utility trains a classifier of the data's classes, and it has one ({classes[0]})")
    absent = [name for c, name in enumerate(classes) if c not in test_labels or c not in train_labels]
    if absent:
        raise BadInputError(f"--utility needs every class among both the training and the held-out subjects; "
                            f"{', '.join(absent)} is missing from one of them (a larger --holdout at training time)")
    fewest = min(train_labels.count(c) for c in range(len(classes)))
    if fewest < n:
        print(f"--utility {n}: the smallest class has {fewest} real training images, so every row trains on {fewest} "
              f"per class")
    return min(n, fewest)


def in_class_folders(names: list[str], classes: list[str]) -> bool:
    """Whether every image of a --samples folder (`names`, as `set_labels` takes them) is in a folder of a class."""
    return all("/" in name and name.split("/")[0] in classes for name in names)


def set_labels(names: list[str], classes: list[str], folder: str) -> list[int]:
    """The class of each image of a --samples folder, by its class folder (`AD/sub-000000.png`: a class-conditional
    run's set, or any folder of images in folders named as the data's classes), for `--utility` on the set. Refused
    where an image has none or a class has no image: the classifier could not learn the classes from the set."""
    top = [name.split("/")[0] if "/" in name else "" for name in names]
    unknown = sorted({t for t in top if t not in classes})
    if unknown:
        raise BadInputError(f"--utility with --samples trains the {'/'.join(classes)} classifier on the images of "
                            f"each class, known by their class folders, and {folder} has images in "
                            f"{', '.join(repr(t) if t else 'no folder' for t in unknown[:3])} (a class-conditional "
                            f"run's set: sample --class all)")
    absent = [name for name in classes if name not in top]
    if absent:
        raise BadInputError(f"--utility with --samples needs images of every class in {folder}; it has none of "
                            f"{', '.join(absent)}")
    return [classes.index(t) for t in top]


def kept_for_utility(each: list[dict], classes_of: list[int], n_classes: int, per_class: int, withholding: bool
                     ) -> tuple[list[int], int]:
    """`evaluate --samples SET --utility N`, before the set withholds anything: the places of the images it trains
    on (with `withholding`, those the memorisation check did not flag: `each`, its verdicts) and the images per class
    every row then trains on, no more than the set's smallest class keeps. Refused where a class keeps none."""
    kept = kept_samples(each, withholding)
    fewest = min(Counter(classes_of[k] for k in kept)[c] for c in range(n_classes))
    if fewest == 0:
        raise BadInputError("--utility: every image of a class of the set is flagged as a possible copy, and "
                            "--withhold-flagged leaves none of that class to train on")
    if fewest < per_class:
        print(f"--utility: the set's smallest class has {fewest} images" + (" it keeps" if withholding else "")
              + f", so every row trains on {fewest} per class")
    return kept, min(per_class, fewest)


def refuse_seen(seen: bool):
    """--utility on a run trained on every subject: refused, its samples would carry the test subjects."""
    if seen:
        raise BadInputError("--utility tests on held-out subjects, and this run was trained on all subjects: its "
                            "samples would carry the test subjects (train-vqvae --holdout F leaves subjects out)")


def utility_check(real_of: Callable[[int, int], torch.Tensor],
                  synthetic_of: dict[str, Callable[[int, int], torch.Tensor]], classes: list[int], n: int,
                  test: tuple[torch.Tensor, torch.Tensor], cfg: ClassifierConfig, steps: int, device) -> list[dict]:
    """One row per training set: real, then synthetic and real + synthetic from each source of `synthetic_of`
    ({"w=3": samples at guidance 3}, {"the set": a sample set's}). real_of(c, n): n real training images of class c
    (fewer if it has fewer); synthetic_of[name](c, n): n synthetic images of class c."""
    sets = {"real": per_class(real_of, classes, n)}
    for name, images_of in synthetic_of.items():
        synthetic = per_class(images_of, classes, n)
        sets[f"synthetic, {name}"] = synthetic
        sets[f"real + synthetic, {name}"] = tuple(torch.cat(pair) for pair in zip(sets["real"], synthetic))
    rows = []
    for name, (images, labels) in sets.items():
        runs = [scores(fit_classifier(images, labels, cfg, steps, device, seed), *test, cfg.num_classes, device)
                for seed in range(UTILITY_SEEDS)]
        row = {"training set": name, "images": len(images), "per_class": torch.bincount(labels).tolist()}
        for key in ("accuracy", "auc"):
            values = torch.tensor([r[key] for r in runs])
            row[key], row[f"{key}_std"] = values.mean().item(), values.std().item()
        rows.append(row)
    return rows


def condition_utility(real: tuple[torch.Tensor, torch.Tensor], generate: Callable[[torch.Tensor, float], torch.Tensor],
                      guidance: list[float], test: tuple[torch.Tensor, torch.Tensor], conditions: list[Condition],
                      steps: int, device, classes: int | None = None,
                      drawn: tuple[torch.Tensor, torch.Tensor] | None = None) -> list[dict]:
    """One row per table condition and training set (real, then synthetic and real + synthetic at each guidance
    scale, or of a sample set): the condition network trained UTILITY_SEEDS times on it, read back from the held-out
    `test` (images, y). real: (images, y (N, K)) of real training slices; generate(y, w): samples at those values, at
    scale w; or `drawn`, a set's own (images, y) at the values each was drawn at. `class` and the condition `classes`
    (a table column of the class folders) are the classifier's rows; a condition that fewer than 2 held-out images
    have a value of is not read back (said so), and none: no rows, nothing trained; one whose held-out images all have
    one value is read back with a warning of what its measure then means."""
    checked = []
    for k, c in enumerate(conditions):
        if c.name != CLASS and k != classes:
            values = test[1][~test[1][:, k].isnan(), k]
            if len(values) < 2:
                print(f"warning: --utility: {len(values)} held-out images have a value of {c.name}; it is not read "
                      f"back")
                continue
            checked.append(k)
            if len(values.unique()) == 1:  # read back against one value, the measure means something else
                print(f"warning: --utility: every held-out image with a value of {c.name} has the same one "
                      f"({c.decode(float(values[0]))}): " + (
                          "its r is undefined, and the MAE says how close the readings come to it" if c.kind ==
                          "continuous" else "'recognised' is the share read as it, which a reader that always says "
                                            "it would score 100%"))
    if not checked:
        return []
    images, y = real
    sets = {"real": (images, y)}
    synthetic = {f"w={w:g}": (generate(y, w), y) for w in guidance}
    if drawn is not None:
        synthetic["the set"] = drawn
    for name, (x, values) in synthetic.items():
        sets[f"synthetic, {name}"] = (x, values)
        sets[f"real + synthetic, {name}"] = (torch.cat([images, x]), torch.cat([y, values]))
    rows = []
    for name, (x, targets) in sets.items():
        nets = [train_condition_net(TensorDataset(x), list(range(len(x))), targets, conditions, min(x.shape[-1], 128),
                                    x.shape[1], steps, device, seed) for seed in range(UTILITY_SEEDS)]
        for k in checked:
            c, given = conditions[k], ~test[1][:, k].isnan()
            truth = c.in_units(test[1][given, k])
            row = {"condition": c.name, "training set": name, "images": int((~targets[:, k].isnan()).sum()),
                   "tested": int(given.sum())}
            if not row["images"]:  # a set drawn without it (--set age=60 alone): its head learned nothing
                rows.append(row)
                continue
            runs = [agreement(read_back(net, test[0][given], conditions, k, device), truth, c) for net in nets]
            for key in runs[0]:
                values = torch.tensor([r[key] for r in runs])
                row[key], row[f"{key}_std"] = values.mean().item(), values.std().item()
            rows.append(row)
    return rows


def format_condition_utility_table(rows: list[dict]) -> str:
    def cell(r, key, form):
        return f"{r[key]:{form}} ± {r[key + '_std']:{form}}" if key in r and r[key] == r[key] else ""
    lines = ["| condition | trained on | images | tested on | r | MAE | recognised |", "|---|---|---|---|---|---|---|"]
    lines += [f"| {r['condition']} | {r['training set']} | {r['images']} | {r['tested']} | {cell(r, 'r', '.3f')} | "
              f"{cell(r, 'mae', '.3g')} | {cell(r, 'recognised', '.1%')} |" for r in rows]
    return "\n".join(lines)


def format_utility_table(rows: list[dict]) -> str:
    lines = ["| classifier trained on | images | accuracy on held-out subjects | AUC |", "|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['training set']} | {r['images']} | {r['accuracy']:.1%} ± {r['accuracy_std']:.1%} | "
                     f"{r['auc']:.3f} ± {r['auc_std']:.3f} |")
    return "\n".join(lines)


# ----------------------------------------------------------------------------- where the synthetic images come from

def class_column(model, classes: list[str], run: Path) -> int | None:
    """The condition that names the data's class folders, for --utility: `class` (train-unet --conditional), else a
    category of the participants table with those values (a `group` column of AD and NC); None where there is none
    but the run has table conditions, which --utility checks alone."""
    table_conditions = [c.name for c in model.conditions if c.name != CLASS]
    if len(classes) < 2 and table_conditions:
        return None
    if len(classes) < 2:  # a BIDS tree, or one class folder: a diagnosis in the table is not the data's classes
        raise BadInputError(f"--utility trains a classifier of the data's classes, and {'/'.join(classes)} is one "
                            "class (a BIDS tree is one, unless train-vqvae --class-column names its diagnosis)")
    for k, c in enumerate(model.conditions):
        if c.name == CLASS or (c.kind == "category" and set(classes) <= set(c.values)):
            if c.name != CLASS:
                print(f"--utility: the run's condition {c.name!r} names the class folders ({', '.join(classes)})")
            if not set(classes) <= set(c.values):
                raise BadInputError(f"the run's classes {c.values} differ from those of the data: {classes}")
            return k
    if table_conditions:
        print(f"--utility: no condition of this run names the class folders ({'/'.join(classes)}; train-unet "
              f"--conditional): the table's conditions are checked alone")
        return None
    raise BadInputError(f"--utility trains the {'/'.join(classes)} classifier on samples of each class, and "
                        f"{run / 'unet.pt'} was trained without --conditional (nor on a table column of those classes)")


def run_samples_of(args, model, column: int, settings, classes: list[str], autocast
                   ) -> dict[str, Callable[[int, int], torch.Tensor]]:
    """The run's own samples of each class at each --guidance scale above 0, drawn with condition `column` set to the
    class (the others left open)."""
    def generate(c, n, w):
        y = torch.full((len(model.conditions),), math.nan)
        y[column] = float(model.conditions[column].values.index(classes[c]))
        torch.manual_seed(args.seed + c)
        return predict.generate(model, settings, n, y.expand(n, -1), w, autocast)[0]

    return {f"w={w:g}": (lambda c, n, w=w: generate(c, n, w)) for w in args.guidance if w > 0}


def set_samples_of(samples: torch.Tensor, labels: list[int], seed: int
                   ) -> dict[str, Callable[[int, int], torch.Tensor]]:
    """A --samples set's own images of each class (`set_labels`), n of them picked at random (seeded)."""
    labels = torch.tensor(labels)

    def of_class(c, n):
        mine = (labels == c).nonzero().flatten()
        return samples[mine[torch.randperm(len(mine), generator=torch.Generator().manual_seed(seed + c))[:n]]]

    return {"the set": of_class}
