"""Where a change of conditions goes the same way in the held-out subjects: a voxel-wise test over subjects of the
effects `driver.py counterfactual --input held-out` finds (conditions/counterfactual_set.py), its family-wise error
held by permutation.

Each subject's effect map is the mean of its images' effects (counterfactual - twin) at each slice position: a
volume's slice number, or, for 2D images, whose position the run does not know, all of a subject's images together
(the maps counterfactual.png averages). Positions are compared as they are numbered (below: when they align). The
positions every tested subject has are tested, together. At each voxel inside the brain (the subjects' mean input
above BRAIN, 5% of the range above black, and an effect that varies between subjects) the one-sample t of the
subjects' maps is compared with the largest |t| over every tested voxel under random sign flips of whole maps
(Nichols and Holmes 2002; FSL randomise -1; nilearn's `permuted_ols`): were the model's change as likely one way as
the other in each subject, a flip would change nothing. The p-values are family-wise over every voxel and position
tested, so a voxel below ALPHA says its change has one direction across subjects beyond what chance gives anywhere
in the brain. The drift does not enter: the twin took it out.

The flips are drawn at random (--permutations of them), so p is estimated, to within about sqrt(p / flips), and no
smaller than 1 / (flips + 1); the exact test of n subjects, all 2^n sign patterns, gives no p below 2^(1 - n), so
with 5 or fewer subjects, or fewer than 19 flips, none reaches 0.05: the test is then left out (or refused), and the
record says why. Volumes line up voxel by voxel only where they were registered to one space and read without
stage 1's cropping to each volume's own foreground (`train-vqvae --no-crop-foreground`; the record says which).
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import matplotlib
matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np
import torch

from export.figures import save_figure
from runtime.checkpoint import atomic_write

ALPHA = 0.05
BRAIN = -0.9            # the mean input, in [-1, 1], above which a voxel is in the brain
ALL = "all"             # the one position of 2D images
MOST_FLIPS = 100_000    # p of 0.05 then known to +-0.0007
FILES = ("voxelwise.npz", "voxelwise.png")


@dataclass
class SubjectMaps:
    """Each subject's mean effect and mean input at each tested position: effects and inputs (n, P, S, S); what the
    grouping left out, for the record."""
    effects: np.ndarray
    inputs: np.ndarray
    subjects: list[str]
    positions: list
    positions_left_out: int


def subject_maps(effects: torch.Tensor, images: torch.Tensor, rows: list[dict]) -> SubjectMaps:
    """The images' effects (N, S, S) and inputs (N, C, S, S) averaged per subject and slice position (each row's
    "subject" and "slice"; "" for 2D images: one position), over the positions every subject has."""
    position = lambda row: ALL if row["slice"] == "" else int(row["slice"])  # noqa: E731
    groups: dict[str, dict] = {}
    for i, row in enumerate(rows):
        groups.setdefault(row["subject"], {}).setdefault(position(row), []).append(i)
    every = set.intersection(*(set(by) for by in groups.values()))
    positions = sorted(every, key=lambda p: (p == ALL, p if p != ALL else 0))

    def means(values: torch.Tensor) -> np.ndarray:  # (n, P, S, S)
        return np.stack([np.stack([values[by[p]].mean(0).numpy() for p in positions]) for by in groups.values()])

    left_out = len(set().union(*(set(by) for by in groups.values())) - every)
    if not positions:
        return SubjectMaps(np.zeros(0), np.zeros(0), list(groups), positions, left_out)
    return SubjectMaps(means(effects.float()), means(images.float().mean(1)), list(groups), positions, left_out)


def sign_flip_test(maps: np.ndarray, mask: np.ndarray, permutations: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """The one-sample t (n subjects' `maps` (n, ...), at the voxels of `mask`) and its family-wise p-values by max-|t|
    over random sign flips of whole maps; NaN outside the mask."""
    from nilearn.mass_univariate import permuted_ols  # imports scikit-learn: only when a test runs
    values = maps[:, mask].astype(np.float64)
    found = permuted_ols(np.ones((len(maps), 1)), values, model_intercept=False, n_perm=permutations,
                         two_sided_test=True, random_state=flip_seed(seed), n_jobs=1, verbose=0)
    logp, score = (found[0], found[1]) if isinstance(found, tuple) else (found["logp_max_t"], found["t"])  # < 0.13
    t, p = np.full(mask.shape, np.nan, np.float32), np.full(mask.shape, np.nan, np.float32)
    t[mask], p[mask] = score[0], 10.0 ** -logp[0]
    return t, p


def flip_seed(seed: int) -> int:
    """The sign flips' seed (NumPy's RandomState takes 32 bits) from the command's --seed (64)."""
    return int(np.random.SeedSequence(seed).generate_state(1)[0])


@dataclass
class Tested:
    """The test's entry of the record, and where it ran, its maps: t and family-wise p (P, S, S), NaN outside the
    mask."""
    record: dict
    maps: SubjectMaps | None = None
    t: np.ndarray | None = None
    p: np.ndarray | None = None

    @property
    def files(self) -> tuple[str, ...]:
        return FILES if self.t is not None else ()


