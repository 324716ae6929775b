"""Training and sampling throughput, side by side in one run: our models vs diffusers' of the same shape, eager
and compiled; the latent cache vs encoding on the fly; peak memory; on a GPU, model FLOP utilisation, the batch
sizes of each stage, the samplers with and without CUDA graphs, and a full ADNI run's time.

    pip install -r requirements.txt -r bench/requirements.txt
    python bench/throughput.py [--device cpu|cuda] [--parts models,cache,optimizer,memory,batches,samplers] [--steps 5]

Shapes are the `full` preset's: VQ-VAE at 256x256 (batch 16), UNet at 4x32x32 (batch 64), on random data,
so this measures the models and the step, not the disk. Each timed step is a whole optimizer step
(forward, backward, AdamW); the models of a case alternate step by step, and the medians are compared, so
load from other jobs on the machine hits all alike. Precision: fp32 on the CPU; on CUDA our defaults
(bf16 autocast, channels_last, fused AdamW) against the peer in bf16 autocast with its default layout, plus
ours in NCHW (the layout question of GroupNorm) and both compiled (ours: its repeated blocks, `--compile`;
the peer: torch.compile of the whole model). A compiled row's first step, compilation included, is reported.
On the CPU the parts default to models, cache, optimizer and memory, eager only (`--compiled` adds the rows).
"""
import argparse
import dataclasses
import importlib.util
import json
import resource
import statistics
import subprocess
import sys
import time
from contextlib import nullcontext
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import driver  # noqa: E402
import predict  # noqa: E402
from diffusion.gaussian import GaussianDiffusion  # noqa: E402
from driver import PRESETS  # noqa: E402
from runtime.flags import ints  # noqa: E402
from runtime.models import LatentDiffusion, for_sampling  # noqa: E402
from samplers import SAMPLERS  # noqa: E402  (bench/samplers.py: sampler name -> `driver.py sample` flags)
from modules import VQVAE, UNet, UNetConfig, VQVAEConfig  # noqa: E402
from runtime.optimizer import adamw  # noqa: E402

ADNI_SLICES = 30520  # the full ADNI AD/NC set of the original report
SUBSET_TRAINING_SLICES = 7200  # the 8,000-slice subset with --holdout 0.1
PEAK_BF16_TFLOPS = {"H100": 989.0, "H200": 989.0, "A100": 312.0, "L40S": 362.0, "A10": 125.0, "4090": 165.0}
FULL_VQ, FULL_UNET = PRESETS["vqvae"]["full"], PRESETS["unet"]["full"]


@dataclasses.dataclass
class Shapes:
    """The networks' sizes and the data's shapes: a preset's (`--shapes`; `tiny` makes a CPU dry run quick)."""
    vq: dict
    unet: dict
    image: int      # px of the VQ-VAE's images
    latent: int     # px of the UNet's latents


SHAPES = {"full": Shapes(FULL_VQ, FULL_UNET, 256, 32),
          "tiny": Shapes(PRESETS["vqvae"]["tiny"], PRESETS["unet"]["tiny"], 64, 16)}


# ----------------------------------------------------------------------------- the two pairs of models

def our_vqvae(s: Shapes = SHAPES["full"]) -> VQVAE:
    return VQVAE(VQVAEConfig(image_size=s.image, channels=s.vq["vq_channels"], channel_mult=tuple(s.vq["vq_mult"]),
                             num_res_blocks=s.vq["vq_res_blocks"], codebook_size=s.vq["codebook_size"]))


def our_unet(s: Shapes = SHAPES["full"]) -> UNet:
    return UNet(UNetConfig(latent_size=s.latent, channels=s.unet["unet_channels"], channel_mult=tuple(s.unet["unet_mult"]),
                           num_res_blocks=s.unet["unet_res_blocks"]))


def peer_vqvae(s: Shapes = SHAPES["full"]):
    """diffusers VQModel with our widths, levels, res blocks, codebook and no attention (ours has none)."""
    from diffusers import VQModel
    c, levels = s.vq["vq_channels"], len(s.vq["vq_mult"])
    return VQModel(in_channels=1, out_channels=1, sample_size=s.image, down_block_types=("DownEncoderBlock2D",) * levels,
                   up_block_types=("UpDecoderBlock2D",) * levels, block_out_channels=tuple(c * m for m in s.vq["vq_mult"]),
                   layers_per_block=s.vq["vq_res_blocks"], norm_num_groups=min(32, c), latent_channels=4, vq_embed_dim=4,
                   num_vq_embeddings=s.vq["codebook_size"], mid_block_add_attention=False)


