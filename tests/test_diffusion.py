"""The diffusion math (diffusion/): closed forms, an analytic oracle that every sampler must reproduce, the loss,
guidance, and the samplers' samples against the samplers as they were."""
import math

import pytest
import torch
import torch.nn as nn

from diffusion.gaussian import GaussianDiffusion
from diffusion.guidance import Autoguided, Guided, drop_conditions
from modules import UNet, UNetConfig


# ----------------------------------------------------------------------------- diffusion: closed forms

def test_default_schedule_is_the_original_linear_one():
    d = GaussianDiffusion()
    assert d.num_steps == 1000 and d.betas.dtype == torch.float64
    assert math.isclose(d.betas[0].item(), 1e-4) and math.isclose(d.betas[-1].item(), 0.02)
    cos = GaussianDiffusion(schedule="cosine")
    assert cos.alphas_cumprod[-1] < 1e-4 and (cos.betas <= 0.999).all()


@pytest.mark.parametrize("T", [1000, 500])
def test_schedules_follow_their_closed_forms(T):
    """Cosine (Nichol & Dhariwal 2021, eq. 17): abar_t = f(t) / f(0), f(t) = cos^2((t / T + s) / (1 + s) pi / 2),
    s = 0.008, with betas clipped at 0.999 (the last only, where f(T) = 0). Linear (Ho et al. 2020): betas evenly
    from 1e-4 to 0.02 at T = 1000, both ends times 1000 / T at other T (as Improved DDPM scales it), so abar_{T-1}
    ends near 4e-5 at every T; unscaled, T = 500 would end at 7e-3, far from pure noise."""
    cos, lin = GaussianDiffusion(T, "cosine"), GaussianDiffusion(T, "linear")
    f = [math.cos((t / T + 0.008) / 1.008 * math.pi / 2) ** 2 for t in range(T + 1)]
    abar = torch.tensor([f[t + 1] / f[0] for t in range(T - 1)], dtype=torch.float64)  # paper's t = 1 .. T-1
    assert torch.allclose(cos.alphas_cumprod[:-1], abar, rtol=1e-9, atol=0)
    assert cos.betas[-1] == 0.999 and cos.betas[:-1].max() < 0.9
    scale = 1000 / T
    betas = torch.tensor([scale * (1e-4 + (0.02 - 1e-4) * k / (T - 1)) for k in range(T)], dtype=torch.float64)
    assert torch.allclose(lin.betas, betas, rtol=1e-12, atol=0)
    assert 3e-5 < lin.alphas_cumprod[-1] < 5e-5


def test_q_sample_moments():
    torch.manual_seed(0)
    d = GaussianDiffusion()
    x0 = torch.full((200_000, 1, 1, 1), 0.7)
    for step in (0, 250, 999):
        t = torch.full((len(x0),), step)
        x_t = d.q_sample(x0, t, torch.randn_like(x0))
        ab = d.alphas_cumprod[step].item()
        assert abs(x_t.mean().item() - math.sqrt(ab) * 0.7) < 0.01
        assert abs(x_t.var().item() - (1 - ab)) < 0.01 * max(1 - ab, 0.01) + 1e-4


def test_q_posterior_matches_product_of_gaussians():
    """q(x_{t-1}|x_t,x0) ∝ N(x_t; sqrt(a_t) x_{t-1}, b_t) N(x_{t-1}; sqrt(ab_{t-1}) x0, 1-ab_{t-1})."""
    d = GaussianDiffusion(schedule="cosine")
    x0, x_t = torch.randn(5, 1, 1, 1, dtype=torch.float64), torch.randn(5, 1, 1, 1, dtype=torch.float64)
    t = torch.tensor([1, 10, 100, 500, 999])
    mean, var = d.q_posterior(x0, x_t, t)
    b, ab_prev = d.betas[t].view(-1, 1, 1, 1), d.alphas_cumprod_prev[t].view(-1, 1, 1, 1)
    precision = 1 / (1 - ab_prev) + (1 - b) / b
    expected_var = 1 / precision
    expected_mean = expected_var * (ab_prev.sqrt() * x0 / (1 - ab_prev) + (1 - b).sqrt() * x_t / b)
    assert torch.allclose(var, expected_var, rtol=1e-9)
    assert torch.allclose(mean, expected_mean, rtol=1e-9)


# ----------------------------------------------------------------------------- diffusion: analytic oracle

class OracleEps(nn.Module):
    """The optimal eps-predictor for data x0 ~ N(mu, s^2): E[eps | x_t] = b (x_t - a mu) / (a^2 s^2 + b^2),
    with a = sqrt(abar_t), b = sqrt(1 - abar_t)."""

    def __init__(self, diffusion, mu, s):
        super().__init__()
        self.ab, self.mu, self.s = diffusion.alphas_cumprod, mu, s

    def forward(self, x_t, t):
        ab = self.ab[t].view(-1, 1, 1, 1).to(x_t.dtype)
        a, b = ab.sqrt(), (1 - ab).sqrt()
        return b * (x_t - a * self.mu) / (a ** 2 * self.s ** 2 + b ** 2)


