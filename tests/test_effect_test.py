"""The voxel-wise test over subjects of `counterfactual --input held-out` (conditions/effect_test.py): the t against
its closed form, the sign-flip p against the count of sign patterns, the family-wise error under a null, the power
where a change has one direction, and how images become subjects' maps."""
import numpy as np
import pytest
import torch

from conditions import effect_test
from conditions.effect_test import sign_flip_test, subject_maps, voxelwise


def rows_of(subjects: list[str], slices: list) -> list[dict]:
    return [{"subject": s, "slice": k} for s, k in zip(subjects, slices)]


def test_the_t_is_the_one_sample_t_and_p_counts_the_sign_patterns_as_extreme():
    """Six subjects of one sign at one voxel: t = mean / (sd / sqrt(n)), and of the 2^6 sign patterns only the
    identity and its negation reach |t|, so p = 2 / 64."""
    values = np.arange(1.0, 7.0)
    t, p = sign_flip_test(values[:, None, None], np.ones((1, 1), bool), permutations=20000, seed=0)
    assert t[0, 0] == pytest.approx(values.mean() / (values.std(ddof=1) / np.sqrt(6)), rel=1e-5)
    assert p[0, 0] == pytest.approx(2 / 64, abs=0.005)          # 20,000 random flips: sd 0.0012
    mixed = np.array([1.0, -2, 3, -4, 5, 6])                     # patterns as extreme: more than 2
    assert sign_flip_test(mixed[:, None, None], np.ones((1, 1), bool), 20000, 0)[1][0, 0] > 0.2


def test_the_family_wise_error_under_a_null_is_held_over_every_voxel():
    """Subjects' maps of symmetric noise, 16 voxels: an uncorrected p < 0.05 somewhere comes in about 56% of draws;
    the family-wise test rejects in about 5%."""
    rng = np.random.default_rng(0)
    draws, rejected = 1000, 0
    for k in range(draws):
        maps = rng.normal(size=(12, 4, 4))
        rejected += int((sign_flip_test(maps, np.ones((4, 4), bool), 200, k)[1] < 0.05).any())
    assert 25 <= rejected <= 80                                   # binomial(1000, 0.05): 50 +- 7


def test_a_change_of_one_direction_is_found_where_it_is_and_nowhere_else():
    """Eight subjects of three images at slices 10 and 11 (a slice only some have is left out): a region brighter in
    every subject's counterfactual at slice 10, and darker at slice 11, stands out of noise of either sign; the
    background (black input) is not tested."""
    rng = np.random.default_rng(1)
    subjects = [f"s{i}" for i in range(8) for _ in range(3)]
    slices = [k for i in range(8) for k in ([10, 11, 12] if i % 2 else [10, 11, 11])]
    effects = torch.tensor(rng.normal(scale=0.1, size=(24, 12, 12)), dtype=torch.float32)
    images = torch.full((24, 1, 12, 12), 0.3)
    images[:, :, :, :2] = -1                                          # black: outside the brain
    for i, k in enumerate(slices):
        effects[i, 4:7, 4:7] += 0.5 if k == 10 else 0             # 9 voxels brighter at slice 10
        effects[i, 8:10, 8:10] -= 0.5 if k == 11 else 0           # 4 darker at slice 11
    tested = voxelwise(effects, images, rows_of(subjects, slices), permutations=1000, seed=0, crop_foreground=False)
    record, found = tested.record, tested.p < 0.05
    assert record["subjects"] == 8 and record["positions"] == [10, 11] and record["positions_left_out"] == 1
    assert record["voxels_tested"] == 2 * 12 * 10 and np.isnan(tested.t[:, :, :2]).all()
    assert found[0, 4:7, 4:7].all() and found[1, 8:10, 8:10].all() and (tested.t[0, 4:7, 4:7] > 0).all()
    assert found.sum() == 13 and record["significant_voxels"] == 13  # noise elsewhere: none at this seed
    assert record["increase"] == 9 and record["decrease"] == 4 and record["crop_foreground"] is False


