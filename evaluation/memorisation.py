"""Are the samples copies of training patients? The memorisation check of `driver.py evaluate`.

For every sample, its nearest training image, two ways: in the evaluation network's features (Euclidean distance;
the features FID uses) and by pixel correlation (Pearson's r of the two images, each at most CORRELATION_SIZE px,
after the card's normalisation). Medical latent diffusion models do memorise (Dar et al. 2024, Akbar et al. 2023),
and a copy is close by both measures. Closeness means little alone: slices of one brain are alike, and so are
slices of two brains at the same level. The floor is how close a *new* subject comes: real held-out images, whose
subjects the run never saw. A sample is flagged when it is closer to a training image than the 1st percentile of
the reference half A of the held-out images; the floor half B, scored the same way, shows what the threshold
flags among real new subjects (about 1% when A and B are alike). A held-out subject one of whose images is a
training image (pixel r >= DUPLICATE_R: the same brain under two IDs, a split that leaks, as on the ADNI subset whose
file names hold image IDs) is no new subject: its images are counted, and left out of the yardstick, where a few
would raise the threshold to an exact copy's and let a copy drawn through the decoder pass
(bench/memorisation_screen.py). B's flagged images are told by subject: one flagged on most of its images, each
nearest one training subject, is likely a training patient scanned again under another ID. Every sample's verdict,
with the training images nearest to it, goes into eval_memorisation.csv: the files to leave out of a synthetic set
before it is shared.

    python driver.py evaluate --run RUN                     # the check runs whenever there are samples
    python driver.py evaluate --run RUN --samples SET       # a set to share: eval_memorisation.csv names its files
    python driver.py evaluate --run RUN --samples SET --withhold-flagged    # ... and leaves them out of the set
"""
from __future__ import annotations

import csv
import io
from collections import Counter
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Subset

from export.sample_set import withhold

PERCENTILE = 1.0            # a sample closer than this percentile of held-out images is flagged
CORRELATION_SIZE = 128      # px: images are compared at most this large (area-averaged), enough to tell two brains apart
PAIRS_SHOWN = 8
DUPLICATE_R = 0.999         # a held-out image this correlated with a training image is that image, not a new subject


def standardised(images: torch.Tensor) -> torch.Tensor:
    """Images (N, C, H, W) -> unit vectors (N, D) of zero mean: the dot product of two is their Pearson correlation."""
    x = images.float()
    if x.shape[-1] > CORRELATION_SIZE:
        x = F.interpolate(x, size=(CORRELATION_SIZE,) * 2, mode="area")
    x = x.flatten(1)
    x = x - x.mean(dim=1, keepdim=True)
    return F.normalize(x, dim=1)


@torch.no_grad()
def nearest_training(queries: torch.Tensor, dataset, train_idx: list[int], features, device, batch_size: int = 256
                     ) -> dict[str, torch.Tensor]:
    """For each query image (N, C, H, W), its nearest training image in features (distance, index into train_idx)
    and by pixel correlation (r, index): the training images are read once, a batch at a time."""
    q_features = torch.cat([features(x.to(device)).float() for x in queries.split(batch_size)])
    q_pixels = standardised(queries).to(device)
    best = {"distance": torch.full((len(queries),), float("inf"), device=device),
            "correlation": torch.full((len(queries),), -float("inf"), device=device)}
    where = {name: torch.zeros(len(queries), dtype=torch.long, device=device) for name in best}
    start = 0
    for x, _ in DataLoader(Subset(dataset, train_idx), batch_size=batch_size):
        x = x.to(device)
        distance, d_at = torch.cdist(q_features, features(x).float()).min(dim=1)
        correlation, c_at = (q_pixels @ standardised(x).T).max(dim=1)
        for name, value, at, closer in (("distance", distance, d_at, distance < best["distance"]),
                                        ("correlation", correlation, c_at, correlation > best["correlation"])):
            best[name] = torch.where(closer, value, best[name])
            where[name] = torch.where(closer, at + start, where[name])
        start += len(x)
    return {"distance": best["distance"].cpu(), "distance_at": where["distance"].cpu(),
            "correlation": best["correlation"].cpu(), "correlation_at": where["correlation"].cpu()}