class OracleV(OracleEps):
    """The same optimum in the v parameterisation: v = (eps - sqrt(1 - abar) x_t) / sqrt(abar)."""

    def forward(self, x_t, t):
        ab = self.ab[t].view(-1, 1, 1, 1).to(x_t.dtype)
        return (super().forward(x_t, t) - (1 - ab).sqrt() * x_t) / ab.sqrt()


MU, S, N = 0.3, 0.5, 20_000


def run_sampler(d, oracle, sampler, steps=None):
    torch.manual_seed(0)
    x = torch.randn(N, 1, 1, 1, dtype=torch.float64)
    for _, x, _ in d.sample_steps(oracle, x, sampler, steps):
        pass
    return x


# DDIM is a first-order ODE solver: with the oracle its std error shrinks with the step count
# (linear schedule: -13% at 20 steps, -4.6% at 50, -1.8% at 100, -0.1% at 250), so 50 steps gets a
# wider std tolerance and 250 steps a tight one. The wrong noise of the original is off by far more.
@pytest.mark.parametrize("schedule", ["linear", "cosine"])
# DPM-Solver++(2M) is second order: at 20 steps it is as close as DDIM at 50 (linear -3.7%, cosine +0.7%).
@pytest.mark.parametrize("sampler, steps, std_tol", [("ddpm", None, 0.03), ("ddim", 50, 0.06), ("ddim", 250, 0.015),
                                                     ("dpmpp", 20, 0.05)])
def test_sampler_reproduces_the_data_distribution_with_the_oracle(schedule, sampler, steps, std_tol):
    d = GaussianDiffusion(schedule=schedule)
    x = run_sampler(d, OracleEps(d, MU, S), sampler, steps)
    assert abs(x.mean().item() - MU) < 0.015
    assert abs(x.std().item() / S - 1) < std_tol


@pytest.mark.parametrize("schedule", ["linear", "cosine"])
def test_dpmpp_is_more_accurate_than_ddim_at_equal_steps(schedule):
    d = GaussianDiffusion(schedule=schedule)
    err = {s: abs(run_sampler(d, OracleEps(d, MU, S), s, 20).std().item() / S - 1) for s in ("ddim", "dpmpp")}
    assert err["dpmpp"] < 0.3 * err["ddim"]  # measured: 0.29 (linear), 0.10 (cosine)


def test_dpmpp_first_step_is_ddim_and_later_steps_use_the_previous_x0():
    d = GaussianDiffusion()
    oracle = OracleEps(d, MU, S)
    x_t = torch.randn(4, 1, 1, 1, dtype=torch.float64)
    t, t_prev = torch.full((4,), 500), torch.full((4,), 400)
    first, x0, h = d.dpmpp_2m_step(oracle, x_t, t, t_prev)
    assert torch.allclose(first, d.ddim_step(oracle, x_t, t, t_prev)[0], atol=1e-12)
    # second order: D = x0 + (x0 - x0_before) h / (2 h_before); with x0_before = x0 it is first order again
    same, _, _ = d.dpmpp_2m_step(oracle, x_t, t, t_prev, x0_before=x0, h_before=h)
    moved, _, _ = d.dpmpp_2m_step(oracle, x_t, t, t_prev, x0_before=x0 - 1.0, h_before=h)
    assert torch.allclose(same, first, atol=1e-12)
    a_prev = d.alphas_cumprod[400]
    expected = first - a_prev.sqrt() * torch.expm1(-h) * 0.5  # D grows by 1 * h / (2h) = 0.5
    assert torch.allclose(moved, expected, atol=1e-12)


@pytest.mark.parametrize("sampler, steps", [("ddpm", None), ("ddim", 50), ("dpmpp", 20)])
def test_eps_and_v_parameterisations_agree_on_the_oracle(sampler, steps):
    eps_d, v_d = GaussianDiffusion(), GaussianDiffusion(prediction="v")
    x_eps = run_sampler(eps_d, OracleEps(eps_d, MU, S), sampler, steps)
    x_v = run_sampler(v_d, OracleV(v_d, MU, S), sampler, steps)
    assert torch.allclose(x_eps, x_v, atol=1e-6)
    x_t, t = torch.randn(6, 1, 1, 1, dtype=torch.float64), torch.tensor([0, 1, 50, 500, 900, 999])
    for a, b in zip(eps_d.predict_x0_eps(OracleEps(eps_d, MU, S), x_t, t), v_d.predict_x0_eps(OracleV(v_d, MU, S), x_t, t)):
        assert torch.allclose(a, b, rtol=1e-6, atol=1e-8)


