"""Post-hoc EMA (runtime/posthoc_ema.py) against closed forms and constructed weight trajectories; its training
snapshots through kill-and-resume; `evaluate --ema-lengths` and `driver.py ema` (evaluation/ema_lengths.py)."""
from __future__ import annotations

import csv
import json
import shutil

import numpy as np
import pytest
import torch
import torch.nn as nn

import driver
import predict
from conftest import SMALL_UNET, ckpt, error_of
from diffusion.guidance import Autoguided
from export.sample_set import batch_seed
from modules import EMA, UNet
from runtime.errors import BadInputError
from runtime.models import load_guide, load_run
from runtime.posthoc_ema import (GOOD_FIT, PowerFunctionEMA, earlier_weights, gamma_to_sigma_rel, posthoc_coefficients,
                                 power_beta, reconstruct, response_inner, running_ema_sigma_rel, sigma_rel_to_gamma,
                                 snapshot_files)


class Trajectory(nn.Module):
    """One parameter vector of T entries; at step t it is the t-th unit vector, so an average of the trajectory's
    steps is its weighting of the steps, read off directly."""

    def __init__(self, steps: int):
        super().__init__()
        self.theta = nn.Parameter(torch.zeros(steps, dtype=torch.float64), requires_grad=False)

    def at(self, t: int):
        self.theta.zero_()
        self.theta[t - 1] = 1.0


def weighting_std(w: np.ndarray) -> float:
    """The standard deviation of a weighting of steps 1..T, relative to T."""
    tau = np.arange(1, len(w) + 1) / len(w)
    mean = w @ tau / w.sum()
    return float(np.sqrt(w @ (tau - mean) ** 2 / w.sum()))


def test_sigma_rel_and_gamma_are_inverse_and_match_edm2():
    assert sigma_rel_to_gamma(0.05) == pytest.approx(16.97, abs=0.01)  # EDM2, section 3.1: gamma 16.97 and 6.94
    assert sigma_rel_to_gamma(0.10) == pytest.approx(6.94, abs=0.01)
    for s in (0.01, 0.08, 0.2, 0.28):
        assert gamma_to_sigma_rel(sigma_rel_to_gamma(s)) == pytest.approx(s, rel=1e-9)
    for bad in (0.0, -0.1, 0.3):  # 0.2887 = 12^-1/2 is the plain average of everything
        with pytest.raises(BadInputError, match="sigma_rel"):
            sigma_rel_to_gamma(bad)


def test_a_power_function_ema_weights_the_steps_as_its_closed_form():
    steps, sigma_rel = 1000, 0.1
    model = Trajectory(steps)
    ema = PowerFunctionEMA(model, (sigma_rel,))
    gamma = ema.gammas[0]
    for t in range(1, steps + 1):
        model.at(t)
        ema.update(model, t)
    w = ema.profiles[0][0].double().numpy()
    tau = np.arange(1, steps + 1)
    beta = np.array([power_beta(gamma, t) for t in tau])
    # the product of the later betas telescopes: prod_{s > tau} (1 - 1/s)^(gamma+1) = (tau / T)^(gamma+1)
    np.testing.assert_allclose(w, (1 - beta) * (tau / steps) ** (gamma + 1), rtol=1e-4, atol=1e-9)
    assert w.sum() == pytest.approx(1.0, abs=1e-5)  # an average, and the random start is forgotten by construction
    assert weighting_std(w) == pytest.approx(sigma_rel, rel=0.01)  # the length it was asked for


def test_the_inner_product_of_two_responses_is_their_integral():
    def response(t, gamma, tau):
        return np.where(tau <= t, (gamma + 1) * tau ** gamma / t ** (gamma + 1), 0.0)

    tau = np.linspace(0, 1000, 2_000_001)
    for (t_a, g_a), (t_b, g_b) in [((600, 6.94), (1000, 16.97)), ((1000, 3.0), (400, 6.94)), ((700, 2.0), (700, 9.0))]:
        f = response(t_a, g_a, tau) * response(t_b, g_b, tau)
        numeric = np.sum((f[1:] + f[:-1]) / 2 * np.diff(tau))  # the trapezoid rule (np.trapezoid needs numpy 2)
        assert response_inner(t_a, g_a, t_b, g_b) == pytest.approx(numeric, rel=1e-4)