def memorisation_check(samples: torch.Tensor, reference: torch.Tensor, floor: torch.Tensor, dataset,
                       train_idx: list[int], features, device, names: list[str] | None = None,
                       subjects: tuple[list[str], list[str], list[str]] | None = None
                       ) -> tuple[dict, torch.Tensor, list[dict]]:
    """The check (see the module docstring): {thresholds, rows: {images: summary}}; the figure's images, the
    PAIRS_SHOWN samples most correlated with a training image (top row) above those training images (bottom row);
    and each sample's verdict (`each_sample`), by `names` (a set's files) or by its place among the samples.
    `subjects`: whose each image of A, of B and of train_idx is, so that a leaked subject's images go together (else
    each duplicate image alone), and B's row tells its flagged images by subject (`flagged_subjects`)."""
    sets = {"samples": samples, "real (held out, A)": reference, "real (held out, B)": floor}
    found = nearest_training(torch.cat(list(sets.values())), dataset, train_idx, features, device)
    split = {}
    start = 0
    for name, images in sets.items():
        split[name] = {k: v[start:start + len(images)] for k, v in found.items()}
        start += len(images)
    duplicates, kept, owners = {}, {}, {}
    for k, name in enumerate(("real (held out, A)", "real (held out, B)")):  # the split's leaks: not new subjects
        new = split[name]["correlation"] < DUPLICATE_R
        if subjects is not None:  # every image of a subject one of whose images is a training image
            leaked = {subject for subject, fresh in zip(subjects[k], new.tolist()) if not fresh}
            new = torch.tensor([subject not in leaked for subject in subjects[k]])
        if new.any():
            duplicates[name] = int((~new).sum())
            split[name] = {key: v[new] for key, v in split[name].items()}
        else:  # nothing else to measure against: kept, and said so (A's threshold is then an exact copy's)
            new = torch.ones_like(new)
            duplicates[name], kept[name] = 0, len(new)
            print(f"warning: memorisation: every image of {name} is of a held-out subject one of whose images is a "
                  f"training image (pixel r >= {DUPLICATE_R}); they are kept, for want of others"
                  + (", and the threshold is an exact copy's: a copy drawn through the decoder passes it"
                     if k == 0 else ""))
        if subjects is not None:
            owners[name] = [subject for subject, fresh in zip(subjects[k], new.tolist()) if fresh]
    a = split["real (held out, A)"]
    thresholds = {"distance": torch.quantile(a["distance"], PERCENTILE / 100).item(),
                  "correlation": torch.quantile(a["correlation"], 1 - PERCENTILE / 100).item()}
    rows = {name: {**summary(s, thresholds), **({"duplicates": duplicates[name]} if name in duplicates else {}),
                   **({"leaked_kept": kept[name]} if name in kept else {})}
            for name, s in split.items()}
    if subjects is not None:
        rows["real (held out, B)"]["flagged_subjects"] = flagged_subjects(
            split["real (held out, B)"], owners["real (held out, B)"], thresholds, subjects[2])
    order = split["samples"]["correlation"].argsort(descending=True)[:PAIRS_SHOWN]
    matches = torch.stack([dataset[train_idx[i]][0] for i in split["samples"]["correlation_at"][order].tolist()])
    return {"percentile": PERCENTILE, "thresholds": thresholds, "rows": rows,
            "closest_pairs": [{"sample": names[i] if names else i, "training_image": dataset.samples[train_idx[j]][0],
                               **_slice_of(dataset, train_idx[j]),
                               "correlation": split["samples"]["correlation"][i].item()}
                              for i, j in zip(order.tolist(), split["samples"]["correlation_at"][order].tolist())]
            }, torch.cat([samples[order].cpu(), matches]), each_sample(split["samples"], thresholds, dataset, train_idx,
                                                                    names)


def flagged_subjects(nearest: dict[str, torch.Tensor], owners: list[str], thresholds: dict[str, float],
                     training_subjects: list[str]) -> list[dict]:
    """Whose images of a held-out half either measure flags, most flagged first: each such subject's flagged and
    all images, and the training subject nearest by pixels to most of its images, for how many. A patient scanned
    again under another ID (a repeat scan, another visit) is flagged on most images, each nearest that patient."""
    flagged = (nearest["distance"] < thresholds["distance"]) | (nearest["correlation"] > thresholds["correlation"])
    rows = []
    for subject in dict.fromkeys(owners):
        mine = [k for k, owner in enumerate(owners) if owner == subject]
        if any(flagged[k] for k in mine):
            nearest_subject, count = Counter(training_subjects[nearest["correlation_at"][k]] for k in mine
                                             ).most_common(1)[0]
            rows.append({"subject": subject, "flagged": int(flagged[mine].sum()), "images": len(mine),
                         "nearest_training_subject": nearest_subject, "nearest_count": count})
    return sorted(rows, key=lambda row: -row["flagged"])


def each_sample(nearest: dict[str, torch.Tensor], thresholds: dict[str, float], dataset, train_idx: list[int],
                names: list[str] | None) -> list[dict]:
    """One row per sample, in order: its name (else its place), its nearest training image by each measure (a
    volume's slice too) and how near, and whether each measure flags it."""
    rows = []
    for k in range(len(nearest["distance"])):
        d, r = nearest["distance"][k].item(), nearest["correlation"][k].item()
        by_features, by_pixels = (train_idx[nearest[f"{m}_at"][k].item()] for m in ("distance", "correlation"))
        rows.append({"sample": names[k] if names else k,
                     "flagged_features": int(d < thresholds["distance"]),
                     "flagged_pixels": int(r > thresholds["correlation"]),
                     "feature_distance": round(d, 6), "nearest_by_features": dataset.samples[by_features][0],
                     **{f"{key}_by_features": v for key, v in _slice_of(dataset, by_features).items()},
                     "correlation": round(r, 6), "nearest_by_pixels": dataset.samples[by_pixels][0],
                     **{f"{key}_by_pixels": v for key, v in _slice_of(dataset, by_pixels).items()}})
    return rows