def test_repeated_final_steps_keep_the_distribution():
    """The card's repeats (q_sample to step 29, denoise to 0) leave an exact sample exactly distributed."""
    d = GaussianDiffusion()
    oracle = OracleEps(d, MU, S)
    torch.manual_seed(1)
    x = MU + S * torch.randn(N, 1, 1, 1, dtype=torch.float64)
    for _ in range(5):
        x_t = d.q_sample(x, torch.full((N,), 29), torch.randn_like(x))
        for _, x, _ in d.sample_steps(oracle, x_t, "ddpm", start=29):
            pass
    assert abs(x.mean().item() - MU) < 0.015
    assert abs(x.std().item() / S - 1) < 0.03


def original_reverse_step(d, model, x_t, t, noisy=True, clamp=True):
    """The report's step: posterior mean, then 1.15 * sqrt(var) * (n1 + n2) (noisy), then x_t clamped to [-1, 1]."""
    x0 = d.predict_x0(x_t, t, model(x_t, t))
    mean, var = d.q_posterior(x0, x_t, t)
    noise = 1.15 * (torch.randn_like(x_t) + torch.randn_like(x_t)) if noisy else torch.randn_like(x_t)
    nonzero = (t > 0).to(x_t.dtype).view(-1, 1, 1, 1)
    x = mean + nonzero * var.sqrt() * noise
    return x.clamp(-1, 1) if clamp else x


def ode_map(d, x0, t, mu=MU, s=S):
    """The probability-flow ODE of data N(mu, s^2) from the data to step t, in closed form: it keeps each point's
    standard score, x_t = sqrt(abar) mu + sqrt(abar s^2 + 1 - abar) (x0 - mu) / s."""
    ab = d.alphas_cumprod[t]
    return ab.sqrt() * mu + (ab * s ** 2 + 1 - ab).sqrt() * (x0 - mu) / s


@pytest.mark.parametrize("start", [300, 999])
def test_ddim_inversion_follows_the_ode_and_ddim_sampling_retraces_it(start):
    """DDIM inversion against the closed-form ODE map of the oracle, and DDIM sampling from its end back to the data:
    both first-order, so the error shrinks with the step count (a wrong inversion step stays off)."""
    d = GaussianDiffusion().double()
    oracle = OracleEps(d, MU, S)
    x0 = MU + S * torch.linspace(-2.5, 2.5, 101, dtype=torch.float64).view(-1, 1, 1, 1)
    errors = {}
    for steps in (10, 250):
        for t, x_t in d.ddim_inversion(oracle, x0, start, steps):
            pass
        assert t == start
        back = x_t
        for _, back, _ in d.sample_steps(oracle, x_t, "ddim", steps, start=start):
            pass
        errors[steps] = ((x_t - ode_map(d, x0, start)).abs().max().item(), (back - x0).abs().max().item())
    # measured: at start 300 the largest error is 0.18 at 10 steps, 0.008 at 250; at 999 0.69 and 0.029, both ways
    assert errors[250][0] < 0.035 and errors[250][1] < 0.035              # near the closed form at 250 steps ...
    assert errors[10][0] > 10 * errors[250][0] and errors[10][1] > 10 * errors[250][1]  # ... converging as 1 / steps


def test_ddim_inversion_visits_the_timesteps_of_ddim_sampling_in_reverse():
    d = GaussianDiffusion()
    visited = [t for t, _ in d.ddim_inversion(lambda x, t: torch.zeros_like(x), torch.zeros(1, 1, 2, 2), 600, 7)]
    sampled = [t for t, _, _ in d.sample_steps(lambda x, t: torch.zeros_like(x), torch.zeros(1, 1, 2, 2), "ddim", 7,
                                                start=600)]
    assert visited == sampled[::-1] and visited[-1] == 600


# Measured with this oracle (mu 0.3, s 0.5): noise alone gives std 0.81 (1.63x); clamping alone
# mean 0.24, std 0.40; both together std 0.50 by coincidence but mean 0.15.
@pytest.mark.parametrize("noisy, clamp", [(True, False), (False, True), (True, True)])
def test_the_oracle_test_catches_the_original_defects(noisy, clamp):
    """Negative control: the same oracle check fails for the original's noise, its clamping, and both."""
    d = GaussianDiffusion()
    oracle = OracleEps(d, MU, S)
    torch.manual_seed(0)
    x = torch.randn(N, 1, 1, 1, dtype=torch.float64)
    for step in range(999, -1, -1):
        x = original_reverse_step(d, oracle, x, torch.full((N,), step), noisy, clamp)
    mean_off, std_off = abs(x.mean().item() - MU), abs(x.std().item() / S - 1)
    assert mean_off > 0.05 or std_off > 0.15          # the correct sampler: mean_off < 0.015, std_off < 0.03