def peer_unet(s: Shapes = SHAPES["full"]):
    """diffusers UNet2DModel with our widths, res blocks, attention at the two lowest levels and head size 32."""
    from diffusers import UNet2DModel
    c = s.unet["unet_channels"]
    return UNet2DModel(sample_size=s.latent, in_channels=4, out_channels=4,
                       block_out_channels=tuple(c * m for m in s.unet["unet_mult"]),
                       layers_per_block=s.unet["unet_res_blocks"], attention_head_dim=32, norm_eps=1e-6,
                       down_block_types=("DownBlock2D", "DownBlock2D", "AttnDownBlock2D", "AttnDownBlock2D"),
                       up_block_types=("AttnUpBlock2D", "AttnUpBlock2D", "UpBlock2D", "UpBlock2D"))


def vq_loss(model, x, ours: bool):
    if ours:
        recon, codebook_loss, _ = model(x)
        return F.mse_loss(recon.float(), x) + codebook_loss
    out = model(x)
    return F.mse_loss(out.sample.float(), x) + out.commit_loss.mean()


def unet_loss(model, diffusion, z, ours: bool):
    if ours:
        return diffusion.loss(model, z)
    t = torch.randint(0, 1000, (len(z),), device=z.device)
    noise = torch.randn_like(z)
    return F.mse_loss(model(diffusion.q_sample(z, t, noise), t).sample.float(), noise)


# ----------------------------------------------------------------------------- timing

class Stepper:
    """One whole training step of a model, as a closure to time; ours with our device defaults."""

    def __init__(self, model, make_batch, loss_fn, device, ours: bool, fresh_batches: bool = False,
                 channels_last: bool | None = None, compiled: bool = False):
        cuda = device.type == "cuda"
        self.fresh_batches = fresh_batches  # make_batch() every step (its cost is part of the step)
        self.channels_last = ours and cuda if channels_last is None else channels_last
        self.model = model.to(device, memory_format=torch.channels_last if self.channels_last else torch.preserve_format)
        self.optimizer = adamw(model.parameters(), 1e-4) if ours else torch.optim.AdamW(model.parameters(), lr=1e-4)
        if compiled:  # as `--compile` does: the UNet's repeated blocks in place, anything else whole
            self.model = model.compile_blocks() if hasattr(model, "compile_blocks") else torch.compile(model)
        self.autocast = torch.autocast("cuda", dtype=torch.bfloat16) if cuda else nullcontext()
        self.make_batch, self.loss_fn = make_batch, loss_fn
        self.batch = self.prepare(make_batch())

    def prepare(self, x):
        return x.contiguous(memory_format=torch.channels_last) if self.channels_last else x

    def __call__(self):
        if self.fresh_batches:
            self.batch = self.prepare(self.make_batch())
        with self.autocast:
            loss = self.loss_fn(self.model, self.batch)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()

    def flops(self) -> int:
        """FLOPs of one step (forward + backward) as counted by torch's FlopCounterMode."""
        with FlopCounterMode(display=False) as counter:
            with self.autocast:
                loss = self.loss_fn(self.model, self.batch)
            loss.backward()
        self.optimizer.zero_grad(set_to_none=True)
        return counter.get_total_flops()


def timed(fn, device) -> float:
    """Seconds of one call of fn, the GPU's queued work included."""
    if device.type == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - t0


def side_by_side(steppers: dict, steps: int, device, first: dict | None = None) -> dict:
    """Median seconds per step of each stepper, taking turns step by step after one warm-up step each
    (its seconds, compilation included, go to `first`)."""
    for name, fn in steppers.items():
        seconds = timed(fn, device)
        if first is not None:
            first[name] = seconds
    times = {name: [] for name in steppers}
    for _ in range(steps):
        for name, fn in steppers.items():
            times[name].append(timed(fn, device))
    return {name: statistics.median(t) for name, t in times.items()}