def test_the_post_hoc_ema_recovers_a_known_ema_length_from_the_two_profiles(tmp_path):
    """Snapshots of EDM2's two profiles every 100 of 2,000 steps; the EMAs of other lengths, kept directly along the
    same trajectory, are what the reconstruction must give."""
    steps, targets = 2000, (0.03, 0.07, 0.15)
    model = Trajectory(steps)
    kept, direct = PowerFunctionEMA(model), PowerFunctionEMA(model, targets)
    for t in range(1, steps + 1):
        model.at(t)
        kept.update(model, t)
        direct.update(model, t)
        if t % 100 == 0:
            kept.snapshot(tmp_path)
    assert list(snapshot_files(tmp_path)) == list(range(100, steps + 1, 100))
    nearest = {0.03: 0, 0.07: 0, 0.15: 1}  # the stored profile closest in length
    for k, s in enumerate(targets):
        weights, how = reconstruct(tmp_path, s)
        got, want = weights["theta"].double().numpy(), direct.profiles[k][0].double().numpy()
        error = np.linalg.norm(got - want) / np.linalg.norm(want)
        profile = kept.profiles[nearest[s]][0].double().numpy()
        assert error < 0.05 and error < np.linalg.norm(profile - want) / np.linalg.norm(want) / 10
        assert weighting_std(got) == pytest.approx(s, rel=0.03)
        assert how["step"] == steps and how["snapshots"] == 20 and how["fit"] < 0.05
    # a stored length comes back as itself
    weights, _ = reconstruct(tmp_path, 0.05)
    np.testing.assert_allclose(weights["theta"].numpy(), kept.profiles[0][0].float().numpy(), atol=1e-4)
    # an earlier step: only the snapshots up to it
    _, how = reconstruct(tmp_path, 0.07, step=1000)
    assert how["snapshots"] == 10
    with pytest.raises(BadInputError, match="no snapshot at step 1050"):
        reconstruct(tmp_path, 0.07, step=1050)
    with pytest.raises(BadInputError, match="--posthoc-ema"):
        reconstruct(tmp_path / "none", 0.07)


def test_the_coefficients_fit_a_target_that_is_a_snapshot_exactly():
    pairs = [(t, g) for t in (100, 200, 300) for g in (6.94, 16.97)]
    x = posthoc_coefficients(pairs, (300, 6.94))
    np.testing.assert_allclose(x, np.eye(6)[pairs.index((300, 6.94))], atol=1e-6)


def test_the_runs_ema_length_is_worked_out_from_its_warm_up_and_decay():
    """modules.EMA on the trajectory, against running_ema_sigma_rel: its warm-up (1 + n) / (10 + n) makes it nearly a
    power-function EMA of gamma 8 (sigma_rel 0.09) until the decay caps it."""
    for decay, steps in ((0.999, 1500), (0.99, 1500), (0.9999, 300)):
        model = Trajectory(steps)
        ema = EMA(model, decay)
        for t in range(1, steps + 1):
            model.at(t)
            ema.update(model)
        assert running_ema_sigma_rel(decay, steps) == pytest.approx(weighting_std(ema.module.theta.numpy()), rel=1e-6)
    assert running_ema_sigma_rel(0.999, 1500) == pytest.approx(gamma_to_sigma_rel(8), rel=0.02)


def test_profiles_saved_for_other_ema_lengths_are_refused_not_loaded():
    model = nn.Linear(2, 1)
    ema, other, same = PowerFunctionEMA(model), PowerFunctionEMA(model, (0.05, 0.2)), PowerFunctionEMA(model)
    for saved in (other, same):                     # a checkpoint's profiles, trained on to step 9
        saved.profiles[1][0].fill_(7.0)
        saved.step = 9
    with pytest.raises(BadInputError, match=r"profiles are \[0.05, 0.2\], not \[0.05, 0.1\]"):
        ema.load_state_dict(other.state_dict())     # a length-0.2 average would go on as if it were 0.1
    assert ema.step == 0 and not ema.profiles[1][0].eq(7.0).any()
    ema.load_state_dict(same.state_dict())
    assert ema.step == 9 and ema.profiles[1][0].eq(7.0).all()