def test_p_sample_adds_no_noise_at_the_last_step_and_never_clamps():
    d = GaussianDiffusion()
    oracle = OracleEps(d, 5.0, 1.0)                    # data far outside [-1, 1]
    x_t = torch.full((4, 1, 1, 1), 6.0, dtype=torch.float64)
    t = torch.zeros(4, dtype=torch.long)
    a, _ = d.p_sample(oracle, x_t, t, noise=torch.randn_like(x_t))
    b, _ = d.p_sample(oracle, x_t, t, noise=torch.randn_like(x_t))
    assert torch.equal(a, b) and a.min() > 1.0


def test_ddim_with_eta_one_on_all_steps_equals_ddpm_posterior():
    d = GaussianDiffusion()
    oracle = OracleEps(d, MU, S)
    x_t = torch.randn(8, 1, 1, 1, dtype=torch.float64)
    t = torch.full((8,), 400)
    noise = torch.randn_like(x_t)
    ddpm, _ = d.p_sample(oracle, x_t, t, noise=noise)
    ddim, _ = d.ddim_step(oracle, x_t, t, t - 1, eta=1.0, noise=noise)
    assert torch.allclose(ddpm, ddim, atol=1e-10)


def test_ddim_sigma_at_eta_one_half_is_song_et_al_eq_16():
    """Between steps 500 and 400 at eta = 0.5: x_prev = sqrt(abar_prev) x0 + sqrt(1 - abar_prev - sigma^2) eps +
    sigma noise (Song et al. 2021, eq. 12) with sigma = eta sqrt((1 - abar_prev) / (1 - abar_t)) sqrt(1 - abar_t /
    abar_prev) (eq. 16). eta put under the square root agrees at eta 0 and 1 only; here sigma would be 1.41x."""
    d = GaussianDiffusion()
    oracle = OracleEps(d, MU, S)
    x_t, noise = torch.randn(8, 1, 1, 1, dtype=torch.float64), torch.randn(8, 1, 1, 1, dtype=torch.float64)
    t, t_prev = torch.full((8,), 500), torch.full((8,), 400)
    a_t, a_prev = d.alphas_cumprod[500], d.alphas_cumprod[400]
    sigma = 0.5 * ((1 - a_prev) / (1 - a_t)).sqrt() * (1 - a_t / a_prev).sqrt()
    eps = oracle(x_t, t)
    x0 = (x_t - (1 - a_t).sqrt() * eps) / a_t.sqrt()
    x_prev, _ = d.ddim_step(oracle, x_t, t, t_prev, eta=0.5, noise=noise)
    assert torch.allclose(x_prev, a_prev.sqrt() * x0 + (1 - a_prev - sigma ** 2).sqrt() * eps + sigma * noise,
                          rtol=0, atol=1e-12)


def test_ddim_on_all_steps_at_eta_one_is_ddpm_from_the_same_seed():
    """DDIM asked for all T steps visits every step 999..0, and at eta = 1 its sigma is DDPM's posterior std: from the
    same seed it draws the same noise and gives DDPM's very samples (measured: 5e-13 apart). A step list of T - 1
    steps (min(steps, start) instead of start + 1) skips a step."""
    d = GaussianDiffusion()
    oracle = OracleEps(d, MU, S)
    runs = {}
    for sampler in ("ddpm", "ddim"):
        torch.manual_seed(0)
        x_T = torch.randn(64, 1, 1, 1, dtype=torch.float64)
        runs[sampler] = [(t, x) for t, x, _ in d.sample_steps(oracle, x_T, sampler, 1000, eta=1.0)]
    assert [t for t, _ in runs["ddim"]] == [t for t, _ in runs["ddpm"]] == list(range(999, -1, -1))
    assert torch.allclose(runs["ddim"][-1][1], runs["ddpm"][-1][1], rtol=0, atol=1e-10)


@pytest.mark.parametrize("t, t_prev", [(400, 399), (500, 400)])
def test_sde_dpmpp_first_step_is_the_ddpm_step(t, t_prev):
    """SDE-DPM-Solver++(2M)'s first-order step (eta = 1) is DDIM's at eta = 1, which on consecutive steps is DDPM's."""
    d = GaussianDiffusion()
    oracle = OracleEps(d, MU, S)
    x_t, noise = torch.randn(8, 1, 1, 1, dtype=torch.float64), torch.randn(8, 1, 1, 1, dtype=torch.float64)
    t, t_prev = torch.full((8,), t), torch.full((8,), t_prev)
    sde, _, _ = d.dpmpp_2m_step(oracle, x_t, t, t_prev, eta=1.0, noise=noise)
    ddim, _ = d.ddim_step(oracle, x_t, t, t_prev, eta=1.0, noise=noise)
    assert torch.allclose(sde, ddim, atol=1e-10)
    ode, _, _ = d.dpmpp_2m_step(oracle, x_t, t, t_prev)
    assert not torch.allclose(sde, ode, atol=1e-3)  # the noise is there


