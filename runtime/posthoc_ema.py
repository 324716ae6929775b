"""Post-hoc EMA (Karras et al. 2024, "Analyzing and Improving the Training Dynamics of Diffusion Models", EDM2,
section 3 and appendix C): the EMA length chosen after training instead of before it.

During training two power-function EMAs of the weights are kept (`PowerFunctionEMA`) and both are saved now and
then (`RUN/ema_snapshots/step*.pt`). A power-function EMA at step t averages the weights of steps tau <= t with
weights proportional to tau^gamma: it forgets the random start by construction, and its length relative to the
run so far, sigma_rel (the standard deviation of that weighting divided by t), is the same at every t. Every
snapshot is such an average, so a weighted sum of snapshots can approximate the average of any other length: the
weights are the least-squares fit of the target's response by the snapshots' responses, from their inner products
in closed form (EDM2 eq. 38-40). `reconstruct` builds the weights of any sigma_rel at the last snapshot's step.

Time is the optimizer step here (EDM2 counts images; with a fixed batch the two differ by a constant factor, which
sigma_rel does not see). The profiles' lengths are EDM2's, 0.05 and 0.10.
"""
from __future__ import annotations

import math
import re
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn

from runtime.checkpoint import atomic_save, load_checkpoint, remove_unfinished
from runtime.errors import BadInputError

PROFILES = (0.05, 0.10)  # sigma_rel of the two EMAs kept while training (EDM2's)
GOOD_FIT = 0.2  # the fitted response's relative error above which a length is another average than asked for: far
                # from the kept profiles, with few snapshots, its coefficients sum well below 1 (a shrunken network)
SNAPSHOTS = "ema_snapshots"  # RUN/ema_snapshots/step0001000.pt
SNAPSHOT_NAME = re.compile(r"step(\d+)\.pt$")


def sigma_rel_to_gamma(sigma_rel: float) -> float:
    """The exponent gamma of the power-function EMA of relative length sigma_rel: the real root of
    gamma^3 + 7 gamma^2 + (16 - s^-2) gamma + 12 - s^-2 = 0 (EDM2 eq. 31 solved for gamma). Needs sigma_rel < 12^-1/2,
    the length of a plain average of everything (gamma = 0)."""
    if not 0 < sigma_rel < 12 ** -0.5:
        raise BadInputError(f"an EMA length sigma_rel must be in (0, {12 ** -0.5:.4f}), got {sigma_rel}")
    t = sigma_rel ** -2
    return float(max(r.real for r in np.roots([1, 7, 16 - t, 12 - t]) if abs(r.imag) < 1e-9))


def gamma_to_sigma_rel(gamma: float) -> float:
    """EDM2 eq. 31: the standard deviation, relative to t, of the weighting tau^gamma on [0, t]."""
    return math.sqrt((gamma + 1) / ((gamma + 2) ** 2 * (gamma + 3)))


def power_beta(gamma: float, t: int) -> float:
    """The EMA's decay at step t >= 1 (EDM2 eq. 34): beta_t = (1 - 1/t)^(gamma + 1); step 1 copies the weights."""
    return (1 - 1 / t) ** (gamma + 1)


def response_inner(t_a: np.ndarray, gamma_a: np.ndarray, t_b: np.ndarray, gamma_b: np.ndarray) -> np.ndarray:
    """<p_a, p_b> of two power-function responses p(tau) = (gamma + 1) tau^gamma / t^(gamma + 1) on [0, t]
    (EDM2 eq. 40), elementwise over broadcast arrays."""
    t_a, gamma_a, t_b, gamma_b = np.broadcast_arrays(*(np.asarray(v, dtype=np.float64) for v in (t_a, gamma_a, t_b, gamma_b)))
    t_min, t_max = np.minimum(t_a, t_b), np.maximum(t_a, t_b)
    gamma_later = np.where(t_a <= t_b, gamma_b, gamma_a)  # the exponent of the response that ends later
    return (gamma_a + 1) * (gamma_b + 1) / (gamma_a + gamma_b + 1) * (t_min / t_max) ** gamma_later / t_max