def test_the_earlier_weights_are_the_snapshot_at_the_step_asked_or_the_last_before_it(tmp_path):
    model = nn.Linear(2, 1)
    ema = PowerFunctionEMA(model)
    for step in range(1, 5):
        with torch.no_grad():
            model.weight.fill_(step)               # each step's weights their own, so each snapshot is another
        ema.update(model, step)
        if step % 2 == 0:
            ema.snapshot(tmp_path)
    weights, found = earlier_weights(tmp_path, 4)
    assert found == {"step": 4, "sigma_rel": 0.05}  # a snapshot at the step itself is the one
    torch.testing.assert_close(weights["weight"], ema.profiles[0][0])   # the shorter profile, as of step 4
    assert earlier_weights(tmp_path, 3)[1]["step"] == 2
    with pytest.raises(BadInputError, match="no post-hoc EMA snapshot at or before step 1 "):
        earlier_weights(tmp_path, 1)


# ----------------------------------------------------------------------------- training, evaluation, sampling

@pytest.fixture(scope="module")
def posthoc_run(trained_run, tmp_path_factory):
    """The session's stage 1 with a stage 2 of 6 steps keeping snapshots every 2 steps."""
    run, data = trained_run
    root = tmp_path_factory.mktemp("posthoc")
    shutil.copytree(run, root / "run", ignore=shutil.ignore_patterns("unet*", "latents*", "samples*", "log_unet*"))
    driver.main(["train-unet", "--run", str(root / "run"), *SMALL_UNET, "--max-steps", "6", "--posthoc-ema", "2",
                 "--deterministic"])
    return root / "run", data


def test_training_keeps_snapshots_and_a_resumed_run_ends_with_the_same_ones(posthoc_run, tmp_path):
    whole, _ = posthoc_run
    cut = tmp_path / "cut"
    shutil.copytree(whole, cut, ignore=shutil.ignore_patterns("unet*", "ema_snapshots", "samples*", "log_unet*"))
    flags = ["train-unet", "--run", str(cut), *SMALL_UNET, "--posthoc-ema", "2", "--deterministic"]
    driver.main([*flags, "--max-steps", "3"])
    assert sorted(snapshot_files(cut)) == [2, 3]                     # every 2 steps, and with the checkpoint at 3
    driver.main([*flags, "--max-steps", "3", "--resume"])            # finished: nothing trained, and the EMA lengths
    assert sorted(snapshot_files(cut)) == [2, 3]                     # at step 3 still need the snapshot of step 3
    driver.main([*flags, "--max-steps", "6", "--resume"])
    assert sorted(snapshot_files(whole)) == sorted(snapshot_files(cut)) == [2, 4, 6]  # not 3: the fit would count it
    for step in (4, 6):                                              # the profiles came back from the checkpoint
        a, b = ckpt(whole / "ema_snapshots" / f"step{step:07d}.pt"), ckpt(cut / "ema_snapshots" / f"step{step:07d}.pt")
        assert a["sigma_rels"] == [0.05, 0.1] and a["step"] == step
        for pa, pb in zip(a["profiles"], b["profiles"]):
            for name in pa:
                torch.testing.assert_close(pa[name], pb[name], rtol=1e-5, atol=1e-6)
    state = ckpt(cut / "unet.pt")["posthoc_ema"]
    assert state["step"] == 6 and set(state["profiles"][0]) == set(ckpt(cut / "unet.pt")["model"])
    # the flag is part of the run: a resumed run keeps it, another value is refused
    assert "--posthoc-ema" in error_of(driver.main, [*flags[:-3], "--posthoc-ema", "3", "--max-steps", "8", "--resume"])
    # a stage 2 begun afresh where an earlier one left its snapshots would take them for its own: moved aside
    for f in cut.glob("unet*.pt"):
        f.unlink()
    driver.main([*flags, "--max-steps", "2"])
    assert sorted(snapshot_files(cut)) == [2] and ckpt(cut / "ema_snapshots" / "step0000002.pt")["step"] == 2
    assert len(list((cut / "ema_snapshots.replaced").glob("step*.pt"))) == 3

