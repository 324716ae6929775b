"""`python driver.py evaluate --run RUN`: how faithful, realistic and varied a trained run is, in numbers.

    python driver.py evaluate --run RUN                   # samples from the run's UNet, as `driver.py sample`
    python driver.py evaluate --run RUN --samples DIR     # score images generated elsewhere
    python driver.py evaluate --run RUN --class all --guidance 0,1,3   # a --conditional run, per class and scale

A run with only its stage 1 (no unet.pt yet) is scored without the samples row: its VQ-VAE's fidelity and the
finest bands it keeps can be judged before stage 2 is trained on it.

Whole subjects are held out (the run's own split if train-vqvae had --holdout, else --holdout here, in
which case the run has seen them and the report says so). The held-out subjects are split at random
into two halves: A is the reference, B the real-vs-real floor. Every row is scored against A with the
same number of images as B, so a row's distance from the floor is what the model loses:

    samples           the run's generated images (or --samples DIR)
    reconstructions   B through the VQ-VAE: the best stage 2 could do with this stage 1
    real (training)   random training images: a model that learned the training set exactly scores this
    real (floor)      B itself

Slices of one subject are alike, so B (a few subjects) can sit further from A than independent draws
from many subjects do: read FID/KID against the training row as well as against the floor.

With --class (a run trained with --conditional), every requested class is scored on its own: its held-out
subjects are halved into A and B as above, and for each guidance scale the class's samples are scored
against its A. The AD/NC classifier (trained on the training subjects, RUN/classifier.pt) reports how
often it recognises the class: on the held-out real images of the class (what it can do at best) and on
each set of samples.

A run conditioned on a participants table (train-unet --condition) is also checked condition by condition: each one is
read back from samples generated at held-out subjects' values, against the same reading of those subjects' real
slices (evaluation/conditions.py).

Writes RUN/metrics.json, RUN/report.md and the images it shows (grids, and full-resolution crops of real,
reconstructed and generated slices); prints the tables, one of them SWD per pyramid level from the run's
resolution down to 16 px. FID/KID features see at most 128x128 with the domain classifier (299 with Inception).
"""
from __future__ import annotations

import hashlib
import os
import re
from collections import Counter
from dataclasses import replace
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from torch.utils.data import DataLoader, Subset

import predict
from conditions.participants import saved_table
from conditions.table import CLASS
from dataset import load_slices
from evaluation.metrics import (ClassifierFeatures, SetScorer, inception_or_none, ms_ssim_diversity,
                                reconstruction_metrics, sliced_wasserstein)
from evaluation.classifier import ClassifierConfig, class_accuracy, domain_classifier
from evaluation.conditions import condition_check, condition_values, set_conditions
from evaluation.ema_lengths import ema_length_curve, plot_ema_curve, refuse_unready
from evaluation.memorisation import kept_samples, memorisation_check, withhold_flagged
from evaluation.report import (CROP_SIZE, METRICS_ORDER, REPORT_ORDER, class_section, condition_section,
                               condition_utility_section, ema_section, format_level_table, format_table,
                               memorisation_section, save_crops, swd_levels, utility_section)
from evaluation.sample_folder import cohort_from, folder_record, read_folder, refuse_another_runs_set, sample_set_folder
from evaluation.utility import (UTILITY_SEEDS, class_column, condition_utility, images_per_class, in_class_folders,
                                kept_for_utility, refuse_seen, run_samples_of, set_labels, set_samples_of,
                                utility_check)
from export.figures import save_png
from export.card import record_checks
from export.sample_set import MANIFEST, SETTINGS
from runtime.checkpoint import atomic_write, fingerprint, json_text
from runtime.errors import BadInputError
from runtime.models import load_run, load_vqvae
from runtime.process import setup_device
from volumes.holdout import split_by_subject, subjects_by_class
from volumes.layouts import subject_id

STAGE1_RECONSTRUCTIONS = "reconstructions, stage 1's decoder"  # the row beside a fine-tuned decoder's


# ----------------------------------------------------------------------------- data

