"""The diffusion process on the latents: the noise schedules, the forward process `q_sample`, the posterior and the
reverse steps (DDPM, DDIM and its inversion, DPM-Solver++ and its SDE form) and the training loss, in
`GaussianDiffusion`. The networks it steps are in `modules.py`; guidance wraps them in `diffusion/guidance.py`.

Nothing here touches files or the command line. Run the tests with `python -m pytest tests/test_diffusion.py`.
"""
from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F


def make_betas(schedule: str, num_steps: int) -> torch.Tensor:
    """float64 betas: "linear" 1e-4..0.02 scaled to num_steps (Ho et al. 2020), or "cosine"
    (Nichol & Dhariwal 2021, eq. 17, betas clipped at 0.999)."""
    if schedule == "linear":
        scale = 1000 / num_steps
        return torch.linspace(scale * 1e-4, scale * 0.02, num_steps, dtype=torch.float64)
    if schedule == "cosine":
        s = 0.008
        f = torch.cos((torch.arange(num_steps + 1, dtype=torch.float64) / num_steps + s) / (1 + s) * math.pi / 2) ** 2
        return (1 - f[1:] / f[:-1]).clamp(max=0.999)
    raise ValueError(f"unknown noise schedule {schedule!r} (use 'linear' or 'cosine')")