def posthoc_coefficients(snapshots: list[tuple[int, float]], target: tuple[int, float]) -> np.ndarray:
    """Weights x of the snapshots (step t_i, gamma_i) whose sum of responses is the least-squares fit of the target
    (step, gamma)'s response: the normal equations A x = b, A_ij = <p_i, p_j>, b_i = <p_i, p_target> (EDM2 eq. 38),
    solved by least squares (A is near-singular when snapshots are dense)."""
    a, b = normal_equations(snapshots, target)
    return np.linalg.lstsq(a, b, rcond=None)[0]


def normal_equations(snapshots: list[tuple[int, float]], target: tuple[int, float]) -> tuple[np.ndarray, np.ndarray]:
    """(A, b) of `posthoc_coefficients`: the snapshots' responses' inner products, and each one's with the target's."""
    t, g = (np.array(v, dtype=np.float64) for v in zip(*snapshots))
    a = response_inner(t[:, None], g[:, None], t[None, :], g[None, :])
    b = response_inner(t, g, np.float64(target[0]), np.float64(target[1]))
    return a, b


class PowerFunctionEMA:
    """The profiles kept while training: for each sigma_rel in PROFILES a float32 copy of the model's parameters,
    updated after every optimizer step t by theta_hat <- beta_t theta_hat + (1 - beta_t) theta (one fused lerp per
    profile, like `modules.EMA`). `state_dict` / `load_state_dict` carry them through a checkpoint; `snapshot` writes
    them to RUN/ema_snapshots/step<t>.pt, atomically."""

    def __init__(self, model: nn.Module, sigma_rels: tuple[float, ...] = PROFILES):
        self.sigma_rels = tuple(sigma_rels)
        self.gammas = [sigma_rel_to_gamma(s) for s in self.sigma_rels]
        self.names = [name for name, _ in model.named_parameters()]
        self.profiles = [[p.detach().float().clone() for p in model.parameters()] for _ in self.sigma_rels]
        self.step = 0

    @torch.no_grad()
    def update(self, model: nn.Module, step: int):
        params = [p.detach().float() for p in model.parameters()]
        for gamma, averaged in zip(self.gammas, self.profiles):
            torch._foreach_lerp_(averaged, params, 1 - power_beta(gamma, step))
        self.step = step

    def state_dict(self) -> dict:
        return {"sigma_rels": list(self.sigma_rels), "step": self.step,
                "profiles": [dict(zip(self.names, averaged)) for averaged in self.profiles]}

    def load_state_dict(self, state: dict):
        if list(state["sigma_rels"]) != list(self.sigma_rels):
            raise BadInputError(f"the checkpoint's post-hoc EMA profiles are {state['sigma_rels']}, not {list(self.sigma_rels)}")
        for averaged, saved in zip(self.profiles, state["profiles"]):
            torch._foreach_copy_(averaged, [saved[name].to(averaged[0].device) for name in self.names])
        self.step = state["step"]

    def finite(self) -> bool:
        return all(p.isfinite().all() for profile in self.profiles for p in profile)

    def snapshot(self, run: Path):
        """Write both profiles to RUN/ema_snapshots/step<step>.pt; the caller has checked them finite (`finite`, on
        every rank: train.py before a snapshot, runtime/loop.py before a checkpoint)."""
        folder = run / SNAPSHOTS
        folder.mkdir(exist_ok=True)
        state = self.state_dict()
        state["profiles"] = [{n: p.cpu() for n, p in profile.items()} for profile in state["profiles"]]
        atomic_save({"kind": "ema_snapshot", **state}, folder / f"step{self.step:07d}.pt")


def snapshot_files(run: Path) -> dict[int, Path]:
    """step -> RUN/ema_snapshots/step<step>.pt, in step order."""
    found = {int(m.group(1)): f for f in (run / SNAPSHOTS).glob("step*.pt") if (m := SNAPSHOT_NAME.search(f.name))}
    return dict(sorted(found.items()))


def drop_snapshots_after(run: Path, step: int, keep_last: bool = True) -> int:
    """Delete snapshots of steps after `step` (a resumed run draws them again from its checkpoint), and the one at
    `step` unless keep_last (one written because the run stopped there, which a run not stopped would not have, and
    which the fit of `reconstruct` would count); how many."""
    later = [f for s, f in snapshot_files(run).items() if s > step or (s == step and not keep_last)]
    for f in later:
        f.unlink()
    remove_unfinished(run / SNAPSHOTS, "step*.pt")
    return len(later)