def evaluation_split(paths: list[str], holdout: float, seed: int, subject: Callable[[str], str] = subject_id,
                     labels: list[str] | None = None,
                     listing: tuple | None = None) -> tuple[list[int], list[int], list[int]]:
    """(train, reference A, floor B) indices: whole subjects only; A and B are a random halving of the held-out subjects.
    subject: whose each path is, by the run's own rules (`DataConfig.subject()`).
    labels: each path's class name (layout version 5, `DataConfig.strata`): both splits are drawn within classes.
    listing: (paths, labels) of every file listed, readable or not (version 6, `DataConfig.listing`): both are drawn
    from it, and `paths` split by whose they are."""
    drawn, drawn_labels = listing if listing is not None else (paths, labels)
    train_idx, held_idx = split_by_subject(drawn, holdout, seed, subject, drawn_labels)
    a, b = halves(drawn, held_idx, seed + 1, subject=subject, labels=drawn_labels)
    if listing is None:
        return train_idx, a, b
    half_a, half_b = {subject(drawn[i]) for i in a}, {subject(drawn[i]) for i in b}
    owners = [subject(p) for p in paths]
    return ([i for i, s in enumerate(owners) if s not in half_a | half_b],
            [i for i, s in enumerate(owners) if s in half_a], [i for i, s in enumerate(owners) if s in half_b])


def run_split(data, dataset, holdout: float | None = None,
              seed: int | None = None) -> tuple[list[int], list[int], list[int]]:
    """`evaluation_split` of `dataset`, read from the data config `data`, by the run's rules (its subjects, classes
    and listing); `holdout` and `seed` the run's unless given (a run that held none out)."""
    return evaluation_split([p for p, _ in dataset.samples], data.holdout if holdout is None else holdout,
                            data.holdout_seed if seed is None else seed, data.subject(),
                            data.strata(dataset.samples, dataset.classes), data.listing())