class GaussianDiffusion(nn.Module):
    """The DDPM forward process and its reverse steps (Ho et al. 2020), eps- or v-parameterised (`prediction`: v of
    Salimans & Ho 2022, train-unet's default; eps this class's, for the tests' oracles).

    Steps are indexed t = 0..T-1, t = 0 the last reverse step (x_0 is the data). `alphas_cumprod[t]`
    is abar_t. The network is passed in, called as `model(x_t, t)`, and predicts eps or v.
    Constants are computed in float64 and cast to the sample's dtype when used.
    """

    # EDM's log-normal training noise levels (Karras et al. 2022, table 1: P_mean -1.2, P_std 1.2 for sigma_data 0.5),
    # for unit-variance latents: the same sigma / sigma_data, so P_mean moves by ln 2
    LOGNORMAL_MEAN, LOGNORMAL_STD = -1.2 + math.log(2.0), 1.2

    def __init__(self, num_steps: int = 1000, schedule: str = "linear", loss_type: str = "mse",
                 prediction: str = "eps", min_snr_gamma: float | None = None, timestep_sampling: str = "uniform"):
        super().__init__()
        if loss_type not in ("mse", "smooth_l1"):
            raise ValueError(f"unknown loss {loss_type!r} (use 'mse' or 'smooth_l1')")
        if prediction not in ("eps", "v"):
            raise ValueError(f"unknown prediction {prediction!r} (use 'eps' or 'v')")
        if timestep_sampling not in ("uniform", "lognormal"):
            raise ValueError(f"unknown timestep sampling {timestep_sampling!r} (use 'uniform' or 'lognormal')")
        self.timestep_sampling = timestep_sampling
        self.num_steps, self.schedule, self.loss_type, self.prediction = num_steps, schedule, loss_type, prediction
        self.min_snr_gamma = min_snr_gamma
        self._cast = {}
        betas = make_betas(schedule, num_steps)
        alphas_cumprod = torch.cumprod(1 - betas, 0)
        alphas_cumprod_prev = torch.cat([torch.ones(1, dtype=torch.float64), alphas_cumprod[:-1]])
        buffers = {
            "betas": betas,
            "alphas_cumprod": alphas_cumprod,
            "alphas_cumprod_prev": alphas_cumprod_prev,
            "sqrt_alphas_cumprod": alphas_cumprod.sqrt(),
            "sqrt_one_minus_alphas_cumprod": (1 - alphas_cumprod).sqrt(),
            # eq. 7: beta~_t = (1 - abar_{t-1}) / (1 - abar_t) * beta_t, and the posterior mean coefficients
            "posterior_variance": betas * (1 - alphas_cumprod_prev) / (1 - alphas_cumprod),
            "posterior_mean_coef1": betas * alphas_cumprod_prev.sqrt() / (1 - alphas_cumprod),
            "posterior_mean_coef2": (1 - alphas_cumprod_prev) * (1 - betas).sqrt() / (1 - alphas_cumprod),
        }
        log_sigma = 0.5 * torch.log((1 - alphas_cumprod) / alphas_cumprod)  # increasing in t
        buffers["log_sigma_boundaries"] = (log_sigma[1:] + log_sigma[:-1]) / 2  # between steps t and t + 1
        for name, value in buffers.items():
            self.register_buffer(name, value, persistent=False)

    def config(self) -> dict:
        return {"num_steps": self.num_steps, "schedule": self.schedule, "loss_type": self.loss_type,
                "prediction": self.prediction, "min_snr_gamma": self.min_snr_gamma,
                "timestep_sampling": self.timestep_sampling}

    def _apply(self, fn, *args, **kwargs):
        self._cast = {}  # the buffers move or change dtype: the copies `_coef` keeps are stale
        return super()._apply(fn, *args, **kwargs)

    def _coef(self, name: str, t, x: torch.Tensor) -> torch.Tensor:
        """Buffer `name` at t, shaped (B or 1, 1, 1, 1) against x, in x's dtype and device.

        t: a (B,) tensor of steps, or one step as a Python int, as the samplers pass it. The buffer is cast
        to x's device and dtype once and kept, so a tensor t costs one gather and an int t a view, no
        kernel at all (the float64 gather and cast of every coefficient of every step was a stream of
        tiny kernels). It keeps x's number of dimensions, unlike a 0-dim tensor or a Python float, so a
        float32 coefficient times a bf16 network output (autocast) still promotes to float32.
        """
        key = (name, x.device, x.dtype)
        if key not in self._cast:
            self._cast[key] = getattr(self, name).to(x.device, x.dtype)
        table, shape = self._cast[key], (-1, *([1] * (x.dim() - 1)))
        return (table[t:t + 1] if isinstance(t, int) else table[t]).view(shape)

    @staticmethod
    def _steps(t, x: torch.Tensor) -> torch.Tensor:
        """t as the (B,) tensor of steps the network takes (from a Python int: a fill, no host-device copy)."""
        return t if torch.is_tensor(t) else torch.full((x.shape[0],), t, device=x.device, dtype=torch.long)

    def q_sample(self, x0, t, noise):
        """x_t = sqrt(abar_t) x0 + sqrt(1 - abar_t) eps  (Ho et al. 2020, eq. 4)."""
        return self._coef("sqrt_alphas_cumprod", t, x0) * x0 + self._coef("sqrt_one_minus_alphas_cumprod", t, x0) * noise

    def q_posterior(self, x0, x_t, t):
        """Mean and variance of q(x_{t-1} | x_t, x0)  (Ho et al. 2020, eq. 6-7)."""
        mean = self._coef("posterior_mean_coef1", t, x_t) * x0 + self._coef("posterior_mean_coef2", t, x_t) * x_t
        return mean, self._coef("posterior_variance", t, x_t)

    def predict_x0(self, x_t, t, eps):
        """x0 = (x_t - sqrt(1 - abar_t) eps) / sqrt(abar_t), eq. 4 solved for x0."""
        return (x_t - self._coef("sqrt_one_minus_alphas_cumprod", t, x_t) * eps) / self._coef("sqrt_alphas_cumprod", t, x_t)

    def predict_x0_eps(self, model, x_t, t):
        """(x0, eps) from the network's output: eps itself, or v = sqrt(abar) eps - sqrt(1 - abar) x0
        (Salimans & Ho 2022), for which x0 = sqrt(abar) x_t - sqrt(1 - abar) v. With v an error in the
        output stays an error of the same size in x0 at high noise, where eps would divide it by sqrt(abar)."""
        out = model(x_t, self._steps(t, x_t))
        if self.prediction == "eps":
            return self.predict_x0(x_t, t, out), out
        a, b = self._coef("sqrt_alphas_cumprod", t, x_t), self._coef("sqrt_one_minus_alphas_cumprod", t, x_t)
        return a * x_t - b * out, b * x_t + a * out

    def p_sample(self, model, x_t, t, noise=None, clip_x0: float | None = None):
        """One ancestral step x_t -> x_{t-1} with variance beta~_t ("fixed small"), Ho et al. 2020, Alg. 2.

        Returns (x_{t-1}, predicted x0). x_t is never clamped; clip_x0, if given, clips only the
        predicted x0 to [-clip_x0, clip_x0]. No noise is added at t = 0.
        """
        x0, _ = self.predict_x0_eps(model, x_t, t)
        if clip_x0 is not None:
            x0 = x0.clamp(-clip_x0, clip_x0)
        mean, var = self.q_posterior(x0, x_t, t)
        if noise is None:
            noise = torch.randn_like(x_t)
        nonzero = float(t > 0) if isinstance(t, int) else (t > 0).to(x_t.dtype).view(-1, *([1] * (x_t.dim() - 1)))
        return mean + nonzero * var.sqrt() * noise, x0

    def ddim_step(self, model, x_t, t, t_prev, eta: float = 0.0, noise=None, clip_x0: float | None = None):
        """x_t -> x_{t_prev} (t_prev < t, or -1 for the data) by Song et al. 2021, eq. 12.

        eta = 0 is the deterministic DDIM; eta = 1 with consecutive steps is DDPM's "fixed small".
        Returns (x_{t_prev}, predicted x0).
        """
        x0, eps = self.predict_x0_eps(model, x_t, t)
        if clip_x0 is not None:
            x0 = x0.clamp(-clip_x0, clip_x0)
            eps = (x_t - self._coef("sqrt_alphas_cumprod", t, x_t) * x0) / self._coef("sqrt_one_minus_alphas_cumprod", t, x_t)
        a_t = self._coef("alphas_cumprod", t, x_t)
        a_prev = self._coef("alphas_cumprod_prev", t_prev + 1, x_t)  # abar_{t_prev}, with abar_{-1} = 1
        sigma = eta * ((1 - a_prev) / (1 - a_t) * (1 - a_t / a_prev)).sqrt()
        x_prev = a_prev.sqrt() * x0 + (1 - a_prev - sigma ** 2).clamp(min=0).sqrt() * eps
        if eta > 0:
            x_prev = x_prev + sigma * (torch.randn_like(x_t) if noise is None else noise)
        return x_prev, x0

    def ddim_inversion(self, model, x0: torch.Tensor, start: int, steps: int | None = None):
        """The data x0 -> x_start along the deterministic DDIM path walked backwards (DDIM inversion: Song et al. 2021,
        sec. 4.3, eq. 12 with eta = 0 read as an ODE; Dhariwal & Nichol 2021, Mokady et al. 2023), at the timesteps
        that `sample_steps("ddim", steps, start)` visits, in the opposite order: x_{t_prev} -> x_t is
        sqrt(abar_t) x0_hat + sqrt(1 - abar_t) eps_hat with the network's (x0_hat, eps_hat) at (x_{t_prev}, t_prev),
        which stands in for its values at the unknown x_t (from the data, t_prev = -1, at step 0). DDIM sampling
        from the result retraces the path: exactly where eps_hat is constant along it, up to the step size elsewhere.
        Yields (t, x_t) at every timestep, the last at `start`."""
        ts = self.ddim_timesteps(start, steps)[::-1]
        x = x0
        for t_prev, t in zip([-1] + ts[:-1], ts):
            x0_hat, eps_hat = self.predict_x0_eps(model, x, max(t_prev, 0))
            a_t = self._coef("alphas_cumprod", t, x)
            x = a_t.sqrt() * x0_hat + (1 - a_t).sqrt() * eps_hat
            yield t, x

    def ddim_timesteps(self, start: int, steps: int | None) -> list[int]:
        """The steps DDIM and DPM-Solver++ visit from `start` down to 0: `steps` of them, evenly spaced (default 50)."""
        n = min(steps or 50, start + 1)
        return torch.linspace(start, 0, n).round().long().unique_consecutive().tolist()

    def dpmpp_2m_step(self, model, x_t, t, t_prev, x0_before=None, h_before=None, clip_x0: float | None = None,
                      eta: float = 0.0, noise=None):
        """x_t -> x_{t_prev} by DPM-Solver++(2M) (Lu et al. 2022, Algorithm 2), for 10-25 steps; with eta = 1 by its
        stochastic form, SDE-DPM-Solver++(2M) (the same paper's SDE solver with the 2M data prediction).

        The diffusion ODE is solved exactly in the log-SNR lambda = log(alpha / sigma) (alpha = sqrt(abar),
        sigma = sqrt(1 - abar)) with the data prediction D held linear over the step: D = (1 + 1/2r) x0 -
        1/2r x0_before, r = h_before / h, h = lambda_prev - lambda_t. Without a previous step it is the
        first-order update (DDIM), and so are the last two steps, into t = 0 and into the data (where it returns
        the predicted x0), as the solver's authors do at few steps: near t = 0 lambda jumps (h / h_before about
        4 at 20 linear steps) and the linear extrapolation of x0 overshoots (with the Gaussian oracle, the
        std of the samples +25% at 20 steps, against -3.7% with the first-order final steps).
        eta >= 0 scales the noise as k-diffusion's `sample_dpmpp_2m_sde` does: x_{t_prev} = sigma_prev / sigma_t
        e^{-eta h} x_t + alpha_prev (1 - e^{-(1 + eta) h}) D + sigma_prev sqrt(1 - e^{-2 eta h}) noise; eta = 0 is the
        ODE above, and with eta = 1 (`sample_steps`' "dpmpp-sde") the first-order step is DDPM's ancestral step
        (DDIM's at eta = 1).
        Returns (x_{t_prev}, predicted x0, h); pass that x0 and h as x0_before and h_before to the next step.
        t and t_prev: Python ints (as `sample_steps` passes them: the order is chosen on the host) or (B,)
        tensors (then per sample by `torch.where`, never reading the steps back from the device; into the
        data abar_{-1} = 1 makes h infinite and the update return x0 exactly).
        """
        x0, _ = self.predict_x0_eps(model, x_t, t)
        if clip_x0 is not None:
            x0 = x0.clamp(-clip_x0, clip_x0)
        if isinstance(t_prev, int) and t_prev < 0:
            return x0, x0, None
        a_t, a_prev = self._coef("alphas_cumprod", t, x_t), self._coef("alphas_cumprod_prev", t_prev + 1, x_t)
        h = 0.5 * (torch.log(a_prev / (1 - a_prev)) - torch.log(a_t / (1 - a_t)))
        d = x0
        if x0_before is not None:
            r = h / (2 * h_before)
            if not isinstance(t_prev, int):
                r = torch.where((t_prev > 0).view(-1, *([1] * (x_t.dim() - 1))), r, 0.0)
            if not isinstance(t_prev, int) or t_prev > 0:
                d = x0 + (x0 - x0_before) * r  # (1 + 1/2r) x0 - 1/2r x0_before
        if eta == 0:  # apart: into the data (t_prev = -1 in a tensor) h is infinite, and 0 * h would be NaN
            return ((1 - a_prev) / (1 - a_t)).sqrt() * x_t - a_prev.sqrt() * torch.expm1(-h) * d, x0, h
        x_prev = (((1 - a_prev) / (1 - a_t)).sqrt() * torch.exp(-eta * h) * x_t
                  - a_prev.sqrt() * torch.expm1(-(1 + eta) * h) * d)
        noise = torch.randn_like(x_t) if noise is None else noise
        return x_prev + (1 - a_prev).sqrt() * (-torch.expm1(-2 * eta * h)).sqrt() * noise, x0, h

    def sample_steps(self, model, x_T, sampler: str = "ddpm", steps: int | None = None,
                     start: int | None = None, eta: float = 0.0, clip_x0: float | None = None):
        """Run the reverse process from x_T at step `start` (default T-1) down to data.

        Yields (t, x_{t-1}, predicted x0) after every network call, so callers can keep frames.
        "ddpm": every step start..0. "ddim", "dpmpp" (DPM-Solver++(2M)) and "dpmpp-sde" (its stochastic form,
        SDE-DPM-Solver++(2M)): `steps` evenly spaced steps of start..0, then into the data; eta is DDIM's noise
        (0: deterministic, 1: DDPM-like). The steps go to the step methods as Python ints: no step
        reads anything back from the device, and the coefficients are views of tables cast once.
        """
        start = self.num_steps - 1 if start is None else start
        if sampler == "ddpm":
            ts = list(range(start, -1, -1))
        elif sampler in ("ddim", "dpmpp", "dpmpp-sde"):
            ts = self.ddim_timesteps(start, steps)
        else:
            raise ValueError(f"unknown sampler {sampler!r} (use 'ddpm', 'ddim', 'dpmpp' or 'dpmpp-sde')")
        x = x_T
        x0_before = h_before = None
        for t, t_prev in zip(ts, ts[1:] + [-1]):
            if sampler == "ddpm":
                x, x0 = self.p_sample(model, x, t, clip_x0=clip_x0)
            elif sampler == "ddim":
                x, x0 = self.ddim_step(model, x, t, t_prev, eta=eta, clip_x0=clip_x0)
            else:
                x, x0, h = self.dpmpp_2m_step(model, x, t, t_prev, x0_before, h_before, clip_x0=clip_x0,
                                              eta=1.0 if sampler == "dpmpp-sde" else 0.0)
                x0_before, h_before = x0, h
            yield t, x, x0

    def loss_weight(self, t: torch.Tensor) -> torch.Tensor:
        """Min-SNR-gamma weight per step (Hang et al. 2023): min(SNR, gamma) / SNR for the eps target and
        min(SNR, gamma) / (SNR + 1) for v, SNR = abar / (1 - abar); all ones when min_snr_gamma is None."""
        if self.min_snr_gamma is None:
            return torch.ones(t.shape, device=t.device)
        abar = self.alphas_cumprod.to(t.device)[t]
        snr = abar / (1 - abar)
        return (snr.clamp(max=self.min_snr_gamma) / (snr if self.prediction == "eps" else snr + 1)).float()

    def sample_timesteps(self, batch: int, device) -> torch.Tensor:
        """Training steps t: uniform over 0..T-1 (Ho et al. 2020), or "lognormal": ln sigma_t normal with
        (LOGNORMAL_MEAN, LOGNORMAL_STD), sigma_t = sqrt((1 - abar_t) / abar_t) (Karras et al. 2022), each draw taken
        to the step nearest in ln sigma. Either way the loss's weight per step is left as it is."""
        if self.timestep_sampling == "uniform":
            return torch.randint(0, self.num_steps, (batch,), device=device)
        boundaries = self.log_sigma_boundaries
        draw = self.LOGNORMAL_MEAN + self.LOGNORMAL_STD * torch.randn(batch, device=device, dtype=boundaries.dtype)
        return torch.searchsorted(boundaries, draw)

    def loss(self, model, x0, t=None, noise=None, y=None):
        """Simple loss (Ho et al. 2020, eq. 14) on the eps or v target: MSE, or smooth-L1 as the original used,
        per sample weighted by `loss_weight(t)` (min-SNR-gamma if set), averaged over the batch; the steps t drawn
        by `sample_timesteps` unless given."""
        B = x0.shape[0]
        if t is None:
            t = self.sample_timesteps(B, x0.device)
        if noise is None:
            noise = torch.randn_like(x0)
        target = noise
        if self.prediction == "v":
            target = self._coef("sqrt_alphas_cumprod", t, x0) * noise - self._coef("sqrt_one_minus_alphas_cumprod", t, x0) * x0
        x_t = self.q_sample(x0, t, noise)
        pred = model(x_t, t) if y is None else model(x_t, t, y)
        error = F.mse_loss if self.loss_type == "mse" else F.smooth_l1_loss
        per_sample = error(pred.float(), target.float(), reduction="none").flatten(1).mean(1)
        return (self.loss_weight(t) * per_sample).mean()