@pytest.mark.parametrize("schedule", ["linear", "cosine"])
def test_sde_dpmpp_reproduces_the_data_distribution_and_beats_ddpm_like_ddim(schedule):
    """With the oracle, SDE-DPM-Solver++(2M) at 50 steps keeps the data's spread (measured: std +2.6% linear, +2.0%
    cosine), where the first-order ancestral sampler (DDIM at eta = 1) loses it (-11.6%, -6.2%)."""
    d = GaussianDiffusion(schedule=schedule)
    errors = {}
    for sampler in ("dpmpp-sde", "ddim"):
        torch.manual_seed(0)
        x = torch.randn(N, 1, 1, 1, dtype=torch.float64)
        for _, x, _ in d.sample_steps(OracleEps(d, MU, S), x, sampler, 50, eta=1.0):  # eta: DDIM's
            pass
        assert abs(x.mean().item() - MU) < 0.015
        errors[sampler] = abs(x.std().item() / S - 1)
    assert errors["dpmpp-sde"] < 0.04
    assert errors["dpmpp-sde"] < 0.5 * errors["ddim"]


@pytest.mark.parametrize("loss_type", ["mse", "smooth_l1"])
def test_loss_is_zero_for_the_true_noise(loss_type):
    d = GaussianDiffusion(loss_type=loss_type)
    x0, noise = torch.randn(4, 4, 2, 2), torch.randn(4, 4, 2, 2)
    t = torch.randint(0, 1000, (4,))
    cheat = lambda x_t, tt: (x_t - d._coef("sqrt_alphas_cumprod", tt, x_t) * x0) / d._coef("sqrt_one_minus_alphas_cumprod", tt, x_t)  # noqa: E731
    assert d.loss(cheat, x0, t, noise).item() < 1e-8
    assert d.loss(lambda x_t, tt: torch.zeros_like(x_t), x0, t, noise).item() > 0.1


def test_v_loss_is_zero_for_the_true_velocity():
    d = GaussianDiffusion(prediction="v")
    x0, noise = torch.randn(4, 4, 2, 2), torch.randn(4, 4, 2, 2)
    t = torch.randint(0, 1000, (4,))
    v = d._coef("sqrt_alphas_cumprod", t, x0) * noise - d._coef("sqrt_one_minus_alphas_cumprod", t, x0) * x0
    assert d.loss(lambda x_t, tt: v, x0, t, noise).item() < 1e-10
    assert d.loss(lambda x_t, tt: noise, x0, t, noise).item() > 0.1     # the eps target is not the v target


@pytest.mark.parametrize("prediction", ["eps", "v"])
def test_min_snr_gamma_weights_each_sample_by_the_closed_form(prediction):
    """Hang et al. 2023: w = min(SNR, 5) / SNR for eps, min(SNR, 5) / (SNR + 1) for v; SNR = abar / (1 - abar)."""
    plain, weighted = GaussianDiffusion(prediction=prediction), GaussianDiffusion(prediction=prediction, min_snr_gamma=5.0)
    x0, noise = torch.randn(4, 4, 2, 2), torch.randn(4, 4, 2, 2)
    t = torch.tensor([0, 100, 500, 999])   # SNR 9999, about 8.6, 0.09, 4e-5: clamped at 5 only for the first two
    zero = lambda x_t, tt: torch.zeros_like(x_t)  # noqa: E731
    per_sample = torch.stack([plain.loss(zero, x0[i:i + 1], t[i:i + 1], noise[i:i + 1]) for i in range(4)])
    abar = plain.alphas_cumprod[t]
    snr = abar / (1 - abar)
    w = snr.clamp(max=5.0) / (snr if prediction == "eps" else snr + 1)
    assert torch.allclose(weighted.loss(zero, x0, t, noise), (w.float() * per_sample).mean(), rtol=1e-5)
    assert torch.allclose(plain.loss(zero, x0, t, noise), per_sample.mean(), rtol=1e-6)  # off: the plain average
    assert w[0] < 1e-3 and abs(w[3] - (1.0 if prediction == "eps" else 4e-5 / 1.00004)) < 1e-4