def halves(paths: list[str], indices: list[int], seed: int, what: str = "", subject: Callable[[str], str] = subject_id,
           labels: list[str] | None = None) -> tuple[list[int], list[int]]:
    """The images `indices` split into two halves of their subjects, at random (seeded). With `labels`, each class's
    subjects are dealt to the halves in turn, so that the halves' class mixes differ by one subject at most."""
    owners = {i: subject(paths[i]) for i in indices}
    subjects = sorted(set(owners.values()))
    if len(subjects) < 2:
        raise BadInputError(f"only {len(subjects)} held-out subject{what}; evaluation needs 2 or more (raise --holdout)")
    rng = np.random.default_rng(seed)
    if labels is None:
        half_a = set(rng.permutation(subjects)[:len(subjects) // 2].tolist())
    else:
        groups = subjects_by_class(list(owners.values()), [labels[i] for i in indices])
        half_a = set([s for group in groups.values() for s in rng.permutation(group).tolist()][1::2])
    return [i for i in indices if owners[i] in half_a], [i for i in indices if owners[i] not in half_a]


def class_mix(dataset, indices: list[int]) -> dict[str, int]:
    """{class: images} of dataset[indices]. Runs of layout version 5 draw the halves within classes; earlier ones by
    subject alone, so that their mixes may differ (on the ADNI subset's split: NC 40% of A, 75% of B), and part of
    the floor's distance is then a class shift."""
    counts = Counter(dataset.samples[i][1] for i in indices)
    return {name: counts[k] for k, name in enumerate(dataset.classes)}


def training_sample(train_idx: list[int], count: int, seed: int) -> list[int]:
    """A seeded random `count` of the training images: what a model that learned the training set exactly would score."""
    g = torch.Generator().manual_seed(seed)
    return [train_idx[i] for i in torch.randperm(len(train_idx), generator=g)[:count].tolist()]


def stack(dataset, indices: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """(images (N, C, H, W), labels (N,)) of dataset[indices]."""
    xs, ys = zip(*(batch for batch in DataLoader(Subset(dataset, indices), batch_size=256)))
    return torch.cat(xs), torch.cat(ys)


# ----------------------------------------------------------------------------- feature network

def feature_key(data, dataset, train_idx: list[int], holdout: float, holdout_seed: int) -> dict:
    """What a run's cached feature networks (RUN/classifier.pt, condition_net.pt) were trained on, which must equal
    this split's: the data, the image size and the images trained on (each file, and slice of a volume, hashed:
    another split of as many images, by other subject rules or slicing, would know held-out subjects)."""
    slices = getattr(dataset, "slice_numbers", None) or [0] * len(dataset.samples)
    trained = "\n".join(sorted(f"{dataset.samples[i][0]}|{slices[i]}" for i in train_idx))
    return {"data": str(data.folder()), "image_size": data.image_size, "channels": data.channels, "holdout": holdout,
            "holdout_seed": holdout_seed, "count": len(dataset.samples),
            "training": hashlib.sha1(trained.encode()).hexdigest()}


def feature_network(run: Path, dataset, train_idx: list[int], key: dict, device, kind: str = "auto",
                    inception_weights: str | None = None, classifier_steps: int = 1000):
    """Inception-v3 when asked for (kind 'inception') or available ('auto'), else the domain classifier's features."""
    if kind in ("auto", "inception"):
        net = inception_or_none(inception_weights)
        if net is not None:
            return net.to(device)
        if kind == "inception":
            raise BadInputError("--features inception: the Inception-v3 weights could not be loaded "
                                "(no internet? pass --inception-weights FILE)")
    classifier = domain_classifier(run, dataset, train_idx, key, classifier_steps, device)
    return ClassifierFeatures(classifier, classifier_steps).to(device)


def remove_stale_figures(out: Path, earlier: str, report: str):
    """The eval_* files the `earlier` report.md in the same folder showed or named and the new `report` does not (an
    earlier run's eval_samples.png beside the report of a stage 1 alone), removed once the new report and metrics.json
    are whole; no other file (one of the user's own named eval_*, in the run folder) is touched."""
    named = lambda text: set(re.findall(r"eval_[\w.-]+?\.(?:png|csv)", text))  # noqa: E731
    for name in named(earlier) - named(report):
        (out / name).unlink(missing_ok=True)


# ----------------------------------------------------------------------------- scoring

def score_rows(rows: dict[str, torch.Tensor], reference: torch.Tensor, features, device) -> dict[str, dict]:
    """Every metric of every row of images against the reference set (same features, same patches)."""
    scorer = SetScorer(features, reference, device)
    return {name: {**scorer(images), **sliced_wasserstein(images, reference),
                   "ms_ssim": ms_ssim_diversity(images, device=device), "count": len(images)}
            for name, images in rows.items()}


SEEDED_ONCE = "manual_seed(seed), then every batch in turn"  # metrics.json's batch_seeds (a sample set: each batch)


# ----------------------------------------------------------------------------- per class, per guidance scale

def class_scores(args, dataset, train_idx: list[int], held_idx: list[int], classes: list[int], generate, classifier,
                 features, device, seed: int, subject: Callable[[str], str] = subject_id) -> tuple[list[dict], torch.Tensor]:
    """Each class in `classes` against its own held-out subjects, for each guidance scale in args.guidance.

    `generate(c, num, guidance)` samples num images of class c. Returns one dict per table row
    (class, images, count, recognised = the classifier's accuracy for that class, metrics) and a grid
    of 8 samples per (class, scale). `subject`: whose each image is, by the run's own rules.
    """
    paths = [p for p, _ in dataset.samples]
    rows, grid = [], []
    for c in classes:
        name = dataset.classes[c]
        ref_idx, floor_idx = halves(paths, [i for i in held_idx if dataset.labels[i] == c], seed + 1, f" of class {name}",
                                    subject)
        reference, _ = stack(dataset, ref_idx)
        floor, _ = stack(dataset, floor_idx)
        training, _ = stack(dataset, training_sample([i for i in train_idx if dataset.labels[i] == c], len(floor), seed))
        num = args.num or len(floor)
        sets = {f"samples, w={w:g}": generate(c, num, w) for w in args.guidance}
        sets.update({"real (training)": training, "real (floor)": floor})
        scores = score_rows(sets, reference, features, device)
        recognised = {key: class_accuracy(classifier, images, torch.full((len(images),), c), device)
                      for key, images in sets.items()}
        recognised["real (held out)"] = class_accuracy(classifier, torch.cat([reference, floor]),
                                                       torch.full((len(reference) + len(floor),), c), device)
        rows += [{"class": name, "images": key, "count": len(images), "recognised": recognised[key], **scores[key]}
                 for key, images in sets.items()]
        rows.append({"class": name, "images": "real (held out)", "count": len(reference) + len(floor),
                     "recognised": recognised["real (held out)"]})
        grid += [images[:8] for key, images in sets.items() if key.startswith("samples")]
    return rows, torch.cat(grid)


def utility(synthetic_of: dict[str, Callable[[int, int], torch.Tensor]], dataset, train_idx: list[int],
            test: tuple[torch.Tensor, torch.Tensor], per_class: int, steps: int, device, seed: int) -> list[dict]:
    """`--utility N`: the rows of evaluation/utility.py, per_class images of each class (images_per_class) of the
    training subjects' and of each synthetic source (`run_samples_of`, `set_samples_of`)."""
    def real_of(c, n):
        return stack(dataset, training_sample([i for i in train_idx if dataset.labels[i] == c], n, seed))[0]

    cfg = ClassifierConfig(in_channels=test[0].shape[1], input_size=min(test[0].shape[-1], 128),
                           num_classes=len(dataset.classes))
    return utility_check(real_of, synthetic_of, list(range(len(dataset.classes))), per_class, test, cfg, steps, device)


def evaluate(args):
    """`driver.py evaluate`: the run's held-out subjects halved into a reference A and a floor B; the samples (the
    run's, or --samples), B's reconstructions, training images and B scored against A; then the optional parts
    (memorisation, --ema-lengths, --class, --utility, the conditions read back); metrics.json, report.md and the
    figures into --out (default: the run folder)."""
    run, out = Path(args.run), Path(args.out or args.run)
    if args.classifier_steps < 0:
        raise BadInputError(f"--classifier-steps must be 0 or more, got {args.classifier_steps}")
    if not 0 < args.holdout < 1:
        raise BadInputError(f"--holdout must be in (0, 1), got {args.holdout}")
    if args.class_name is not None and args.samples:
        raise BadInputError("--class scores the run's own conditional samples; it cannot be used with --samples")
    if args.num is not None and args.samples:
        raise BadInputError("--num sets how many samples evaluate draws; --samples scores every image of its folder")
    if args.utility is not None and (args.utility < 1 or (max(args.guidance) <= 0 and not args.samples)):
        raise BadInputError(f"--utility N trains on N >= 1 of the run's own samples (per class, and for the table's "
                            f"conditions), at the --guidance scales above 0, or of the --samples set's (got --utility "
                            f"{args.utility}, --guidance {args.guidance})")
    if args.ema_lengths:
        refuse_unready(run, args.samples)
    screened = sample_set_folder(Path(args.samples)) if args.samples else None
    if args.withhold_flagged and not screened:
        raise BadInputError("--withhold-flagged leaves the samples the memorisation check flags out of a sample set: "
                            "give the set, as `sample --out DIR` wrote it, with --samples DIR")
    if args.withhold_flagged and not (screened / MANIFEST).is_file():  # sample_files would read it as any folder
        raise BadInputError(f"{screened} has no {MANIFEST} (a set stopped as it began): finish it with the same "
                            f"`sample` command and --resume, then withhold")
    if args.withhold_flagged:
        refuse_another_runs_set(screened, run)
    if screened and out.resolve().is_relative_to(screened.resolve()):
        raise BadInputError(f"--out {out} is inside the sample set {screened}: evaluate's figures show real held-out "
                            f"scans and its tables name training images, which would go wherever the set goes; put "
                            f"it elsewhere")
    device, autocast = setup_device(args.device)
    data = args.data_config  # stage 1's, resolved by driver.py
    data.refuse_inside(out, "--out" if args.out else "the run folder, the output's by default,")
    image_size, channels = data.image_size, data.channels
    samples, names = read_folder(Path(args.samples), image_size, channels) if args.samples else (None, None)

    # data: the run's held-out subjects, halved into reference A and floor B
    dataset = load_slices(data.folder(), image_size, channels, args.cache_gb, disk_cache=run,  # training's cache
                          skip_bad=data.skip_bad_images, slicing=data.slicing, layout=data.layout)
    subject = data.subject()  # the run's own rules: others could score it on subjects it trained on
    seen = data.holdout == 0
    holdout, seed = (args.holdout, args.holdout_seed) if seen else (data.holdout, data.holdout_seed)
    if seen and args.withhold_flagged:
        raise BadInputError(f"--withhold-flagged: {run} was trained on every subject, and the memorisation check needs "
                            f"subjects it never saw (train-vqvae --holdout F)")
    if seen:
        print(f"warning: {run} was trained on all subjects; the {holdout:.0%} held out here were seen in training, "
              f"so the figures are optimistic (train-vqvae --holdout F leaves subjects out)")
    train_idx, ref_idx, floor_idx = run_split(data, dataset, holdout, seed)
    for name, count in (("held-out half A", len(ref_idx)), ("held-out half B", len(floor_idx)),
                        ("--samples folder", None if samples is None else len(samples))):
        if count is not None and count < 2:  # a half's subjects may have no readable file (--skip-bad-images)
            raise BadInputError(f"the {name} has {count} image(s), and FID and KID need 2 or more"
                                + ("" if name == "--samples folder" else " (a larger --holdout at training time)"))
    reference, ref_labels = stack(dataset, ref_idx)
    floor, floor_labels = stack(dataset, floor_idx)
    training, _ = stack(dataset, training_sample(train_idx, len(floor_idx), seed))
    paths = [p for p, _ in dataset.samples]
    n_subjects = min(len({subject(paths[i]) for i in ref_idx}), len({subject(paths[i]) for i in floor_idx}))
    print(f"evaluation: {len(train_idx)} training images, held out {len(ref_idx)} reference (A) + {len(floor_idx)} floor (B)")
    mix = {"training": class_mix(dataset, train_idx), "reference": class_mix(dataset, ref_idx),
           "floor": class_mix(dataset, floor_idx)}
    if len(dataset.classes) > 1:
        print("classes: " + "; ".join(f"{part} " + ", ".join(f"{name} {n}" for name, n in counts.items())
                                      for part, counts in mix.items()))
    few = n_subjects < 10
    if few:  # measured on the demo data: 2 subjects per half ranked low-variety samples above real training images
        print(f"warning: only {n_subjects} subjects in a held-out half; FID/KID of so few subjects reward low variety "
              f"and are not reliable (raise --holdout at training time)")

    # stage 1: reconstructions of B; where a fine-tuned decoder makes them, stage 1's own too, whose PSNR it trades
    finetuned = args.decoder == "fine-tuned"
    vqvae, vq_ckpt = load_vqvae(run, device, finetuned)
    stage1_decoder = {}
    with autocast:
        vq_metrics, recons = reconstruction_metrics(vqvae, floor, device=device)
        if "decoder" in vq_ckpt:
            stage1_metrics, stage1_decoder[STAGE1_RECONSTRUCTIONS] = reconstruction_metrics(
                load_vqvae(run, device, finetuned=False)[0], floor, device=device)

    # samples: read, generated with the run's UNet, or none for a run that has only its stage 1 yet
    stage1_only, sampling = samples is None and not (run / "unet.pt").exists(), {}
    column = y = drawn = set_classes = None  # the condition naming the classes (--utility), every image's conditions
    conditions, set_utility = [], {}  # (a table's), the run's, a set's images' own (`set_values`), its classes
    if stage1_only:
        for flag, given in (("--class", args.class_name), ("--utility", args.utility)):
            if given is not None:
                raise BadInputError(f"{flag} scores the run's samples, and {run / 'unet.pt'} does not exist "
                                    "(train-unet first)")
        print(f"no {run / 'unet.pt'}: scoring stage 1 alone (its reconstructions of B against the real rows)")
    elif samples is not None:
        sampling = {"from": str(args.samples), **folder_record(Path(args.samples))}
        found = set_conditions(args, run, dataset, screened, names) if screened and (run / "unet.pt").exists() else None
        if found:  # the values a set's images were drawn at, to read back
            conditions, participants, y, drawn = found
        if args.utility is not None:  # train on the set itself, test on real: checked before anything is scored
            per_class = images_per_class(args.utility, list(dataset.classes), [dataset.labels[i] for i in train_idx],
                                         [dataset.labels[i] for i in ref_idx + floor_idx], seen)
            if found and not in_class_folders(names, list(dataset.classes)):  # a table's conditions alone
                print(f"--utility: the set's images are in no class folders of {'/'.join(dataset.classes)}: the "
                      f"classifier of the classes is not trained on it, the table's conditions are")
            else:
                set_classes = set_labels(names, list(dataset.classes), args.samples)
        if len(sampling) == 1:
            print(f"{args.samples} is not a sample set (no {SETTINGS}): how its images were drawn is not recorded")
        elif sampling.get("vqvae_fingerprint") not in (None, fingerprint(vq_ckpt["model"])):
            print(f"warning: the samples in {args.samples} were drawn with another VQ-VAE than {run}'s; they are "
                  f"scored against this run's held-out subjects")
    else:
        num = args.num or len(floor)  # as many as the floor half: FID's bias depends on the count
        if num < 2:
            raise BadInputError(f"--num must be 2 or more for FID/KID, got {num}")
        model = load_run(run, device, finetuned)
        # the run's participants table, found (or refused in one line) before anything is sampled
        participants = saved_table(model.labels, data.folder(), args.labels) if model.labels else None
        settings = predict.sampling_from_args(args, model)
        asked = predict.asked_rows(model, run, class_name=args.class_name)  # the classes asked for, checked
        column = class_column(model, list(dataset.classes), run) if args.utility is not None else None
        if column is not None:
            per_class = images_per_class(args.utility, list(dataset.classes), [dataset.labels[i] for i in train_idx],
                                         [dataset.labels[i] for i in ref_idx + floor_idx], seen)
        elif args.utility is not None:
            refuse_seen(seen)
        conditions = model.conditions
        y = (condition_values(args, conditions, model.labels, participants, dataset)
             if any(c.name != CLASS for c in conditions) else None)
        if asked is not None and model.classes != list(dataset.classes):
            raise BadInputError(f"the run's classes {model.classes} differ from those of {data.folder()}: {dataset.classes}")
        torch.manual_seed(args.seed)
        samples, _, seconds = predict.generate(model, settings, num, autocast=autocast)
        settings = replace(settings, batch_size=predict.batch_size_of(settings, device))  # as recorded, resolved
        sampling = {**predict.generation_record(model, settings), "seed": args.seed, "seconds_per_image": seconds / num,
                    "batch_seeds": SEEDED_ONCE}

    # features and scores
    key = feature_key(data, dataset, train_idx, holdout, seed)
    features = feature_network(run, dataset, train_idx, key, device, args.features, args.inception_weights,
                               args.classifier_steps)
    print(f"FID/KID features: {features.name}")
    if isinstance(features, ClassifierFeatures) and len(dataset.classes) > 1:  # how much the features know of AD/NC
        classifier_acc = class_accuracy(features.classifier, torch.cat([reference, floor]),
                                        torch.cat([ref_labels, floor_labels]), device)
    else:
        classifier_acc = None
    generated = {} if stage1_only else {"samples": samples}
    scores = score_rows({**generated, "reconstructions": recons, **stage1_decoder, "real (training)": training,
                         "real (floor)": floor}, reference, features, device)
    table, level_table = format_table(scores), format_level_table(scores)

    # the optional parts, each a Section of metrics.json, report.md and the printout (and its figure, written here)
    out.mkdir(parents=True, exist_ok=True)
    sections = {}
    if not stage1_only and not seen:  # are the samples copies of training images?
        owners = tuple([subject(paths[i]) for i in idx] for idx in (ref_idx, floor_idx, train_idx))
        memorisation, closest, each = memorisation_check(samples, reference, floor, dataset, train_idx, features,
                                                         device, names, owners)
        if set_classes is not None and args.utility is not None:  # what the set keeps to train on, refused before
            # it withholds
            kept, per_class = kept_for_utility(each, set_classes, len(dataset.classes), per_class,
                                               args.withhold_flagged)
        if args.withhold_flagged:  # the set changes: its checks.json and card say so at once (export/card.py)
            memorisation["withheld"] = withhold_flagged(screened, each, run)
            record_checks(screened, memorisation, None, run)
        sections["memorisation"] = memorisation_section(memorisation, closest, each, out)
    elif seen:  # its yardstick, subjects the run never saw, is missing, and copies of theirs would go unflagged
        print(f"memorisation: not checked, {run} was trained on every subject (train-vqvae --holdout F)")

    def draw(num, y=None, guidance=1.0, weights=None):
        """`num` samples of the run's UNet (or of `weights`, a post-hoc EMA), from the seed of the samples row."""
        torch.manual_seed(args.seed)
        return predict.generate(model if weights is None else weights, settings, num, y, guidance, autocast)[0]

    if args.ema_lengths:  # post-hoc EMA lengths: each one's samples, drawn and scored as the samples row
        curve = ema_length_curve(run, args.ema_lengths, model, lambda weights: draw(num, weights=weights),
                                 lambda rows: score_rows(rows, reference, features, device))
        plot_ema_curve(curve, scores["samples"], {k: v for k, v in scores.items() if k.startswith("real")},
                       out / "eval_ema_lengths.png")
        sections["ema"] = ema_section(curve, scores["samples"], run)
    if args.class_name is not None:  # per class and guidance scale, with the AD/NC classifier's verdict
        classifier = (features.classifier if isinstance(features, ClassifierFeatures)
                      else domain_classifier(run, dataset, train_idx, key, args.classifier_steps, device))
        wanted = {int(y[[c.name for c in model.conditions].index(CLASS)]): y for _, y in asked}  # class -> conditions
        rows, grid = class_scores(args, dataset, train_idx, ref_idx + floor_idx, list(wanted),
                                  lambda c, n, w: draw(n, wanted[c].expand(n, -1), w), classifier, features, device,
                                  seed, subject)
        save_png(grid, out / "eval_classes.png", nrow=8, normalize=True, value_range=(-1, 1))
        sections["class"] = class_section(rows, args.guidance)
    read_back = None  # a set's own images read back at the values each was drawn at (those it keeps), for its card
    keeps = []  # the set's images it keeps: all but those --withhold-flagged left out
    if drawn is not None:
        keeps = list(range(len(samples))) if seen else kept_samples(each, args.withhold_flagged)
    if drawn is not None and not drawn[keeps][:, [c.name != CLASS for c in conditions]].isnan().all():
        rows, _ = condition_check(args, run, conditions, participants, y, dataset, train_idx, ref_idx + floor_idx,
                                  key, device, out, drawn=(samples[keeps], drawn[keeps]))
        sections["conditions"] = condition_section(rows, [], [sampling.get("guidance")], args.samples)
        read_back = {"rows": rows, "table": sections["conditions"].printed}
        if args.withhold_flagged:
            record_checks(screened, memorisation, None, run, read_back)
    elif drawn is not None:
        print("no image the set keeps was drawn at a value of the table's conditions: they are not read back")
    test = (torch.cat([reference, floor]), torch.cat([ref_labels, floor_labels]))  # every held-out image
    test_y = (test[0], y[ref_idx + floor_idx]) if y is not None else None  # ... with its table's conditions
    if column is not None:  # train on synthetic, test on real: the AD/NC classifier learns from samples
        rows = utility(run_samples_of(args, model, column, settings, list(dataset.classes), autocast), dataset,
                       train_idx, test, per_class, args.classifier_steps, device, seed)
        sections["utility"] = utility_section(rows, per_class, args.utility)
    if set_classes is not None and args.utility is not None:  # ... from the set itself, less what it withheld now
        rows = utility(set_samples_of(samples[kept], [set_classes[k] for k in kept], seed), dataset, train_idx, test,
                       per_class, args.classifier_steps, device, seed)
        sections["utility"] = utility_section(rows, per_class, args.utility, args.samples, args.withhold_flagged)
        set_utility = {"per_class": per_class, "seeds": UTILITY_SEEDS, "rows": rows, "classes": list(dataset.classes),
                       "table": sections["utility"].printed}  # for the set's card
    if args.utility is not None and y is not None:  # and the table's conditions, from samples at real slices'
        # values, or from the set's own images at theirs
        checked = [c.name != CLASS and k != column for k, c in enumerate(conditions)]  # the table's, not classes
        given = [i for i in train_idx if not y[i, checked].isnan().all()]
        real = training_sample(given, args.utility, seed)
        if args.samples:  # as many real images as the set has with a value, at most N
            picked = training_sample([k for k in keeps if not drawn[k, checked].isnan().all()], args.utility, seed)
            real, picked = real[:len(picked)], picked[:len(real)]
            rows = condition_utility((stack(dataset, real)[0], y[real]), None, [], test_y, conditions,
                                     args.classifier_steps, device, drawn=(samples[picked], drawn[picked])
                                     ) if picked else []
        else:
            rows = condition_utility((stack(dataset, real)[0], y[real]), lambda v, w: draw(len(v), v, w),
                                     [w for w in args.guidance if w > 0], test_y, conditions, args.classifier_steps,
                                     device, column)
        if rows:
            sections["utility_conditions"] = condition_utility_section(
                rows, len(real), args.samples, bool(args.samples) and cohort_from(Path(args.samples)) == "held-out")
            set_utility["conditions_table"] = sections["utility_conditions"].printed  # (a set's card)
    if args.utility is not None and args.samples and args.withhold_flagged and set_utility:  # onto the set's card
        record_checks(screened, memorisation, set_utility, run, read_back)
    if y is not None and samples is not None and not args.samples:  # drawn here
        # each condition from the participants table, read back from samples generated at held-out subjects' values
        rows, sweeps = condition_check(args, run, conditions, participants, y, dataset, train_idx,
                                       ref_idx + floor_idx, key, device, out, lambda v, w: draw(len(v), v, w))
        sections["conditions"] = condition_section(rows, sweeps, args.guidance)

    # files
    grids = {"real": floor, "reconstructions": recons, **generated}
    for name, images in grids.items():
        save_png(images[:64], out / f"eval_{name}.png", nrow=8, normalize=True, value_range=(-1, 1))
    crop = min(CROP_SIZE, image_size)
    n_crops = save_crops([floor, recons, *generated.values()], crop, out / "eval_crops.png")
    metrics = {"run": str(run.resolve()), "data": os.path.abspath(data.folder()), "image_size": image_size,
               "channels": channels,
               "split": {"holdout": holdout, "seed": seed, "seen_in_training": seen, "subjects_per_half": n_subjects,
                         "train": len(train_idx),
                         "reference": len(ref_idx), "floor": len(floor_idx), "class_mix": mix},
               "vqvae_step": vq_ckpt["step"], "vqvae_fingerprint": fingerprint(vq_ckpt["model"]),
               "vqvae": {**vq_metrics, "images": "floor half B"},
               "finetuned_decoder": vq_ckpt.get("decoder"),  # RUN/decoder.pt (train-decoder): its step and fingerprint
               **({"vqvae_stage1_decoder": {k: stage1_metrics[k] for k in ("psnr", "ssim")}} if stage1_decoder else {}),
               "sampling": sampling, "features": features.name, "features_input_size": features.input_size,
               "classifier_heldout_accuracy": classifier_acc, "scores": scores,
               "swd_per_level": {name: {str(r): s[f"swd_{r}"] for r in swd_levels(scores)} for name, s in scores.items()},
               "crops": {"file": "eval_crops.png", "size": crop, "per_row": n_crops,
                         "rows": ["real (B)", "reconstructions of the same images", *generated]}}
    for name in METRICS_ORDER:
        metrics.update(sections[name].metrics if name in sections else {})
    vq_line = (f"VQ-VAE on held-out B: PSNR {vq_metrics['psnr']:.2f} dB, SSIM {vq_metrics['ssim']:.3f}"
               + (f", codebook used {vq_metrics['codebook_used']:.1%}, perplexity {vq_metrics['perplexity']:.0f}"
                  if "perplexity" in vq_metrics else ", KL-regularised latent (no codebook)")
               + (f"; its decoder fine-tuned alone (train-decoder, step {vq_ckpt['decoder']['step']}), where stage "
                  f"1's own gives PSNR {stage1_metrics['psnr']:.2f} dB, SSIM {stage1_metrics['ssim']:.3f} (the row "
                  f"'{STAGE1_RECONSTRUCTIONS}')" if stage1_decoder else "")
               + ("; decoded by stage 1's decoder (--decoder stage-1), not RUN/decoder.pt"
                  if not finetuned and (run / "decoder.pt").exists() else ""))
    note = ("Distances to the reference half A of the held-out subjects. Real rows: random training images, and the "
            "other half B (the floor; its few subjects make it a high bar for FID/KID). MS-SSIM: mean over random pairs "
            "within a set; far above the real rows' means too little variety.")
    resized = (f"the features see the images resized to {features.input_size}x{features.input_size}"
               + (" (a 256-px domain classifier would cost 4x to train and run; the run's own resolution is judged "
                  "by the SWD levels and crops below)" if features.input_size < image_size else ""))
    level_note = (f"SWD x1e3 per Laplacian level, from the run's {image_size} px down to the "
                  f"{swd_levels(scores)[-1]}-px low-pass residual "
                  "(the `SWD` column above is their mean). A first stage that blurs shows in the finest band: compare "
                  "the samples and reconstructions with the real rows there.")
    crop_note = (f"Central {crop}x{crop} crops at full resolution (1:1, no resampling; view the PNG at 100%), "
                 f"{n_crops} per row. Rows, top to bottom: real held-out images (B); the VQ-VAE's reconstructions of "
                 "the same images" + ("." if stage1_only else "; samples."))
    report = [f"# Evaluation of {run}", "", f"Data {data.folder()} at {image_size}x{image_size}, features: {features.name}"
              + (f" (its {'/'.join(dataset.classes)} accuracy on the held-out images: {classifier_acc:.1%})" if classifier_acc else "")
              + f"; {resized}.",
              "Sampling: " + (", ".join(f"{k} {v}" for k, v in sampling.items() if v is not None)
                              or "none (the run has no unet.pt yet: stage 1 alone)") + ".", "", vq_line, "", table, "", note,
              "", "## Detail per scale", "", level_note, "", level_table, "", crop_note, "", "![](eval_crops.png)",
              "", "## Grids", "", "| " + " | ".join(["real (B)", "reconstructions", *generated]) + " |",
              "|---" * len(grids) + "|", "| " + " | ".join(f"![](eval_{name}.png)" for name in grids) + " |"]
    if seen:
        report.insert(2, "**The run was trained on all subjects: the held-out images were seen in training, and the "
                         "samples were not checked for copies of training images (that check measures them against "
                         "subjects the run never saw).**\n")
    if few:
        report.insert(2, f"**Only {n_subjects} subjects in a held-out half: FID and KID are not reliable here.**\n")
    ordered = [sections[name] for name in REPORT_ORDER if name in sections]
    report += [line for section in ordered for line in section.report]
    # each file whole (a write cut short leaves the one before), metrics.json last: what `ema --sigma-rel best` reads
    text = "\n".join(report) + "\n"
    earlier = (out / "report.md").read_text(errors="replace") if (out / "report.md").is_file() else ""
    atomic_write(out / "report.md", lambda f: f.write(text.encode()))
    atomic_write(out / "metrics.json", lambda f: f.write(json_text(metrics).encode()))
    remove_stale_figures(out, earlier, text)
    print(vq_line)
    print(table)
    print(level_table)
    for section in ordered:
        print(section.printed)
    print(f"wrote {out / 'metrics.json'} and {out / 'report.md'}")
    return metrics