def models_part(args, device) -> list[dict]:
    rows, s = [], SHAPES[args.shapes]
    vq_batch, unet_batch = args.vq_batch or s.vq["batch_size"], args.unet_batch or s.unet["batch_size"]
    images = lambda: torch.rand(vq_batch, 1, s.image, s.image, device=device) * 2 - 1  # noqa: E731
    latents = lambda: torch.randn(unet_batch, 4, s.latent, s.latent, device=device)  # noqa: E731
    diffusion = GaussianDiffusion(prediction="v").to(device)
    vq_ours, vq_peer = (lambda m, x: vq_loss(m, x, True)), (lambda m, x: vq_loss(m, x, False))
    unet_ours, unet_peer = (lambda m, z: unet_loss(m, diffusion, z, True)), (lambda m, z: unet_loss(m, diffusion, z, False))
    cases = {
        f"VQ-VAE {s.image}x{s.image}": (vq_batch, "img", {
            "ours": lambda **kw: Stepper(our_vqvae(s), images, vq_ours, device, True, **kw),
            "diffusers VQModel": lambda **kw: Stepper(peer_vqvae(s), images, vq_peer, device, False, **kw)}),
        f"UNet 4x{s.latent}x{s.latent}": (unet_batch, "latents", {
            "ours": lambda **kw: Stepper(our_unet(s), latents, unet_ours, device, True, **kw),
            "diffusers UNet2DModel": lambda **kw: Stepper(peer_unet(s), latents, unet_peer, device, False, **kw)}),
    }
    if importlib.util.find_spec("diffusers") is None:  # the anchors' rows need it (bench/README.md: bringing it)
        print("diffusers is not installed: the anchor rows are left out (pip install -r bench/requirements.txt)")
        cases = {case: (batch, unit, {"ours": makers["ours"]}) for case, (batch, unit, makers) in cases.items()}
    for case, (batch, unit, makers) in cases.items():
        if case.split()[0].lower().replace("-", "") not in args.cases:
            continue
        steppers = {name: make() for name, make in makers.items()}
        flops = {name: stepper.flops() for name, stepper in steppers.items()}
        if device.type == "cuda":  # the layout question: ours without channels_last
            steppers["ours, NCHW"], flops["ours, NCHW"] = makers["ours"](channels_last=False), flops["ours"]
        if args.compiled:
            for name in list(makers):
                steppers[f"{name}, compiled"], flops[f"{name}, compiled"] = makers[name](compiled=True), flops[name]
        first = {}
        seconds = side_by_side(steppers, args.steps, device, first)
        for name, stepper in steppers.items():
            peer = name.startswith("diffusers")
            baseline = seconds["ours, compiled" if name.endswith("compiled") and "ours, compiled" in seconds else "ours"]
            row = {"case": case, "model": name, "batch": batch,
                   "params_M": sum(p.numel() for p in stepper.model.parameters()) / 1e6,
                   "s_per_step": seconds[name], "first_step_s": first[name], "per_s": batch / seconds[name], "unit": unit,
                   "speed_vs_peer": seconds[name] / baseline if peer else None,  # > 1: ours is faster
                   "gflop_per_step": flops[name] / 1e9, "tflop_s": flops[name] / seconds[name] / 1e12}
            rows.append(row)
            print(json.dumps(row))
    return rows


def batches_part(args, device) -> list[dict]:
    """Ours at several batch sizes (default layout and precision): throughput and peak memory, for the GPU
    default of each stage. One stepper at a time, each in the same process after the previous is freed."""
    rows, s = [], SHAPES[args.shapes]
    diffusion = GaussianDiffusion(prediction="v").to(device)
    for stage, sizes in (("vqvae", args.vq_batches), ("unet", args.unet_batches)):
        for batch in sizes:
            if stage == "vqvae":
                step = Stepper(our_vqvae(s), lambda: torch.rand(batch, 1, s.image, s.image, device=device) * 2 - 1,
                               lambda m, x: vq_loss(m, x, True), device, True)
            else:
                step = Stepper(our_unet(s), lambda: torch.randn(batch, 4, s.latent, s.latent, device=device),
                               lambda m, z: unet_loss(m, diffusion, z, True), device, True)
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(device)
            seconds = side_by_side({"ours": step}, args.steps, device)["ours"]
            row = {"stage": stage, "batch": batch, "s_per_step": seconds, "per_s": batch / seconds}
            if device.type == "cuda":
                row["peak_allocated_GB"] = torch.cuda.max_memory_allocated(device) / 2 ** 30
            rows.append(row)
            print(json.dumps(row))
            del step
    return rows