@pytest.mark.parametrize("sampling", ["uniform", "lognormal"])
def test_training_steps_follow_the_closed_form_distribution(sampling):
    """P(t <= k): (k + 1) / T uniform; lognormal, Phi((b_k - P_mean) / P_std) with b_k the boundary of steps k and k + 1
    in ln sigma, sigma_t = sqrt((1 - abar_t) / abar_t), and EDM's P_mean = -1.2, P_std = 1.2 at sigma_data 0.5, for
    unit-variance latents P_mean = -1.2 + ln 2 (Karras et al. 2022)."""
    d = GaussianDiffusion(timestep_sampling=sampling)
    torch.manual_seed(0)
    n = 200_000
    t = d.sample_timesteps(n, "cpu")
    assert t.dtype == torch.long and t.min() >= 0 and t.max() <= 999
    abar = d.alphas_cumprod
    log_sigma = 0.5 * torch.log((1 - abar) / abar)
    for k in (10, 50, 100, 200, 400, 700):
        if sampling == "uniform":
            expected = (k + 1) / 1000
        else:
            boundary = (log_sigma[k] + log_sigma[k + 1]).item() / 2
            expected = 0.5 * (1 + math.erf((boundary - (-1.2 + math.log(2.0))) / (1.2 * math.sqrt(2))))
        observed = (t <= k).float().mean().item()
        assert abs(observed - expected) < 4 * math.sqrt(expected * (1 - expected) / n) + 1e-4, (k, observed, expected)
    if sampling == "lognormal":  # the draws sit low: a third below step 100 (sigma 0.34), under 1% above step 700
        assert 0.30 < (t < 100).float().mean() < 0.34 and (t > 700).float().mean() < 0.01
    with pytest.raises(ValueError, match="timestep sampling"):
        GaussianDiffusion(timestep_sampling="logit-normal")

def test_each_condition_is_dropped_with_probability_p_on_its_own():
    torch.manual_seed(0)
    y = torch.stack([torch.randint(0, 2, (100_000,)).float(), torch.rand(100_000), torch.randint(0, 3, (100_000,)).float()], 1)
    assert torch.equal(drop_conditions(y, 0.0), y) and drop_conditions(y, 1.0).isnan().all()
    dropped = drop_conditions(y, 0.1).isnan()
    assert ((dropped.float().mean(0) - 0.1).abs() < 0.005).all()             # each condition, p = 0.1
    assert abs((dropped[:, 0] & dropped[:, 1]).float().mean().item() - 0.01) < 0.002  # independently: 0.1 x 0.1
    kept = drop_conditions(y, 0.5)
    assert torch.equal(kept[~kept.isnan()], y[~kept.isnan()])                 # the others keep their value


def test_guidance_0_is_unconditional_1_conditional_and_w_extrapolates_linearly():
    torch.manual_seed(0)
    unet = UNet(UNetConfig(latent_size=8, channels=32, channel_mult=(1, 1, 1, 1), num_res_blocks=1, conditions=(2,))).eval()
    nn.init.normal_(unet.out[-1].weight, std=0.1)
    x, t, y = torch.randn(3, 4, 8, 8), torch.tensor([10, 500, 900]), torch.tensor([0, 1, 1])
    with torch.no_grad():
        cond, uncond = unet(x, t, y), unet(x, t)       # no label = the null label (index num_classes)
        assert torch.allclose(uncond, unet(x, t, torch.full_like(y, 2)))
        assert (cond - uncond).abs().max() > 0.1
        assert torch.allclose(Guided(unet, y, 0.0)(x, t), uncond, atol=1e-6)
        assert torch.allclose(Guided(unet, y, 1.0)(x, t), cond, atol=1e-6)
        # float32 round-off of a batched pass, amplified by w = 3, on outputs of size ~10; a wrong rule is O(1) off
        assert torch.allclose(Guided(unet, y, 3.0)(x, t), uncond + 3.0 * (cond - uncond), atol=2e-4)


def test_autoguidance_1_is_the_main_network_0_the_guide_and_w_extrapolates_from_the_guide():
    torch.manual_seed(0)
    cfg = UNetConfig(latent_size=8, channels=32, channel_mult=(1, 1, 1, 1), num_res_blocks=1)
    main, guide = UNet(cfg).eval(), UNet(cfg).eval()
    for unet in (main, guide):
        nn.init.normal_(unet.out[-1].weight, std=0.1)
    x, t = torch.randn(3, 4, 8, 8), torch.tensor([10, 500, 900])
    with torch.no_grad():
        good, bad = main(x, t), guide(x, t)
        assert (good - bad).abs().max() > 0.1
        assert torch.allclose(Autoguided(main, guide, 1.0)(x, t), good, atol=1e-6)
        assert torch.allclose(Autoguided(main, guide, 0.0)(x, t), bad, atol=1e-6)
        assert torch.allclose(Autoguided(main, guide, 2.5)(x, t), bad + 2.5 * (good - bad), atol=1e-5)
        # under classifier-free guidance too: each network guided by its condition, then the guide stepped away from
        cond = UNet(UNetConfig(**{**cfg.__dict__, "conditions": (2,)})).eval()
        y = torch.tensor([0, 1, 1])
        both = Autoguided(Guided(cond, y, 3.0), Guided(cond, y, 3.0), 2.0)(x, t)
        assert torch.allclose(both, Guided(cond, y, 3.0)(x, t), atol=1e-5)  # a guide equal to the main: no change