def test_a_run_stopped_at_a_snapshot_step_keeps_that_snapshot_when_resumed(posthoc_run, tmp_path):
    """Stopped at step 4, a step of --posthoc-ema 2: its snapshot is one the uninterrupted run has too, and the resumed
    run, going on from step 5, does not write it again."""
    whole, _ = posthoc_run
    cut = tmp_path / "cut"
    shutil.copytree(whole, cut, ignore=shutil.ignore_patterns("unet*", "ema_snapshots", "samples*", "log_unet*"))
    flags = ["train-unet", "--run", str(cut), *SMALL_UNET, "--posthoc-ema", "2", "--deterministic"]
    driver.main([*flags, "--max-steps", "4"])
    driver.main([*flags, "--max-steps", "6", "--resume"])
    assert sorted(snapshot_files(cut)) == [2, 4, 6]
    for step in (2, 4, 6):
        a, b = ckpt(whole / "ema_snapshots" / f"step{step:07d}.pt"), ckpt(cut / "ema_snapshots" / f"step{step:07d}.pt")
        assert a["step"] == b["step"] == step
        for pa, pb in zip(a["profiles"], b["profiles"]):
            for name in pa:
                torch.testing.assert_close(pa[name], pb[name], rtol=1e-5, atol=1e-6)


class Killed(BaseException):
    """kill -9, as far as a test can: nothing after it runs, no handler saves anything."""


def test_a_kill_between_a_checkpoint_and_its_snapshot_loses_no_snapshot(posthoc_run, tmp_path, monkeypatch):
    """A checkpoint's snapshot is written before it: killed between the two, the run resumes from the checkpoint
    before and draws the snapshots again, the same set as a run not stopped (found by review: written after it, the
    snapshot was lost for good, and `driver.py ema` refused the run). A resumed run also drops a snapshot beyond its
    checkpoint (of a longer attempt, killed) and writes its checkpoint's again where it is missing, even when it
    trains no further."""
    whole, _ = posthoc_run
    cut = tmp_path / "cut"
    shutil.copytree(whole, cut, ignore=shutil.ignore_patterns("unet*", "ema_snapshots", "samples*", "log_unet*"))
    flags = ["train-unet", "--run", str(cut), *SMALL_UNET, "--posthoc-ema", "2", "--save-every", "3",
             "--deterministic", "--max-steps", "9"]
    write = PowerFunctionEMA.snapshot

    def killed_at_9(self, run):  # step 9 is no step of --posthoc-ema 2: its snapshot goes with its checkpoint alone
        if self.step == 9:
            raise Killed
        write(self, run)
    monkeypatch.setattr(PowerFunctionEMA, "snapshot", killed_at_9)
    with pytest.raises(Killed):
        driver.main(flags)
    monkeypatch.undo()
    driver.main([*flags, "--resume"])
    assert ckpt(cut / "unet.pt")["step"] == 9 and sorted(snapshot_files(cut)) == [2, 3, 4, 6, 8, 9]
    for step in (2, 4, 6):
        a, b = ckpt(whole / "ema_snapshots" / f"step{step:07d}.pt"), ckpt(cut / "ema_snapshots" / f"step{step:07d}.pt")
        for pa, pb in zip(a["profiles"], b["profiles"]):
            for name in pa:
                torch.testing.assert_close(pa[name], pb[name], rtol=1e-5, atol=1e-6)
    last = cut / "ema_snapshots" / "step0000009.pt"
    kept = ckpt(last)
    shutil.copy(last, cut / "ema_snapshots" / "step0000010.pt")   # of a longer attempt, killed
    last.unlink()                                                   # lost as the checkpoint-first order lost it
    driver.main([*flags, "--resume"])                               # finished: trains nothing, mends the snapshots
    assert sorted(snapshot_files(cut)) == [2, 3, 4, 6, 8, 9]
    for pa, pb in zip(kept["profiles"], ckpt(last)["profiles"]):
        for name in pa:
            assert torch.equal(pa[name], pb[name])


def test_weights_gone_nan_stop_the_run_before_their_snapshot_is_written(posthoc_run, tmp_path, monkeypatch):
    run = tmp_path / "run"
    shutil.copytree(posthoc_run[0], run, ignore=shutil.ignore_patterns("unet*", "ema_snapshots", "samples*"))
    spoil = PowerFunctionEMA.update

    def update_to_nan(self, model, step):
        spoil(self, model, step)
        if step == 3:
            for profile in self.profiles:
                profile[0].fill_(float("nan"))

    monkeypatch.setattr(PowerFunctionEMA, "update", update_to_nan)
    message = error_of(driver.main, ["train-unet", "--run", str(run), *SMALL_UNET, "--posthoc-ema", "2",
                                     "--max-steps", "6", "--log-every", "6"])
    assert "NaN/inf by step 4" in message and sorted(snapshot_files(run)) == [2]