def test_images_become_each_subjects_mean_at_each_position_shared_by_all():
    effects = torch.arange(6.0)[:, None, None].expand(6, 2, 2)
    images = torch.zeros(6, 3, 2, 2)
    maps = subject_maps(effects, images, rows_of(["a", "a", "a", "b", "b", "c"], [5, 5, 6, 5, 6, 5]))
    assert maps.subjects == ["a", "b", "c"] and maps.positions == [5] and maps.positions_left_out == 1
    assert maps.effects[:, 0, 0, 0].tolist() == [0.5, 3.0, 5.0]
    flat = subject_maps(effects, images, rows_of(["a", "a", "b", "b", "c", "c"], [""] * 6))  # 2D images: one position
    assert flat.positions == [effect_test.ALL] and flat.effects[:, 0, 0, 0].tolist() == [0.5, 2.5, 4.5]


def test_the_test_is_left_out_where_it_cannot_reach_alpha_and_says_why():
    effects, images = torch.randn(5, 4, 4), torch.zeros(5, 1, 4, 4)
    five = voxelwise(effects, images, rows_of(list("abcde"), [""] * 5), 1000, 0)
    assert "5 subjects" in five.record["skipped"] and five.files == () and five.t is None
    six = rows_of(list("abcdef"), [""] * 6)
    assert voxelwise(torch.randn(6, 4, 4), torch.zeros(6, 1, 4, 4), six, 0, 0).record["skipped"] == "--permutations 0"
    apart = voxelwise(torch.randn(6, 4, 4), torch.zeros(6, 1, 4, 4), rows_of(list("abcdef"), [1, 2, 3, 4, 5, 6]), 10, 0)
    assert "no slice position that every subject has" in apart.record["skipped"]
    black = voxelwise(torch.randn(6, 4, 4), -torch.ones(6, 1, 4, 4), six, 10, 0)
    assert "no voxel in the brain" in black.record["skipped"]
    broken = torch.randn(6, 4, 4)
    broken[2, 0, 0] = float("nan")                                    # a model's NaN is not left out in silence
    skipped = voxelwise(broken, torch.zeros(6, 1, 4, 4), six, 100, 0).record["skipped"]
    assert skipped == "1 images' effects are not finite"


def test_any_seed_the_command_takes_seeds_the_flips_and_is_recorded():
    six = rows_of(list("abcdef"), [""] * 6)
    record = voxelwise(torch.randn(6, 4, 4), torch.zeros(6, 1, 4, 4), six, 100, 2 ** 63 - 1).record
    assert record["seed"] == 2 ** 63 - 1 and 0 <= record["flip_seed"] < 2 ** 32 and "skipped" not in record
    assert effect_test.flip_seed(0) != effect_test.flip_seed(1)


def test_the_figure_shows_the_positions_with_the_most_significant_voxels():
    """Found by review: 8 positions spread over 20 left out the 2 that held every significant voxel."""
    counts = np.zeros(20, int)
    counts[[4, 9, 13]] = [5, 2, 7]
    assert {4, 9, 13} <= set(effect_test.shown_positions(counts, 8).tolist())
    assert effect_test.shown_positions(counts, 2).tolist() == [4, 13]
    assert effect_test.shown_positions(np.zeros(20, int), 3).tolist() == [0, 10, 19]


def test_a_number_of_volume_images_is_whole_slice_positions_every_subject_has():
    """Found by review: --num spread over a volume run's images left no position shared by every subject, and the
    voxel-wise test silently nothing to compare."""
    from conditions.counterfactual_set import chosen
    rows = [{"subject": s, "slice": k} for s in "abc" for k in range(1, 11) if (s, k) != ("c", 10)]
    picked = chosen(rows, list(range(len(rows))), 12)
    by_subject = {s: {rows[i]["slice"] for i in picked if rows[i]["subject"] == s} for s in "abc"}
    assert len(picked) == 12 and by_subject["a"] == by_subject["b"] == by_subject["c"] and 10 not in by_subject["a"]
    assert len(chosen(rows, list(range(len(rows))), 2)) == 2                      # fewer than one position holds
    assert chosen(rows, list(range(len(rows))), None) == list(range(len(rows)))
    flat = [{"subject": s, "slice": ""} for s in "abcd" for _ in range(3)]       # 2D images: spread over them
    assert chosen(flat, list(range(12)), 4) == [0, 4, 7, 11]