def test_guidance_in_an_interval_of_steps_applies_there_only_the_guided_network_alone_elsewhere():
    torch.manual_seed(0)
    cfg = UNetConfig(latent_size=8, channels=32, channel_mult=(1, 1, 1, 1), num_res_blocks=1, conditions=(2,))
    main, guide = UNet(cfg).eval(), UNet(cfg).eval()
    for unet in (main, guide):
        nn.init.normal_(unet.out[-1].weight, std=0.1)
    # the interval's ends belong to it: steps 99 and 701 are outside, 100 and 700 inside
    x, t, y = torch.randn(5, 4, 8, 8), torch.tensor([99, 100, 400, 700, 701]), torch.tensor([0, 1, 1, 0, 1])
    inside = torch.tensor([False, True, True, True, False]).view(-1, 1, 1, 1)
    with torch.no_grad():
        good, bad = main(x, t), guide(x, t)
        expected = torch.where(inside, bad + 2.5 * (good - bad), good)
        assert torch.allclose(Autoguided(main, guide, 2.5, (100, 700))(x, t), expected, atol=1e-5)
        cond, uncond = main(x, t, y), main(x, t)
        expected = torch.where(inside, uncond + 3.0 * (cond - uncond), cond)
        assert torch.allclose(Guided(main, y, 3.0, (100, 700))(x, t), expected, atol=2e-4)
        # w = 0 (the unconditional network) in the interval, the conditional one outside
        assert torch.allclose(Guided(main, y, 0.0, (100, 700))(x, t), torch.where(inside, uncond, cond), atol=1e-5)
        assert (cond - uncond).abs().max() > 0.1 and (good - bad).abs().max() > 0.1


# ----------------------------------------------------------------------------- samplers: the same samples as before

class TodaysSamplers:
    """The samplers as they were before they stopped syncing (commit bb15666), frozen here: every coefficient
    gathered from the float64 buffers and cast at every step, steps as tensors, DPM-Solver++ deciding its
    order by reading t_prev back. The rewritten samplers must give the same samples from the same seed."""

    def __init__(self, d):
        self.d = d

    @staticmethod
    def at(buf, t, x):
        return buf.to(x.device)[t].to(x.dtype).view(-1, *([1] * (x.dim() - 1)))

    def predict_x0_eps(self, model, x_t, t):
        d, out = self.d, model(x_t, t)
        a, b = self.at(d.sqrt_alphas_cumprod, t, x_t), self.at(d.sqrt_one_minus_alphas_cumprod, t, x_t)
        return ((x_t - b * out) / a, out) if d.prediction == "eps" else (a * x_t - b * out, b * x_t + a * out)

    def p_sample(self, model, x_t, t, clip_x0):
        d = self.d
        x0, _ = self.predict_x0_eps(model, x_t, t)
        if clip_x0 is not None:
            x0 = x0.clamp(-clip_x0, clip_x0)
        mean = self.at(d.posterior_mean_coef1, t, x_t) * x0 + self.at(d.posterior_mean_coef2, t, x_t) * x_t
        noise = torch.randn_like(x_t)
        nonzero = (t > 0).to(x_t.dtype).view(-1, 1, 1, 1)
        return mean + nonzero * self.at(d.posterior_variance, t, x_t).sqrt() * noise, x0

    def ddim_step(self, model, x_t, t, t_prev, eta, clip_x0):
        d = self.d
        x0, eps = self.predict_x0_eps(model, x_t, t)
        if clip_x0 is not None:
            x0 = x0.clamp(-clip_x0, clip_x0)
            eps = (x_t - self.at(d.sqrt_alphas_cumprod, t, x_t) * x0) / self.at(d.sqrt_one_minus_alphas_cumprod, t, x_t)
        a_t = self.at(d.alphas_cumprod, t, x_t)
        a_prev = self.at(torch.cat([torch.ones(1, dtype=torch.float64), d.alphas_cumprod]), t_prev + 1, x_t)
        sigma = eta * ((1 - a_prev) / (1 - a_t) * (1 - a_t / a_prev)).sqrt()
        x_prev = a_prev.sqrt() * x0 + (1 - a_prev - sigma ** 2).clamp(min=0).sqrt() * eps
        if eta > 0:
            x_prev = x_prev + sigma * torch.randn_like(x_t)
        return x_prev, x0

    def dpmpp_2m_step(self, model, x_t, t, t_prev, x0_before, h_before, clip_x0):
        d = self.d
        x0, _ = self.predict_x0_eps(model, x_t, t)
        if clip_x0 is not None:
            x0 = x0.clamp(-clip_x0, clip_x0)
        if bool((t_prev < 0).all()):
            return x0, x0, None
        a_t, a_prev = self.at(d.alphas_cumprod, t, x_t), self.at(d.alphas_cumprod, t_prev, x_t)
        h = 0.5 * (torch.log(a_prev / (1 - a_prev)) - torch.log(a_t / (1 - a_t)))
        dd = x0
        if x0_before is not None and bool((t_prev > 0).all()):
            dd = x0 + (x0 - x0_before) * (h / (2 * h_before))
        return ((1 - a_prev) / (1 - a_t)).sqrt() * x_t - a_prev.sqrt() * torch.expm1(-h) * dd, x0, h

    def sample_steps(self, model, x, sampler, steps, start, eta, clip_x0):
        start = self.d.num_steps - 1 if start is None else start
        if sampler == "ddpm":
            ts = list(range(start, -1, -1))
        else:
            ts = torch.linspace(start, 0, min(steps, start + 1)).round().long().unique_consecutive().tolist()
        x0_before = h_before = None
        for i, t in enumerate(ts):
            tt = torch.full((x.shape[0],), t, dtype=torch.long)
            t_prev = torch.full_like(tt, ts[i + 1] if i + 1 < len(ts) else -1)
            if sampler == "ddpm":
                x, x0 = self.p_sample(model, x, tt, clip_x0)
            elif sampler == "ddim":
                x, x0 = self.ddim_step(model, x, tt, t_prev, eta, clip_x0)
            else:
                x, x0, h_before = self.dpmpp_2m_step(model, x, tt, t_prev, x0_before, h_before, clip_x0)
                x0_before = x0
            yield t, x, x0


