"""A trained run's models, rebuilt from its checkpoints alone: the VQ-VAE of RUN/vqvae.pt (with the decoder of
RUN/decoder.pt where `train-decoder` wrote one), the UNet's EMA weights of RUN/unet.pt, its diffusion process and
latent scale, checked to belong together; and autoguidance's guide, the UNet earlier in its training, from the
post-hoc EMA snapshots of RUN/ema_snapshots/.

Used by sampling (`python predict.py --run RUN`, `driver.py sample`), `driver.py evaluate`, `driver.py counterfactual`,
the stages that build on stage 1 (`train-unet`, `train-decoder`: load_vqvae) and the benchmarks in bench/.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from conditions.table import CLASS, Condition, saved_conditions
from diffusion.gaussian import GaussianDiffusion
from modules import VQVAE, UNet, UNetConfig, VQVAEConfig
from runtime.checkpoint import fingerprint, load_checkpoint, load_weights, model_config
from runtime.errors import BadInputError
from runtime.posthoc_ema import earlier_weights, reconstruct
from runtime.process import default_memory_format


@dataclass
class LatentDiffusion:
    """A trained run, rebuilt from RUN/vqvae.pt, RUN/unet.pt (and RUN/decoder.pt): the VQ-VAE, the UNet's EMA weights,
    the diffusion process and the latent scale (latent = scale * z)."""
    vqvae: VQVAE
    unet: UNet
    diffusion: GaussianDiffusion
    latent_scale: float
    latent_shape: tuple
    latent_absmax: float | None         # the training latents' largest |value|: the range for clipping x0
    conditions: list[Condition]         # what the UNet is conditioned on, in the order of its y columns ([]: none)
    unet_step: int
    labels: dict | None = None          # the participants table it was trained with: file, sha1, subject column
    fingerprint: str = ""               # of the UNet's EMA weights, and of the VQ-VAE: what made a sample
    vqvae_fingerprint: str = ""
    decoder_fingerprint: str | None = None  # of RUN/decoder.pt's decoder, where `train-decoder` wrote one
    posthoc_ema: dict | None = None     # the post-hoc EMA length chosen with `driver.py ema` (None: the run's EMA)

    @property
    def classes(self) -> list[str]:
        """The class folders the UNet knows (AD, NC ...), [] if it is not conditioned on them."""
        return next((c.values for c in self.conditions if c.name == CLASS), [])


def load_vqvae(run: Path, device, finetuned: bool = True) -> tuple[VQVAE, dict]:
    """The run's stage-1 VQ-VAE in eval mode, frozen (eval: its quantiser draws no random numbers), and its checkpoint;
    with the decoder of RUN/decoder.pt where `train-decoder` wrote one (unless not `finetuned`), which the checkpoint's
    entry "decoder" then describes: its step and fingerprint."""
    vq_ckpt = load_checkpoint(run / "vqvae.pt", "vqvae")
    vqvae = VQVAE(model_config(VQVAEConfig, vq_ckpt, run / "vqvae.pt")).to(device).eval().requires_grad_(False)
    load_weights(vqvae, vq_ckpt["model"], run / "vqvae.pt")
    if finetuned and (run / "decoder.pt").exists():
        decoder = load_checkpoint(run / "decoder.pt", "decoder")
        if decoder["vqvae_fingerprint"] != fingerprint(vq_ckpt["model"]):
            raise BadInputError(f"{run / 'decoder.pt'} was fine-tuned from another VQ-VAE than {run / 'vqvae.pt'} "
                                f"(stage 1 was trained again since): move it away, or run train-decoder again")
        load_weights(vqvae.decoder, decoder["model"], run / "decoder.pt")
        vq_ckpt = {**vq_ckpt, "decoder": {"step": decoder["step"], "fingerprint": fingerprint(decoder["model"])}}
    return vqvae, vq_ckpt


def load_run(run: Path, device, finetuned: bool = True) -> LatentDiffusion:
    """Both models of a run, checked to belong together (the UNet learned this VQ-VAE's latents); decoding with
    RUN/decoder.pt where there is one, unless not `finetuned` (`--decoder stage-1`)."""
    unet_ckpt = load_checkpoint(run / "unet.pt", "unet")
    vqvae, vq_ckpt = load_vqvae(run, device, finetuned)
    if unet_ckpt["vqvae_fingerprint"] != fingerprint(vq_ckpt["model"]):
        raise BadInputError(f"{run / 'unet.pt'} was trained on another VQ-VAE than {run / 'vqvae.pt'}: move it (and "
                            f"unet.prev.pt) away and run train-unet for this VQ-VAE")
    if list(vqvae.cfg.latent_shape) != list(unet_ckpt["latent_shape"]):
        raise BadInputError(f"latent shape differs: VQ-VAE {vqvae.cfg.latent_shape}, UNet {unet_ckpt['latent_shape']}")
    unet = UNet(model_config(UNetConfig, unet_ckpt, run / "unet.pt"))
    chosen = unet_ckpt.get("sampling_ema")  # `driver.py ema` chose a post-hoc EMA length for sampling
    weights = {**unet_ckpt["ema"], **chosen["weights"]} if chosen else unet_ckpt["ema"]
    load_weights(unet, weights, run / "unet.pt", "EMA" if not chosen else "chosen EMA")
    unet = for_sampling(unet, device)
    diffusion = GaussianDiffusion(**unet_ckpt["diffusion"]).to(device)
    return LatentDiffusion(vqvae, unet, diffusion, unet_ckpt["latent_scale"], tuple(unet_ckpt["latent_shape"]),
                           unet_ckpt.get("latent_absmax"), saved_conditions(unet_ckpt), unet_ckpt["step"],
                           unet_ckpt.get("labels"), fingerprint(weights), unet_ckpt["vqvae_fingerprint"],
                           vq_ckpt.get("decoder", {}).get("fingerprint"),
                           {k: v for k, v in chosen.items() if k != "weights"} if chosen else None)


def for_sampling(unet: UNet, device) -> UNet:
    """The UNet as the samplers run it: on `device`, eval mode, no gradients (so autocast keeps no cache of cast
    weights, which a CUDA graph could not see), and in the device's default memory layout (NHWC on CUDA), as in
    training."""
    return unet.to(device, memory_format=default_memory_format(device)).eval().requires_grad_(False)


def load_guide(model: LatentDiffusion, run: Path, at: float, sigma_rel: float | None = None) -> tuple[UNet, dict]:
    """Autoguidance's guide: the run's UNet as it was at `at` (a fraction of its steps below 1, else a step), from the
    post-hoc EMA snapshot kept last at or before it (its shorter profile, or the EMA of length `sigma_rel`
    reconstructed there), on the UNet's device; and {guide_step, guide_sigma_rel}."""
    step = round(at * model.unet_step) if at < 1 else int(at)
    if step >= model.unet_step:
        raise BadInputError(f"--guide-at {at} is step {step}, not before the UNet's {model.unet_step}: the guide "
                            f"must be the UNet earlier in its training")
    weights, found = earlier_weights(run, step)
    if sigma_rel is not None:
        weights, found = reconstruct(run, sigma_rel, found["step"])
    guide = UNet(model.unet.cfg)
    # snapshots hold the parameters; buffers as the UNet's
    guide.load_state_dict({**model.unet.state_dict(), **weights})
    return for_sampling(guide, next(model.unet.parameters()).device), {"guide_step": found["step"],
                                                                        "guide_sigma_rel": found["sigma_rel"]}