def samplers_part(args, device) -> list[dict]:
    """`predict.generate` with the full preset's random-weight models at the preset's shapes: seconds per image
    of each sampler, at 16 images and at the default batch, eager and (on CUDA) with the UNet's calls replayed
    from CUDA graphs. The UNet as predict.py runs it (`runtime.models.for_sampling`), with our autocast."""
    s = SHAPES[args.shapes]
    vqvae = our_vqvae(s).to(device).eval().requires_grad_(False)
    model = LatentDiffusion(vqvae, for_sampling(our_unet(s), device),
                            GaussianDiffusion(prediction="v").to(device), 1.0, (4, s.latent, s.latent), None,
                            [], 0)
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else nullcontext()
    default_batch = args.sample_batch or predict.DEFAULT_BATCH["cuda" if device.type == "cuda" else "cpu"]
    rows = []
    for name in args.samplers.split(","):
        flags = predict.sampling_from_args(driver.parse(["sample", *SAMPLERS[name]]))
        for num in sorted(set(args.sample_counts or [16, default_batch])):
            for graphs in ((False, True) if device.type == "cuda" else (False,)):
                sampling = dataclasses.replace(flags, batch_size=num, cuda_graphs=graphs, gif_frames=2)
                torch.manual_seed(0)
                _, _, seconds = predict.generate(model, sampling, num, autocast=autocast)
                row = {"sampler": name, "network_calls": sampling.calls(1000), "batch": num, "cuda_graphs": graphs,
                       "s_per_image": seconds / num, "ms_per_call": seconds / sampling.calls(1000) * 1e3}
                rows.append(row)
                print(json.dumps(row))
    return rows


def cache_part(args, device) -> dict:
    """Stage-2 step with latents from the cache vs encoding a batch of (in-memory uint8) images each step."""
    unet_batch = args.unet_batch or FULL_UNET["batch_size"]
    vqvae = our_vqvae().to(device).eval().requires_grad_(False)
    diffusion = GaussianDiffusion(prediction="v").to(device)
    cache = torch.randn(1024, 4, 32, 32, device=device)
    images = torch.randint(0, 256, (unet_batch, 1, 256, 256), dtype=torch.uint8)
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else nullcontext()

    def from_cache():
        return cache[torch.randint(0, len(cache), (unet_batch,), device=device)]

    def on_the_fly():
        with torch.no_grad(), autocast:
            return vqvae.encode(images.to(device).float() / 127.5 - 1).float()

    loss = lambda m, z: unet_loss(m, diffusion, z, True)  # noqa: E731
    steppers = {"latent cache": Stepper(our_unet(), from_cache, loss, device, True, fresh_batches=True),
                "encode on the fly": Stepper(our_unet(), on_the_fly, loss, device, True, fresh_batches=True)}
    seconds = side_by_side(steppers, args.steps, device)
    steps_per_epoch = ADNI_SLICES // unet_batch
    row = {"steps_per_epoch": steps_per_epoch, **{f"{k} s/step": v for k, v in seconds.items()},
           **{f"{k} min/epoch": v * steps_per_epoch / 60 for k, v in seconds.items()},
           "speedup": seconds["encode on the fly"] / seconds["latent cache"]}
    print(json.dumps(row))
    return row


def optimizer_part(args, device) -> dict:
    """One AdamW step over the full UNet's 74M parameters: the fused kernel against the default for-each one."""
    model = our_unet().to(device)
    for p in model.parameters():
        p.grad = torch.randn_like(p)
    optimizers = {"for-each": torch.optim.AdamW(model.parameters(), lr=1e-4, foreach=True),
                  "fused": adamw(model.parameters(), 1e-4)}
    seconds = side_by_side({k: o.step for k, o in optimizers.items()}, 10 * args.steps, device)
    row = {**{f"{k} s": v for k, v in seconds.items()}, "fused": optimizers["fused"].defaults.get("fused"),
           "speedup": seconds["for-each"] / seconds["fused"]}
    print(json.dumps(row))
    return row


def memory_part(args, device) -> list[dict]:
    """Peak memory of training each model at the full preset's batch, each in a fresh process."""
    rows = []
    for stage in ("vqvae", "unet"):
        cmd = [sys.executable, __file__, "--device", str(device), "--steps", "2", "--memory-of", stage]
        rows.append(json.loads(subprocess.run(cmd, capture_output=True, text=True, check=True).stdout.splitlines()[-1]))
        print(json.dumps(rows[-1]))
    return rows