def test_evaluate_scores_each_ema_length_and_ema_sets_the_sampling_weights(posthoc_run, tmp_path, capsys):
    run, data = posthoc_run
    out = tmp_path / "eval"
    driver.main(["evaluate", "--run", str(run), "--out", str(out), "--holdout", "0.5", "--features", "domain",
                 "--classifier-steps", "0", "--steps", "3", "--ema-lengths", "0.05,0.1,0.2"])
    printed = capsys.readouterr().out
    curve = json.loads((out / "metrics.json").read_text())["ema_lengths"]
    assert [r["sigma_rel"] for r in curve["rows"]] == [0.05, 0.1, 0.2] and curve["unet_step"] == 6
    # 3 snapshots make 0.2 only roughly (its response off by 27%): never the one chosen, whatever its FID
    assert [r["fit"] <= GOOD_FIT for r in curve["rows"]] == [True, True, False] and "not fitted" in printed
    assert curve["best"] == min(curve["rows"][:2], key=lambda r: r["scores"]["fid"])["sigma_rel"]
    assert curve["samples_row"] == "run's EMA" and curve["samples_sigma_rel"] == pytest.approx(
        running_ema_sigma_rel(0.999, 6))
    assert all(r["scores"]["count"] == 6 and r["snapshots"] == 3 for r in curve["rows"])
    assert curve["rows"][0]["scores"]["fid"] != curve["rows"][1]["scores"]["fid"]  # other weights, other samples
    report = (out / "report.md").read_text()
    assert "## EMA length" in report and "| post-hoc" in printed and (out / "eval_ema_lengths.png").stat().st_size > 1000
    # the evaluation's model was put back: its samples row is the run's own EMA
    assert load_run(run, "cpu").posthoc_ema is None

    # `ema --sigma-rel best` needs the curve in RUN/metrics.json; a number needs none, and one the snapshots make
    assert "--ema-lengths" in error_of(driver.main, ["ema", "--run", str(run), "--sigma-rel", "best"])
    (run / "metrics.json").write_text((out / "metrics.json").read_text()[:100])   # cut short by an older evaluate
    assert "cannot be read as JSON" in error_of(driver.main, ["ema", "--run", str(run), "--sigma-rel", "best"])
    (run / "metrics.json").unlink()
    assert "cannot be made from the 3 snapshots" in error_of(driver.main, ["ema", "--run", str(run),
                                                                         "--sigma-rel", "0.01"])
    assert "sampling_ema" not in ckpt(run / "unet.pt")
    other = json.loads((out / "metrics.json").read_text())     # a curve of another stage 2 at the same step
    other["ema_lengths"]["unet_trained_fingerprint"] = "0" * 16
    (run / "metrics.json").write_text(json.dumps(other))
    assert "measured on another stage 2" in error_of(driver.main, ["ema", "--run", str(run), "--sigma-rel", "best"])
    unfitted = json.loads((out / "metrics.json").read_text())  # the length never chosen scored lowest of all
    unfitted["ema_lengths"]["rows"][2]["scores"]["fid"] = 0.0
    (run / "metrics.json").write_text(json.dumps(unfitted))
    capsys.readouterr()
    (run / ".unet.pt.tmp999").write_bytes(b"half")     # an earlier `ema` killed as it saved: removed
    driver.main(["ema", "--run", str(run), "--sigma-rel", "best"])
    assert not (run / ".unet.pt.tmp999").exists()
    chosen = ckpt(run / "unet.pt")["sampling_ema"]
    assert chosen["sigma_rel"] == curve["best"] and chosen["step"] == 6
    # and says by which evaluation: the length is the best for the sampling that evaluation drew
    drawn = json.loads((out / "metrics.json").read_text())["sampling"]
    assert chosen["chosen_by"]["sampling"] == drawn
    assert chosen["chosen_by"]["metrics"] == str((run / "metrics.json").resolve())
    assert chosen["chosen_by"]["fid"] == next(r["scores"]["fid"] for r in curve["rows"]
                                              if r["sigma_rel"] == curve["best"])
    assert f"drawn by {drawn['sampler']} in {drawn['steps']} steps" in capsys.readouterr().out
    model = load_run(run, "cpu")
    weights, _ = reconstruct(run, curve["best"])
    for name, p in model.unet.named_parameters():
        torch.testing.assert_close(p, weights[name])
    # what sampling writes names the length
    driver.main(["sample", "--run", str(run), "--num", "2", "--steps", "2", "--out", str(tmp_path / "set"),
                 "--format", "npz"])
    manifest = (tmp_path / "set" / "samples" / "manifest.csv").read_text().splitlines()
    column = manifest[0].split(",").index("posthoc_ema_sigma_rel")
    assert float(manifest[1].split(",")[column]) == curve["best"]
    # none: the run's EMA again; training further drops a choice made for one step's weights
    driver.main(["ema", "--run", str(run), "--sigma-rel", "none"])
    assert "sampling_ema" not in ckpt(run / "unet.pt") and load_run(run, "cpu").posthoc_ema is None
    driver.main(["ema", "--run", str(run), "--sigma-rel", "0.1"])
    capsys.readouterr()
    driver.main(["train-unet", "--run", str(run), *SMALL_UNET, "--max-steps", "8", "--resume"])
    assert "sampling_ema" not in ckpt(run / "unet.pt") and sorted(snapshot_files(run))[-1] == 8
    assert "the EMA length `driver.py ema` chose (sigma_rel 0.1) is set aside" in capsys.readouterr().out