SAMPLERS = [("ddpm", None, 0.0), ("ddim", 8, 0.0), ("ddim", 8, 1.0), ("dpmpp", 8, 0.0)]


def seeded_net(prediction):
    """A small seeded float32 UNet on (2, 4, 8, 8) latents ("net"), or the float64 oracle of the Gaussian data."""
    torch.manual_seed(0)
    unet = UNet(UNetConfig(latent_size=8, channels=32, channel_mult=(1, 2), num_res_blocks=1, attention_levels=(1,))).eval()
    nn.init.normal_(unet.out[-1].weight, std=0.05)
    return unet


@pytest.mark.parametrize("sampler, steps, eta", SAMPLERS)
@pytest.mark.parametrize("model, prediction, clip_x0", [("net", "eps", None), ("net", "v", 1.0), ("oracle", "eps", None)])
def test_samplers_give_todays_samples_for_the_same_seed(sampler, steps, eta, model, prediction, clip_x0):
    d = GaussianDiffusion(schedule="cosine", prediction=prediction)
    if model == "net":
        net, shape, start = seeded_net(prediction), (2, 4, 8, 8), 12 if sampler == "ddpm" else None
    else:
        net, shape, start = OracleEps(d, MU, S), (64, 1, 1, 1), None
    runs = []
    for samplers in (TodaysSamplers(d), d):
        torch.manual_seed(1)
        x_T = torch.randn(shape, dtype=torch.float32 if model == "net" else torch.float64)
        with torch.no_grad():
            runs.append(list(samplers.sample_steps(net, x_T, sampler, steps, start=start, eta=eta, clip_x0=clip_x0)))
    assert len(runs[0]) == len(runs[1]) == (13 if start == 12 else 1000 if sampler == "ddpm" else 8)
    for (t_old, x_old, x0_old), (t_new, x_new, x0_new) in zip(*runs):
        assert t_old == t_new
        assert torch.allclose(x_new, x_old, rtol=1e-5, atol=1e-6), (t_new, (x_new - x_old).abs().max())
        assert torch.allclose(x0_new, x0_old, rtol=1e-5, atol=1e-6), t_new


@pytest.mark.parametrize("sampler, steps, eta", SAMPLERS + [("dpmpp-sde", 8, 0.0)])
def test_sampler_steps_never_read_the_device(monkeypatch, sampler, steps, eta):
    """No bool(), .item() or float() of a tensor inside a step: on a GPU each would wait for the queue to drain."""
    d, net = GaussianDiffusion(), seeded_net("eps")
    run = d.sample_steps(net, torch.randn(2, 4, 8, 8), sampler, steps, start=5 if sampler == "ddpm" else None, eta=eta)
    # the step list is made from a CPU tensor (tolist) before the first step, so tolist stays allowed

    def host_read(*args):
        raise AssertionError("a step read a tensor back to the host")
    for name in ("__bool__", "item", "__float__", "__int__"):
        monkeypatch.setattr(torch.Tensor, name, host_read)
    with torch.no_grad():
        frames = list(run)
    monkeypatch.undo()
    assert len(frames) == (6 if sampler == "ddpm" else 8)