def voxelwise(effects: torch.Tensor, images: torch.Tensor, rows: list[dict], permutations: int, seed: int,
              crop_foreground: bool | None = None) -> Tested:
    """The test of the module's docstring on the images' effects (N, S, S), inputs (N, C, S, S) and `rows` as
    counterfactuals.csv holds them; `crop_foreground`: the run's slicing of volumes, for the record (None: 2D
    images)."""
    maps = subject_maps(effects, images, rows)
    n, bad = len(maps.subjects), int((~effects.isfinite()).flatten(1).any(1).sum())
    record = {"unit": "subject", "subjects": n, "positions": maps.positions,
              "positions_left_out": maps.positions_left_out, "permutations": permutations, "seed": seed,
              "flip_seed": flip_seed(seed), "crop_foreground": crop_foreground, "alpha": ALPHA,
              "exact_smallest_p": 2.0 ** (1 - n), "smallest_p_of_the_flips": 1 / (permutations + 1)}
    skipped = ("--permutations 0" if permutations == 0 else
               f"{bad} images' effects are not finite" if bad else
               f"{n} subjects: a sign-flip test of n gives no p below 2^(1 - n), {2.0 ** (1 - n):.3g} here"
               if 2.0 ** (1 - n) > ALPHA else
               "no slice position that every subject has" if not maps.positions else None)
    if skipped:
        return Tested({**record, "skipped": skipped})
    mask = (maps.inputs.mean(0) > BRAIN) & (maps.effects.std(0) > 0)
    if not mask.any():
        return Tested({**record, "skipped": "no voxel in the brain whose effect varies between subjects"})
    t, p = sign_flip_test(maps.effects, mask, permutations, seed)
    found = p < ALPHA
    record.update(mask=f"the subjects' mean input above {BRAIN} (of [-1, 1]) and an effect that varies",
                  voxels_tested=int(mask.sum()), significant_voxels=int(found.sum()),
                  increase=int((found & (t > 0)).sum()), decrease=int((found & (t < 0)).sum()),
                  smallest_p_fwe=float(np.nanmin(p)), largest_abs_t=float(np.nanmax(np.abs(t))))
    return Tested(record, maps, t, p)


def write(tested: Tested, out: Path):
    """OUT/voxelwise.npz (t, p_fwe, the subjects' mean effect and mean input, (P, S, S), and the positions) and
    OUT/voxelwise.png, where the test ran."""
    if tested.t is None:
        return
    maps = tested.maps
    atomic_write(out / "voxelwise.npz", lambda f: np.savez(f, t=tested.t, p_fwe=tested.p,
                                                           mean_effect=maps.effects.mean(0),
                                                           mean_input=maps.inputs.mean(0),
                                                           positions=np.array([str(q) for q in maps.positions])))
    figure(maps, tested.t, tested.p < ALPHA, tested.record, out / "voxelwise.png")


def figure(maps: SubjectMaps, t: np.ndarray, found: np.ndarray, record: dict, path: Path, most: int = 8):
    """At up to `most` positions (those with the most voxels of p < ALPHA, in order; where there are none, spread over
    them): the t map, and the mean input with the voxels of p < ALPHA coloured by their t."""
    counts = found.reshape(len(found), -1).sum(1)
    shown = shown_positions(counts, most)
    bound = max(float(np.nanmax(np.abs(t))), 1e-8)
    one = len(shown) == 1  # side by side
    fig, axes = plt.subplots(*((1, 2) if one else (2, len(shown))), figsize=(7.2, 4) if one else
                             (3.2 * len(shown) + 0.8, 7), squeeze=False, layout="constrained")
    for column, k in enumerate(shown):
        top, bottom = (axes[0, 0], axes[0, 1]) if one else (axes[0, column], axes[1, column])
        scale = top.imshow(t[k], cmap="RdBu_r", vmin=-bound, vmax=bound)
        bottom.imshow((maps.inputs.mean(0)[k] + 1) / 2, cmap="gray", vmin=0, vmax=1)
        bottom.imshow(np.where(found[k], t[k], np.nan), cmap="RdBu_r", vmin=-bound, vmax=bound)
        top.set_title(f"t, slice {maps.positions[k]}" if maps.positions[k] != ALL else "t")
        bottom.set_title(f"p(FWE) < {ALPHA:g}: {int(found[k].sum())} voxels")
        for ax in (top, bottom):
            ax.axis("off")
    fig.colorbar(scale, ax=axes.ravel().tolist(), fraction=0.02)
    fig.suptitle(f"{record['subjects']} subjects, {record['voxels_tested']} voxels, {record['permutations']} sign "
                 f"flips, family-wise:\n{record['increase']} brighter, {record['decrease']} darker (smallest p "
                 f"{record['smallest_p_fwe']:.3g})" + (f"; {len(shown)} of {len(counts)} positions shown, "
                                                       f"{'those with the most' if counts.any() else 'spread'}"
                                                       if len(shown) < len(counts) else ""))
    save_figure(fig, path)
    plt.close(fig)


def shown_positions(counts: np.ndarray, most: int) -> np.ndarray:
    """Which of the positions, of `counts` significant voxels each, the figure shows: the `most` with the most, in
    their order; where none has any, `most` spread over them."""
    if counts.any():
        return np.sort(np.argsort(-counts, kind="stable")[:most])
    return np.unique(np.linspace(0, len(counts) - 1, min(most, len(counts))).round().astype(int))


def summary(record: dict) -> str:
    """The test's part of the command's line."""
    if "skipped" in record:
        return f"no voxel-wise test ({record['skipped']})"
    return (f"voxel-wise over {record['subjects']} subjects ({record['permutations']} sign flips, family-wise): "
            f"{record['significant_voxels']} of {record['voxels_tested']} voxels at p < {ALPHA:g} "
            f"({record['increase']} brighter, {record['decrease']} darker; smallest p {record['smallest_p_fwe']:.3g})")