def test_autoguidance_guides_by_the_snapshot_at_the_fraction_and_the_set_says_so(posthoc_run, tmp_path, capsys):
    run = tmp_path / "run"
    shutil.copytree(posthoc_run[0], run, ignore=shutil.ignore_patterns("samples*"))
    model = load_run(run, "cpu")
    fast = ["--sampler", "ddim", "--steps", "3", "--gif-frames", "2", "--num", "3", "--seed", "4", "--format", "npz"]
    flags = ["--run", str(run), *fast, "--autoguidance", "2", "--guide-at", "0.5"]
    guided = predict.predict(predict.parse_args([*flags, "--out", str(tmp_path / "ag")]))
    assert "6 network calls per batch" in capsys.readouterr().out   # 3 steps, each calling the guide too
    plain = predict.predict(predict.parse_args(["--run", str(run), *fast, "--out", str(tmp_path / "plain")]))
    # the guide: the shorter profile of the last snapshot at or before half the UNet's steps
    step = max(s for s in snapshot_files(run) if s <= round(0.5 * model.unet_step))
    snapshot = ckpt(run / "ema_snapshots" / f"step{step:07d}.pt")
    guide = UNet(model.unet.cfg).eval()
    guide.load_state_dict(snapshot["profiles"][snapshot["sigma_rels"].index(0.05)])
    sampling = predict.sampling_from_args(predict.parse_args(fast), model)
    torch.manual_seed(batch_seed(4, 0))                        # as `sample` seeds its first batch
    x_T = torch.randn(3, *model.latent_shape)
    with torch.no_grad():
        z, _ = predict.sample_latents(model.diffusion, Autoguided(model.unet, guide, 2.0), x_T, sampling)
        assert torch.allclose(guided, model.vqvae.decode(z / model.latent_scale).clamp(-1, 1), atol=1e-5)
    assert not torch.allclose(guided, plain, atol=1e-3)
    # the manifest names the guide; a plain set has no such columns, and a set cannot resume with another guide
    rows = (tmp_path / "ag" / "samples" / "manifest.csv").read_text().splitlines()
    header, first = rows[0].split(","), rows[1].split(",")
    assert [first[header.index(k)] for k in ("autoguidance", "guide_step", "guide_sigma_rel")] == ["2.0", str(step), "0.05"]
    assert "autoguidance" not in (tmp_path / "plain" / "samples" / "manifest.csv").read_text().splitlines()[0]
    assert "autoguidance: 2.0 then, 3.0 now" in error_of(
        predict.main, [*flags[:-4], "--autoguidance", "3", "--guide-at", "0.5", "--out", str(tmp_path / "ag"), "--resume"])
    # evaluate samples the same way and says so in metrics.json (and DDIM's noise with it)
    driver.main(["evaluate", "--run", str(run), "--out", str(tmp_path / "eval"), "--holdout", "0.5", "--features",
                 "domain", "--classifier-steps", "0", "--steps", "2", "--autoguidance", "2", "--guide-at", "0.5",
                 "--sampler", "ddim", "--eta", "0.5"])
    sampled = json.loads((tmp_path / "eval" / "metrics.json").read_text())["sampling"]
    assert (sampled["autoguidance"], sampled["guide_step"], sampled["guide_sigma_rel"]) == (2.0, step, 0.05)
    assert (sampled["sampler"], sampled["eta"]) == ("ddim", 0.5)
    # a guide at or after the UNet's own step is no weaker version of it; W must be positive
    assert "--guide-at" in error_of(predict.main, [*flags[:-2], "--guide-at", str(model.unet_step)])
    assert "--autoguidance" in error_of(predict.main, [*flags[:-4], "--autoguidance", "0"])