def each_sample_csv(rows: list[dict]) -> bytes:
    """`each_sample`'s rows as CSV (eval_memorisation.csv)."""
    text = io.StringIO()
    writer = csv.DictWriter(text, fieldnames=list(rows[0]), lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    return text.getvalue().encode()


def kept_samples(each: list[dict], withholding: bool) -> list[int]:
    """The places of the samples a set keeps: those the check did not flag (`each`, its verdicts) where it withholds,
    else all of them."""
    return [k for k, row in enumerate(each)
            if not withholding or not (row["flagged_features"] or row["flagged_pixels"])]


def withhold_flagged(folder: Path, each: list[dict], run: Path) -> int:
    """`evaluate --samples SET --withhold-flagged`: the samples either measure flags left out of the set in `folder`
    (export/sample_set.py `withhold`: files deleted, rows into withheld.csv with what flagged them, against which
    run). The caller holds the lock `sample` holds while it writes the set (driver.py `evaluate`, from before the
    samples are read): `each` must name the files as they were read. Returns how many the set withholds in all."""
    why = {row["sample"]: {"flagged_by": " and ".join(m for m in ("features", "pixels") if row[f"flagged_{m}"]),
                           "feature_distance": row["feature_distance"], "correlation": row["correlation"],
                           "checked_against": str(run.resolve())}
           for row in each if row["flagged_features"] or row["flagged_pixels"]}
    return withhold(folder, why)


def _slice_of(dataset, index: int) -> dict:
    """{"slice": k} of an image cut from a volume (which slice of `training_image`), else nothing."""
    slices = getattr(dataset, "slice_numbers", None)
    return {"slice": slices[index]} if slices else {}


def summary(nearest: dict[str, torch.Tensor], thresholds: dict[str, float]) -> dict:
    """How close one set of images comes to the training set, and the fraction flagged by each measure."""
    d, r = nearest["distance"], nearest["correlation"]
    return {"count": len(d), "distance_median": d.median().item(), "distance_min": d.min().item(),
            "correlation_median": r.median().item(), "correlation_max": r.max().item(),
            "flagged_features": (d < thresholds["distance"]).float().mean().item(),
            "flagged_pixels": (r > thresholds["correlation"]).float().mean().item()}


def format_memorisation_table(check: dict) -> str:
    """Markdown table of the check: one row per image set."""
    t = check["thresholds"]
    lines = [f"| images | n | feature distance to the nearest training image: median (min) | pixel correlation: median "
             f"(max) | closer than the held-out images' percentile {check['percentile']:g}: features (< {t['distance']:.3g}) "
             f"| pixels (r > {t['correlation']:.3f}) |", "|---|---|---|---|---|---|"]
    for name, s in check["rows"].items():
        lines.append(f"| {name} | {s['count']} | {s['distance_median']:.3g} ({s['distance_min']:.3g}) | "
                     f"{s['correlation_median']:.3f} ({s['correlation_max']:.3f}) | {s['flagged_features']:.1%} | "
                     f"{s['flagged_pixels']:.1%} |")
    left = [f"{s['duplicates']} of {name}" for name, s in check["rows"].items() if s.get("duplicates")]
    if left:  # a check from before 2026-12-07 has no such count
        lines.append(f"\nLeft out of the rows and the threshold: {' and '.join(left)}, images of held-out subjects "
                     f"one of whose images is a training image (pixel r >= {DUPLICATE_R}): the same brain under two "
                     f"IDs, a split that leaks.")
    kept = [f"all {s['leaked_kept']} of {name}" for name, s in check["rows"].items() if s.get("leaked_kept")]
    if kept:
        lines.append(f"\nKept, for want of others: {' and '.join(kept)}, every image of that half of a held-out "
                     f"subject one of whose images is a training image (pixel r >= {DUPLICATE_R})"
                     + (": the threshold is an exact copy's, and a copy drawn through the decoder passes it."
                        if check["rows"].get("real (held out, A)", {}).get("leaked_kept") else "."))
    lines += _flagged_subjects_line(check["rows"].get("real (held out, B)", {}).get("flagged_subjects"))
    return "\n".join(lines)


def _flagged_subjects_line(rows: list[dict] | None, shown: int = 5) -> list[str]:
    """B's flagged images by subject, as `flagged_subjects` tells them (none before 2026-12-07, or none flagged)."""
    if not rows:
        return []
    each = [f"{r['subject']} ({r['flagged']} of its {r['images']} images flagged; {r['nearest_count']} of the "
            f"{r['images']} nearest by pixels to training subject {r['nearest_training_subject']})"
            for r in rows[:shown]]
    more = f" and {len(rows) - shown} more" if len(rows) > shown else ""
    return [f"\nHalf B's flagged images are of {len(rows)} subject{'s' * (len(rows) > 1)}: {', '.join(each)}{more}. "
            f"A subject flagged on most of its images, each nearest one training subject, may be that patient scanned "
            f"again under another ID (a repeat scan, another visit): no new subject, and a split that leaks "
            f"(volumes/README.md, Subjects and the hold-out)."]