def earlier_weights(run: Path, step: int) -> tuple[dict[str, torch.Tensor], dict]:
    """The shorter profile's weights (sigma_rel 0.05) of the last snapshot at or before `step`: the same UNet earlier
    in its training, autoguidance's guide (`predict.py --autoguidance`), and {step, sigma_rel}."""
    files = {s: f for s, f in snapshot_files(run).items() if s <= step}
    if not files:
        raise BadInputError(f"no post-hoc EMA snapshot at or before step {step} in {run / SNAPSHOTS}: autoguidance takes "
                            f"its guide from them (train-unet --posthoc-ema EVERY keeps them)")
    found = max(files)
    snapshot = load_checkpoint(files[found], "ema_snapshot")
    k = snapshot["sigma_rels"].index(min(snapshot["sigma_rels"]))
    return snapshot["profiles"][k], {"step": found, "sigma_rel": snapshot["sigma_rels"][k]}


def reconstruct(run: Path, sigma_rel: float, step: int | None = None) -> tuple[dict[str, torch.Tensor], dict]:
    """The parameters of the power-function EMA of length sigma_rel at `step` (default: the last snapshot's), as
    the weighted sum of the run's snapshots up to that step, and a record of how: {sigma_rel, step, snapshots,
    fit}, `fit` the relative L2 error of the fitted response (0: exact)."""
    return reconstruct_many(run, [sigma_rel], step)[0]


def reconstruct_many(run: Path, sigma_rels: list[float], step: int | None = None) -> list[tuple[dict, dict]]:
    """`reconstruct` for several lengths, each snapshot read once."""
    files = {s: f for s, f in snapshot_files(run).items() if step is None or s <= step}
    if not files:
        raise BadInputError(f"no post-hoc EMA snapshots in {run / SNAPSHOTS} (train-unet --posthoc-ema EVERY keeps them)")
    step = max(files) if step is None else step
    if step not in files:
        raise BadInputError(f"no snapshot at step {step} in {run / SNAPSHOTS}: an EMA is reconstructed at a snapshot's step")
    targets = [(step, sigma_rel_to_gamma(s)) for s in sigma_rels]
    profiles = load_checkpoint(files[step], "ema_snapshot")["sigma_rels"]
    pairs = [(s, sigma_rel_to_gamma(p)) for s in files for p in profiles]
    x = np.stack([posthoc_coefficients(pairs, target) for target in targets])  # (targets, snapshots x profiles)
    weights, k = [{} for _ in targets], 0
    for s, f in files.items():
        snapshot = load_checkpoint(f, "ema_snapshot")
        if snapshot["sigma_rels"] != profiles:
            raise BadInputError(f"{f} holds profiles {snapshot['sigma_rels']}, the others {profiles}")
        for profile in snapshot["profiles"]:
            for name, value in profile.items():
                value = value.double()
                for w, coefficient in zip(weights, x[:, k]):
                    w[name] = w.get(name, 0) + float(coefficient) * value
            k += 1
    return [({n: v.float() for n, v in w.items()},
             {"sigma_rel": s, "step": step, "snapshots": len(files), "fit": response_fit(pairs, xi, target)})
            for w, s, xi, target in zip(weights, sigma_rels, x, targets)]


def response_fit(pairs: list[tuple[int, float]], x: np.ndarray, target: tuple[int, float]) -> float:
    """||sum_i x_i p_i - p_target|| / ||p_target||, from the inner products alone."""
    a, b = normal_equations(pairs, target)
    c = response_inner(target[0], target[1], target[0], target[1])
    return float(math.sqrt(max(x @ a @ x - 2 * x @ b + c, 0.0) / c))


def running_ema_sigma_rel(decay: float, steps: int) -> float:
    """sigma_rel of `modules.EMA` after `steps` updates (decay warmed up as min(decay, (1 + n) / (10 + n))): the
    standard deviation of its weighting of the steps, relative to `steps`, worked out step by step."""
    n = np.arange(steps)  # update n + 1 mixes in step n + 1's weights with 1 - beta_n
    beta = np.where(n == 0, 0.0, np.minimum(decay, (1 + n) / (10 + n)))
    later = np.append(np.cumprod(beta[::-1])[::-1][1:], 1.0)  # prod of beta_m over the updates after n
    w = (1 - beta) * later
    tau = np.arange(1, steps + 1) / steps
    mean = float(w @ tau)
    return math.sqrt(float(w @ (tau - mean) ** 2))