def test_autoguidance_in_an_interval_of_steps_guides_the_steps_inside_it_and_the_set_says_so(posthoc_run, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(posthoc_run[0], run, ignore=shutil.ignore_patterns("samples*"))
    model = load_run(run, "cpu")
    fast = ["--run", str(run), "--sampler", "ddim", "--steps", "4", "--gif-frames", "2", "--num", "3", "--seed", "4",
            "--format", "npz"]
    guided = [*fast, "--autoguidance", "2", "--guide-at", "0.5"]
    visited = model.diffusion.ddim_timesteps(model.diffusion.num_steps - 1, 4)   # [999, 666, 333, 0]
    first, last = visited[2] + 1, visited[1]                                     # holds 666 alone
    images = {name: predict.predict(predict.parse_args([*flags, "--out", str(tmp_path / name)])) for name, flags in [
        ("plain", fast), ("guided", guided), ("all", [*guided, "--guide-interval", f"0,{visited[0]}"]),
        ("none", [*guided, "--guide-interval", f"{visited[2] + 1},{visited[1] - 1}"]),
        ("one", [*guided, "--guide-interval", f"{first},{last}"])]}
    assert torch.equal(images["all"], images["guided"]) and torch.equal(images["none"], images["plain"])
    assert not torch.allclose(images["one"], images["guided"], atol=1e-3)
    assert not torch.allclose(images["one"], images["plain"], atol=1e-3)
    # the one step guided, by hand: the main network alone at the other steps
    main, guide = model.unet, load_guide(model, run, 0.5)[0]
    sampling = predict.sampling_from_args(predict.parse_args(fast), model)
    torch.manual_seed(batch_seed(4, 0))
    x_T = torch.randn(3, *model.latent_shape)

    def guided_at_666(x_t, t):
        return Autoguided(main, guide, 2.0)(x_t, t) if int(t[0]) == last else main(x_t, t)

    with torch.no_grad():
        z, _ = predict.sample_latents(model.diffusion, guided_at_666, x_T, sampling)
        assert torch.allclose(images["one"], model.vqvae.decode(z / model.latent_scale).clamp(-1, 1), atol=1e-5)
    with open(tmp_path / "one" / "samples" / "manifest.csv", newline="") as f:
        assert next(csv.DictReader(f))["guide_interval"] == f"[{first}, {last}]"
    assert "guide_interval" not in (tmp_path / "guided" / "samples" / "manifest.csv").read_text().splitlines()[0]
    assert "--guide-interval" in error_of(predict.main, [*guided, "--guide-interval", "1000,1200"])  # past the T steps
    for bad in ("700", "700,100", "-1,5", "a,b"):
        with pytest.raises(SystemExit) as e:
            predict.parse_args([*guided, "--guide-interval", bad])
        assert e.value.code == 2


def test_the_guides_ema_length_is_reconstructed_at_its_snapshot(posthoc_run, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(posthoc_run[0], run, ignore=shutil.ignore_patterns("samples*"))
    model = load_run(run, "cpu")
    step = max(s for s in snapshot_files(run) if s <= round(0.5 * model.unet_step))
    # the longer profile kept in the snapshot is itself an EMA of length 0.10: reconstructed there, it comes back
    guide, record = load_guide(model, run, 0.5, 0.10)
    snapshot = ckpt(run / "ema_snapshots" / f"step{step:07d}.pt")
    stored = snapshot["profiles"][snapshot["sigma_rels"].index(0.10)]
    for name, value in guide.state_dict().items():
        if name in stored:
            assert torch.allclose(value, stored[name], atol=1e-4), name
    assert record == {"guide_step": step, "guide_sigma_rel": 0.10}
    shorter, _ = load_guide(model, run, 0.5, 0.02)  # a length below both profiles: other weights
    assert any(not torch.allclose(a, b, atol=1e-4) for a, b in zip(shorter.parameters(), guide.parameters()))
    fast = ["--run", str(run), "--sampler", "ddim", "--steps", "3", "--gif-frames", "2", "--num", "2", "--format", "npz",
            "--autoguidance", "2", "--guide-at", "0.5"]
    predict.predict(predict.parse_args([*fast, "--guide-sigma-rel", "0.1", "--out", str(tmp_path / "ag")]))
    rows = (tmp_path / "ag" / "samples" / "manifest.csv").read_text().splitlines()
    assert rows[1].split(",")[rows[0].split(",").index("guide_sigma_rel")] == "0.1"
    assert "--guide-sigma-rel" in error_of(predict.main, [*fast, "--guide-sigma-rel", "0"])


def test_ema_lengths_of_a_stage_2_still_training_or_stopped_off_its_snapshots_are_refused_before_any_work(
        posthoc_run, tmp_path, monkeypatch):
    """The curve needs the snapshot of unet.pt's step as the last one, and no command writing later ones: it failed
    at the end, after the samples row, the features and the memorisation check had taken their minutes."""
    import evaluation.evaluate
    from runtime.checkpoint import run_lock

    def expensive(*args, **kwargs):
        raise AssertionError("evaluate began its work")
    monkeypatch.setattr(evaluation.evaluate, "load_slices", expensive)
    run = tmp_path / "run"
    shutil.copytree(posthoc_run[0], run)
    flags = ["evaluate", "--run", str(run), "--out", str(tmp_path / "eval"), "--ema-lengths", "auto"]
    with run_lock(run):                                              # train-unet --resume, still training
        assert "another command is training or changing" in error_of(driver.main, flags)
    step = ckpt(run / "unet.pt")["step"]                             # 6 (8, after the tests above train it on)
    shutil.copy(snapshot_files(run)[step], run / "ema_snapshots" / f"step{step + 2:07d}.pt")  # then a kill -9
    message = error_of(driver.main, flags)
    assert f"the last EMA snapshot in {run} is of step {step + 2}, unet.pt of step {step}" in message
    (run / "unet.pt").unlink()                                       # a new stage 2 before its first checkpoint
    assert "does not exist" in error_of(driver.main, flags)
    assert not (tmp_path / "eval" / "report.md").exists()


def test_ema_lengths_without_snapshots_or_out_of_range_are_refused(trained_run):
    run, _ = trained_run
    assert "--posthoc-ema" in error_of(predict.main, ["--run", str(run), "--autoguidance", "2", "--num", "1"])
    assert "--posthoc-ema" in error_of(driver.main, ["ema", "--run", str(run), "--sigma-rel", "0.1"])
    assert "--posthoc-ema" in error_of(driver.main, ["evaluate", "--run", str(run), "--holdout", "0.5", "--features",
                                                     "domain", "--classifier-steps", "0", "--steps", "2",
                                                     "--ema-lengths", "0.1"])
    for flags in (["ema", "--run", str(run), "--sigma-rel", "0.4"], ["evaluate", "--run", str(run), "--ema-lengths", "x"]):
        with pytest.raises(SystemExit) as e:  # argparse: one line and exit status 2
            driver.main(flags)
        assert e.value.code == 2


def test_ema_takes_one_length_best_or_none_and_says_so_in_one_line():
    """`evaluate --ema-lengths auto` sits beside `ema --sigma-rel best` in the READMEs: `auto` given to `ema` was a
    traceback."""
    import argparse
    from evaluation.ema_lengths import sigma_rel_arg
    assert [sigma_rel_arg(v) for v in ("best", "none", "0.05")] == ["best", "none", "0.05"]
    for text in ("auto", "0.05,0.1", "bst", "0", "-1"):
        with pytest.raises(argparse.ArgumentTypeError, match="expected one EMA length sigma_rel, best or none"):
            sigma_rel_arg(text)