def memory_of(stage: str, steps: int, device):
    batch = FULL_VQ["batch_size"] if stage == "vqvae" else FULL_UNET["batch_size"]
    if stage == "vqvae":
        step = Stepper(our_vqvae(), lambda: torch.rand(batch, 1, 256, 256, device=device) * 2 - 1,
                       lambda m, x: vq_loss(m, x, True), device, True)
    else:
        diffusion = GaussianDiffusion(prediction="v").to(device)
        step = Stepper(our_unet(), lambda: torch.randn(batch, 4, 32, 32, device=device),
                       lambda m, z: unet_loss(m, diffusion, z, True), device, True)
    for _ in range(steps):
        step()
    row = {"stage": stage, "batch": batch, "peak_rss_GB": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** 20}
    if device.type == "cuda":
        row["peak_allocated_GB"] = torch.cuda.max_memory_allocated(device) / 2 ** 30
    print(json.dumps(row))


def full_run_estimate(rows: list[dict]) -> dict:
    """Hours for the full preset on the full ADNI set (20 epochs of stage 1, 300 of stage 2) at the measured
    images/s of ours (the latent encoding and sample grids not counted)."""
    ours = {r["case"]: r for r in rows if r["model"] == "ours"}
    vq_steps = FULL_VQ["epochs"] * (ADNI_SLICES // FULL_VQ["batch_size"])
    unet_steps = FULL_UNET["epochs"] * (ADNI_SLICES // FULL_UNET["batch_size"])
    vq_rate, unet_rate = ours["VQ-VAE 256x256"]["per_s"], ours["UNet 4x32x32"]["per_s"]
    return {"vqvae_steps": vq_steps, "unet_steps": unet_steps,
            "vqvae_h": FULL_VQ["epochs"] * ADNI_SLICES / vq_rate / 3600,
            "unet_h": FULL_UNET["epochs"] * ADNI_SLICES / unet_rate / 3600,
            # the same schedule on the 8,000-slice subset of ../shared/data (its 90% training subjects)
            "subset_vqvae_min": FULL_VQ["epochs"] * SUBSET_TRAINING_SLICES / vq_rate / 60,
            "subset_unet_min": FULL_UNET["epochs"] * SUBSET_TRAINING_SLICES / unet_rate / 60}


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--parts", default=None,
                        help="default: models,cache,optimizer,memory, and on CUDA also batches,samplers")
    parser.add_argument("--cases", default="vqvae,unet", help="models part: which pairs (default: %(default)s)")
    parser.add_argument("--compiled", action=argparse.BooleanOptionalAction, default=None,
                        help="models part: compiled rows too (default: on CUDA only)")
    parser.add_argument("--vq-batches", type=ints, default=[16, 32, 64], help="batches part (default: 16,32,64)")
    parser.add_argument("--unet-batches", type=ints, default=[64, 128, 256, 512], help="batches part (default: 64,128,256,512)")
    parser.add_argument("--samplers", default="ddpm-repeat,ddim-50,dpmpp-20",
                        help=f"samplers part, of {', '.join(SAMPLERS)} (default: %(default)s)")
    parser.add_argument("--steps", type=int, default=5, help="timed steps per model (default: %(default)s)")
    parser.add_argument("--vq-batch", type=int, default=None, help="VQ-VAE batch (default: the full preset's)")
    parser.add_argument("--unet-batch", type=int, default=None, help="UNet batch (default: the full preset's)")
    parser.add_argument("--shapes", choices=list(SHAPES), default="full",
                        help="models, batches and samplers parts: the full preset's networks and shapes, or the tiny "
                             "preset's, for a quick run on a CPU (default: %(default)s)")
    parser.add_argument("--sample-batch", type=int, default=None,
                        help="samplers part: the larger batch (default: predict.py's default batch of the device)")
    parser.add_argument("--sample-counts", type=ints, default=None,
                        help="samplers part: the numbers of images, each sampled as one batch (default: 16 and the "
                             "larger batch)")
    parser.add_argument("--out", default=None, help="write the results here as JSON")
    parser.add_argument("--memory-of", choices=["vqvae", "unet"], default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    device = torch.device(args.device)
    torch.manual_seed(0)
    if args.memory_of:
        return memory_of(args.memory_of, args.steps, device)
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
        name = torch.cuda.get_device_name(device)
    else:
        name = f"CPU, {torch.get_num_threads()} threads (no GPU: no MFU or GPU timings)"
    print(f"device: {name}; torch {torch.__version__}")
    results = {"device": name, "torch": torch.__version__}
    cuda = device.type == "cuda"
    parts = (args.parts or "models,cache,optimizer,memory" + (",batches,samplers" if cuda else "")).split(",")
    args.compiled = cuda if args.compiled is None else args.compiled
    if "models" in parts:
        results["models"] = models_part(args, device)
        if args.cases == "vqvae,unet" and args.shapes == "full":
            results["full_adni_run"] = full_run_estimate(results["models"])
        peak = next((v for k, v in PEAK_BF16_TFLOPS.items() if k in name), None)
        if device.type == "cuda" and peak:
            for row in results["models"]:
                row["mfu"] = row["tflop_s"] / peak
        print(json.dumps(results.get("full_adni_run")))
    if "cache" in parts:
        results["cache"] = cache_part(args, device)
    if "optimizer" in parts:
        results["optimizer"] = optimizer_part(args, device)
    if "memory" in parts:
        results["memory"] = memory_part(args, device)
    if "batches" in parts:
        results["batches"] = batches_part(args, device)
    if "samplers" in parts:
        results["samplers"] = samplers_part(args, device)
    if args.out:
        Path(args.out).write_text(json.dumps(results, indent=2))
    print_tables(results)


def print_tables(results: dict):
    if "models" in results:
        print("\n| case | model | params | batch | s/step | first step s | per s | ours faster by | TFLOP/s | MFU |\n"
              "|---|---|---|---|---|---|---|---|---|---|")
        for r in results["models"]:
            speed = "" if r["speed_vs_peer"] is None else f"{r['speed_vs_peer']:.2f}x"
            mfu = f"{r['mfu']:.1%}" if "mfu" in r else "-"
            print(f"| {r['case']} | {r['model']} | {r['params_M']:.2f}M | {r['batch']} | {r['s_per_step']:.3f} | "
                  f"{r['first_step_s']:.1f} | {r['per_s']:.1f} {r['unit']} | {speed} | {r['tflop_s']:.3f} | {mfu} |")
    if "full_adni_run" in results:
        e = results["full_adni_run"]
        print(f"\nfull ADNI run with the full preset: stage 1 {e['vqvae_steps']} steps {e['vqvae_h']:.1f} h, "
              f"stage 2 {e['unet_steps']} steps {e['unet_h']:.1f} h")
    if "cache" in results:
        c = results["cache"]
        print(f"\nstage-2 epoch ({c['steps_per_epoch']} steps): latent cache {c['latent cache min/epoch']:.1f} min, "
              f"encoding on the fly {c['encode on the fly min/epoch']:.1f} min: {c['speedup']:.2f}x")
    if "optimizer" in results:
        o = results["optimizer"]
        print(f"\nAdamW step, 74M parameters: for-each {o['for-each s']:.3f} s, fused {o['fused s']:.3f} s: {o['speedup']:.2f}x")
    for r in results.get("memory", []):
        gpu = f", {r['peak_allocated_GB']:.2f} GB allocated on the GPU" if "peak_allocated_GB" in r else ""
        print(f"peak memory, {r['stage']} batch {r['batch']}: {r['peak_rss_GB']:.2f} GB RSS{gpu}")
    if "batches" in results:
        print("\n| stage | batch | s/step | per s | peak GB on the GPU |\n|---|---|---|---|---|")
        for r in results["batches"]:
            peak = f"{r['peak_allocated_GB']:.2f}" if "peak_allocated_GB" in r else "-"
            print(f"| {r['stage']} | {r['batch']} | {r['s_per_step']:.3f} | {r['per_s']:.1f} | {peak} |")
    if "samplers" in results:
        print("\n| sampler | network calls | batch | CUDA graphs | s/image | ms per call (decoding included) |\n|---|---|---|---|---|---|")
        for r in results["samplers"]:
            print(f"| {r['sampler']} | {r['network_calls']} | {r['batch']} | {'yes' if r['cuda_graphs'] else 'no'} | "
                  f"{r['s_per_image']:.4f} | {r['ms_per_call']:.2f} |")


if __name__ == "__main__":
    main()
