"""The two training stages, `train_vqvae(args)` (stage 1) and `train_unet(args)` (stage 2), the optional fine-tune of
stage 1's decoder alone, `train_decoder(args)`: each sets up its data, model and loss and hands them to the loop
they share (`runtime/loop.py`) as a `Stage`.

Each reads and writes one run folder (`args.run`); runtime/README.md ("Around a run") says what it holds. The
command line in driver.py resolves every flag first (presets, what stage 2 inherits from stage 1), then calls them,
on one device or, under torchrun, on many (DDP):

    python driver.py train-vqvae --run runs/demo     # stage 1: VQ-VAE on images
    python driver.py train-unet  --run runs/demo     # stage 2: UNet on the VQ-VAE's latents
    python driver.py train-decoder --run runs/demo   # optional: the VQ-VAE's decoder fine-tuned alone, for detail
    torchrun --standalone --nproc_per_node 4 driver.py train-vqvae --run-dir runs/adni --data PATH

Under torchrun every process trains on its shard of each epoch (DistributedSampler); rank 0 alone
writes the run folder, builds the image and latent caches (the others wait) and logs the loss
averaged over ranks. One optimizer step = --grad-accum micro-batches of --batch-size on every rank.
"""
from __future__ import annotations

import math
import os
import shutil
from dataclasses import asdict
from pathlib import Path

import torch
import torch.nn as nn

from conditions.participants import SESSION_ID, find_table, read_table, saved_table, with_bids_sessions
from conditions.table import CLASS, build_conditions, condition_matrix, saved_conditions, subjects_of, to_saved
from dataset import dataset_labels, dataset_paths, files_fingerprint, index_batches, to_unit, uint8_loader
from diffusion.gaussian import GaussianDiffusion
from diffusion.guidance import drop_conditions
from losses.stage1 import ReconstructionLoss, Stage1LossConfig
from modules import EMA, VQVAE, UNet, UNetConfig, VQVAEConfig
from runtime.checkpoint import (atomic_save, checkpoint_to_resume, fingerprint, load_checkpoint, load_weights,
                                model_config, remove_unfinished)
from runtime.errors import BadInputError
from runtime.loop import Stage, restore_training, start_stage, total_steps, train_loop, trains_further
from runtime.models import load_vqvae
from runtime.optimizer import adamw
from runtime.posthoc_ema import SNAPSHOTS, PowerFunctionEMA, drop_snapshots_after, snapshot_files
from runtime.process import (Runtime, any_rank, check_processes, cpus_per_process, main_rank_first, place_model,
                             progress, same_on_every_rank, setup_runtime, wrap_model)
from volumes.run_data import (data_files_key, refuse_subject_folders_as_classes, run_geometry, subject_summary,
                              training_data, training_files)


# ----------------------------------------------------------------------------- stage 1: VQ-VAE

def vqvae_config(args) -> VQVAEConfig:
    return VQVAEConfig(in_channels=args.channels, image_size=args.image_size, channels=args.vq_channels,
                       channel_mult=tuple(args.vq_mult), num_res_blocks=args.vq_res_blocks,
                       codebook_size=args.codebook_size, min_group_width=args.vq_min_group_width,
                       regularisation=args.regularisation, kl_weight=args.kl_weight)


def train_vqvae(args):
    """Stage 1: VQ-VAE with an MSE (or L1) reconstruction loss + codebook + 0.25 x commitment loss (or, with
    `--regularisation kl`, LDM's KL term in their place), optionally
    measured on the clamped output (`as_shown`), + Laplacian L1, the focal frequency loss, a perceptual loss and an
    adversarial patch loss (losses/: VQGAN's and the brain-MRI anchors' recipes for detail)."""
    # setup
    data, cfg = args.data_config, vqvae_config(args)
    resume = checkpoint_to_resume(Path(args.run) / "vqvae.pt", "vqvae", args.resume, asdict(cfg), VQVAEConfig)
    torch.manual_seed(args.seed)
    rt = setup_runtime(args.device, args.precision, args.deterministic, args.channels_last)
    check_processes(resume and resume.get("rng"), rt)  # before anything is written
    if not resume:
        refuse_subject_folders_as_classes(data)

    # saved: a resumed run, stage 2 and `evaluate` check that they read these files (a resumed run's were checked);
    # every byte is read by the process that saves them only
    files_key = resume["data_files"] if resume and "contents" in resume.get("data_files", {}) else data_files_key(
        data, contents=rt.main)
    geometry = resume.get("sample_geometry") if resume else None  # of the NIfTI samples: saved, so no data is needed
    if geometry is None and rt.main:
        geometry = asdict(run_geometry(data))
    later = [name for name in ("unet.pt", "decoder.pt") if (Path(args.run) / name).exists()]
    if resume and later and trains_further(args, resume["step"], args.max_steps or total_steps(  # before decoding
            args, len(training_files(data)[0]), rt.world), resume):
        raise BadInputError(f"{' and '.join(later)} in {args.run} learned from this VQ-VAE at step {resume['step']}, "
                            f"and training it further would leave them unusable: move them away first (with a copy of "
                            f"vqvae.pt they stay a working pair), or continue stage 1 in a copy of the run")
    dataset, workers, fixed, max_steps = stage1_images(args, rt)

    # model and optimizer (the model in its memory layout before the optimizer state is loaded)
    model = place_model(VQVAE(cfg), rt)
    optimizer = adamw(model.parameters(), args.lr, weight_decay=0.0, betas=(0.9, 0.99))
    step = restore_training(resume, model, optimizer, rt, args.lr, Path(args.run) / "vqvae.pt")
    reconstruction = ReconstructionLoss(Stage1LossConfig.from_args(args), rt, resume, max_steps)
    torch.manual_seed(args.seed + rt.rank)  # the same weights on every rank, its own random stream after
    train_model = wrap_model(model, rt, args.compile, str(Path(args.run) / "compile_cache"))
    batches = index_batches(len(dataset), args.batch_size, args.seed, rt.rank, rt.world, start=step * args.grad_accum)
    stream = iter(uint8_loader(dataset, batches, workers, pin_memory=rt.device.type == "cuda"))

    def loss(batch):
        x = to_unit(batch, rt.device, rt.channels_last)
        with rt.autocast:
            recon, vq_loss, stats = train_model(x)
        rec, recon_loss, adversarial = reconstruction(recon, x, model.last_layer)
        total = rec + vq_loss + adversarial
        logged = [stats[name] for name in model.stat_names]
        return total, torch.stack([total, recon_loss, vq_loss, adversarial.detach(), *logged])

    start_stage(args, rt, "vqvae", f"VQ-VAE {sum(p.numel() for p in model.parameters()) / 1e6:.2f}M params, latent "
                f"{cfg.latent_shape}, {len(dataset)} images from {data.folder()}, steps {step} -> {max_steps} of "
                f"{args.batch_size * args.grad_accum * rt.world} images ({rt.world} process(es)) on {rt.device}, {rt.precision}")
    train_loop(Stage("vqvae", model, train_model, optimizer, batches=stream, loss=loss,
                     stats=("loss", "recon", cfg.regularisation, "adversarial", *model.stat_names),
                     draw=lambda: reconstruction_grid(model, model, fixed, rt), grid="recon",
                     payload=lambda: {"kind": "vqvae", "config": asdict(cfg), "data": data.saved()["root"],
                                      "data_config": data.saved(), "data_files": files_key,
                                      "sample_geometry": geometry, **reconstruction.state()},
                     after_step=reconstruction.after_step, plot=("loss", "recon", cfg.regularisation), derived=psnr),
               args, rt, step, max_steps, resume)


def stage1_images(args, rt: Runtime) -> tuple:
    """Stage 1's training images (held-out subjects removed: every rank decodes them into memory, or rank 0 alone
    into a memory-mapped cache on disk), the loader threads, 8 fixed images of several subjects for the grids, and
    the run's length in steps."""
    rt.log(subject_summary(args.data_config))
    workers = args.workers or cpus_per_process()
    dataset = training_data(args.data_config, args.cache_gb, workers, Path(args.run),
                            build_guard=lambda: main_rank_first(rt))
    if not same_on_every_rank(len(dataset), rt):  # each shard would hold other images than the sampler counts on
        raise BadInputError(f"the processes read different numbers of training images (this one {len(dataset)}): a "
                            "file read on some and left out by --skip-bad-images on others; check the data folder")
    spread = torch.linspace(0, len(dataset) - 1, min(8, len(dataset))).long().tolist()  # several subjects, not one
    fixed = torch.stack([dataset[i][0] for i in spread]).to(rt.device)
    return dataset, workers, fixed, total_steps(args, len(dataset), rt.world)


def reconstruction_grid(vqvae: VQVAE, trained: nn.Module, fixed: torch.Tensor, rt: Runtime) -> tuple:
    """A stage-1 grid: the fixed images above, their reconstructions below; `trained`, the part that learns, in
    eval mode for the pass."""
    trained.eval()
    with torch.no_grad(), rt.autocast:
        recon = vqvae(fixed)[0].float()
    trained.train()
    return torch.cat([fixed, recon]), len(fixed)


def psnr(values: dict) -> dict:
    """The logged PSNR of the logged mean MSE `recon` (images in [-1, 1]: peak-to-peak 2)."""
    return {"psnr": 10 * math.log10(4.0 / max(values.get("recon", 1.0), 1e-12))}


# ----------------------------------------------------------------------------- stage 1, optional: the decoder alone

def train_decoder(args):
    """The VQ-VAE's decoder fine-tuned alone on stage 1's images, its encoder and codebook frozen, so that the latents,
    and a UNet trained on them, stay as they were (as Stable Diffusion's ft-EMA and ft-MSE decoders were made). By
    default with the brain-MRI anchors' recipe (`tiny`'s PatchGAN with 16x16 patches), whose perceptual network and
    discriminator make a step of the whole first stage too dear on a CPU (bench/README.md). Writes RUN/decoder.pt,
    tied to RUN/vqvae.pt by its fingerprint; sampling, `evaluate` and stage 2's grids decode with it from then on
    (runtime.models.load_vqvae)."""
    # setup
    run = Path(args.run)
    rt = setup_runtime(args.device, args.precision, args.deterministic, args.channels_last)
    vqvae, vq_ckpt = load_vqvae(run, rt.device, finetuned=False)
    vq_fingerprint = fingerprint(vq_ckpt["model"])
    resume = checkpoint_to_resume(run / "decoder.pt", "decoder", args.resume, asdict(vqvae.cfg), VQVAEConfig)
    if resume and resume["vqvae_fingerprint"] != vq_fingerprint:
        raise BadInputError(f"{run / 'decoder.pt'} was fine-tuned from another VQ-VAE than {run / 'vqvae.pt'}; move it "
                            f"away and run train-decoder again without --resume")
    check_processes(resume and resume.get("rng"), rt)
    torch.manual_seed(args.seed)
    dataset, workers, fixed, max_steps = stage1_images(args, rt)

    # the decoder learns; the encoder and the codebook stay frozen, in eval mode (load_vqvae)
    vqvae = place_model(vqvae, rt)
    decoder = vqvae.decoder.requires_grad_(True)
    optimizer = adamw(decoder.parameters(), args.lr, weight_decay=0.0, betas=(0.9, 0.99))
    step = restore_training(resume, decoder, optimizer, rt, args.lr, run / "decoder.pt")
    reconstruction = ReconstructionLoss(Stage1LossConfig.from_args(args), rt, resume, max_steps)
    torch.manual_seed(args.seed + rt.rank)  # the same weights on every rank, its own random stream after
    train_model = wrap_model(decoder, rt, args.compile, str(run / "compile_cache"))
    batches = index_batches(len(dataset), args.batch_size, args.seed, rt.rank, rt.world, start=step * args.grad_accum)
    stream = iter(uint8_loader(dataset, batches, workers, pin_memory=rt.device.type == "cuda"))

    def loss(batch):
        x = to_unit(batch, rt.device, rt.channels_last)
        with torch.no_grad(), rt.autocast:
            z_q = vqvae.quantize(vqvae.encode(x))[0]
        with rt.autocast:
            recon = train_model(z_q)
        rec, recon_loss, adversarial = reconstruction(recon, x, vqvae.last_layer)
        total = rec + adversarial
        return total, torch.stack([total, recon_loss, adversarial.detach()])

    start_stage(args, rt, "decoder", f"the decoder of {run / 'vqvae.pt'} (step {vq_ckpt['step']}) alone, "
                f"{sum(p.numel() for p in decoder.parameters()) / 1e6:.2f}M params, {len(dataset)} images, steps "
                f"{step} -> {max_steps} of {args.batch_size * args.grad_accum * rt.world} images on {rt.device}, {rt.precision}")
    train_loop(Stage("decoder", decoder, train_model, optimizer, batches=stream, loss=loss,
                     stats=("loss", "recon", "adversarial"),
                     draw=lambda: reconstruction_grid(vqvae, decoder, fixed, rt), grid="decoded",
                     payload=lambda: {"kind": "decoder", "config": asdict(vqvae.cfg), "vqvae_fingerprint": vq_fingerprint,
                                      **reconstruction.state()},
                     after_step=reconstruction.after_step, plot=("loss", "recon"), derived=psnr),
               args, rt, step, max_steps, resume)


# ----------------------------------------------------------------------------- stage 2: UNet

@torch.no_grad()
def encode_dataset(vqvae: VQVAE, dataset, batch_size: int, rt: Runtime, workers: int) -> torch.Tensor:
    """Pre-quantisation latents z of every image, in dataset order: (N, 4, h, w) float32 on the CPU."""
    chunks = torch.arange(len(dataset)).split(batch_size)
    out = []
    for x in progress(uint8_loader(dataset, chunks, workers), desc="encoding latents", dynamic_ncols=True):
        with rt.autocast:
            out.append(vqvae.encode(to_unit(x, rt.device)).float().cpu())
    return torch.cat(out)


def resume_snapshots(posthoc: PowerFunctionEMA, run: Path, step: int):
    """The post-hoc EMA snapshots as of the checkpoint of `step`: those after it removed (of a longer attempt, killed:
    a run that trains on draws them again, the same; one that trains no further must not count them), and its own
    written again from the restored profiles where a kill took it (the checkpoint was written before its snapshot
    until 2026-12-08)."""
    drop_snapshots_after(run, step, keep_last=True)
    if step not in snapshot_files(run):
        posthoc.snapshot(run)


def latent_cache(args, samples: list, vqvae: VQVAE, vq_ckpt: dict, rt: Runtime
                 ) -> tuple[torch.Tensor, torch.Tensor, list[str]]:
    """RUN/latents.pt: the training images encoded once (by rank 0; the other ranks wait, then read it), with
    their class labels and files; reused while the VQ-VAE, the data config and the image files are unchanged, wherever
    the folder now is (--data: the same images moved; the paths are then put in their new place): encoded again, the
    latents a resumed run trains on would change with this command's device and precision. The files: their names in
    the data folder and sizes, whose contents `check_same_files` checked against stage 1's; for a stage 1 that kept no
    hash of its files' contents (before 2026-12-07), their modification times too. Which device and precision encoded
    the latents is kept with them."""
    vq_fingerprint = fingerprint(vq_ckpt["model"])
    listing = "sha1" if "contents" in (vq_ckpt.get("data_files") or {}) else "times"
    path = Path(args.run) / "latents.pt"
    data = args.data_config
    with main_rank_first(rt):
        if not rt.main:
            cache = load_checkpoint(path, "latents")
            return cache["z"].float(), cache["y"], cached_paths(cache, data)
        saved = data.saved()
        key = {"vqvae": vq_fingerprint, **{k: v for k, v in saved.items() if k != "root"}, "count": len(samples),
               "files": data_files_key(data)[listing]}
        before = {"vqvae": vq_fingerprint, **saved, "count": len(samples), "files": files_fingerprint(samples)}
        remove_unfinished(path.parent, path.name)
        if path.exists():
            cache = load_checkpoint(path, "latents")
            if cache["key"] in (key, before) and "paths" in cache:  # before: a cache written before 2026-12-08
                print(f"latent cache {path}: {len(cache['z'])} latents reused")
                return cache["z"].float(), cache["y"], cached_paths(cache, data)
        workers = args.workers or cpus_per_process()
        dataset = training_data(data, args.cache_gb, workers, Path(args.run))
        z = encode_dataset(vqvae, dataset, 64, rt, workers)
        y, paths = dataset_labels(dataset), dataset_paths(dataset)  # of the images decoded: --skip-bad-images may
        atomic_save({"kind": "latents", "key": key, "z": z, "y": y, "root": saved["root"], "relative": True,  # have
                     "paths": [os.path.relpath(os.path.abspath(p), saved["root"]) for p in paths],  # left some out
                     "encoded": {"device": rt.device.type, "precision": rt.precision}}, path)
        print(f"latent cache {path}: {len(z)} latents written")
        return z, y, paths


def cached_paths(cache: dict, data) -> list[str]:
    """The cache's image paths, in the data folder where it is now: kept relative to the folder (the same files, by
    the cache's key, wherever it moved and whatever the working directory); a cache written before 2026-12-08 kept
    them as the command that wrote it named them, and its key held them."""
    if not cache.get("relative"):
        return cache["paths"]
    return [os.path.join(data.saved()["root"], p) for p in cache["paths"]]


def unet_config(args, latent_shape, conditions: tuple = ()) -> UNetConfig:
    return UNetConfig(in_channels=latent_shape[0], latent_size=latent_shape[1], channels=args.unet_channels,
                      channel_mult=tuple(args.unet_mult), num_res_blocks=args.unet_res_blocks, conditions=conditions)


def training_conditions(args, resume: dict | None, classes: list[str], paths: list[str], labels: torch.Tensor):
    """(conditions, y (N, K) of the N training latents, NaN where not given, the participants table or None, a
    report line). Fresh: --condition's names (`class` with --conditional), defined by the training subjects; resumed:
    the run's own, with its own table, which must be unchanged."""
    data = args.data_config
    names = list(args.condition or [])
    if args.conditional and CLASS not in [n.partition(":")[0] for n in names]:
        names.insert(0, CLASS)  # --conditional --condition age: both
    subjects = subjects_of(paths, data.subject())
    saved = resume.get("labels") if resume else None
    if resume:
        if args.labels and not saved:  # --labels may move the run's table; a run of none has nothing to move
            raise BadInputError(f"--labels {args.labels}: this run was trained without a participants table, and a "
                                "resumed run keeps its conditions; leave --labels out, or train a new --run")
        conditions = saved_conditions(resume)
        moved = args.labels if saved and args.labels != saved["file"] else None  # given again: where it is now
        table = saved_table(saved, data.folder(), moved) if saved else None
        if table and table.sha1 != saved["sha1"]:
            sessions = f" (or its sessions files: {', '.join(table.session_files)})" if table.session_files else ""
            raise BadInputError(f"the participants table {table.file}{sessions} changed since this run started; a "
                                f"resumed run keeps the values it trained on: restore it, or train a new --run")
    else:
        layout = data.layout  # by default, the table of stage 1's --class-column, read as stage 1 read it (a
        # subject's row: its session_id column names no session, unless asked), or stage 1's table of scans
        stage1s = not args.labels and (layout.class_column or layout.scan_table)
        path = (find_table(data.folder(), args.labels or layout.class_table or layout.scan_table)
                if [n for n in names if n != CLASS] or args.labels else None)
        subject_column = (layout.class_subject_column or layout.scan_subject_column) if stage1s else None
        if stage1s and layout.scan_table and path is not None and not path.is_file():
            raise BadInputError(f"{path}, stage 1's table of scans, is not there: give it where it is now, with its "
                                f"columns, train-unet --labels FILE --subject-column "
                                f"'{layout.scan_subject_column or 'participant_id'}' --session-column "
                                f"'{layout.scan_column}'")
        session_column = (layout.scan_column if layout.scan_table else None) if stage1s else SESSION_ID
        table = read_table(path, args.subject_column or subject_column,
                           session_column=args.session_column or session_column) if path else None
        if table and path.name == "participants.tsv":
            table = with_bids_sessions(table)  # a BIDS tree's: with its sub-*/sub-*_sessions.tsv
        conditions = build_conditions(names, table, subjects, classes, paths, str(data.folder()))
    y, report = condition_matrix(conditions, table, subjects, labels, paths, str(data.folder()))
    return conditions, y, table, report


def train_unet(args):
    """Stage 2: v- or eps-prediction UNet on scale * z, z the frozen VQ-VAE's pre-quantisation latents."""
    # setup: the frozen VQ-VAE of this run, the UNet's config (driver.py checked stage 1 and the flags)
    run = Path(args.run)
    ckpt_path = run / "unet.pt"
    torch.manual_seed(args.seed)
    rt = setup_runtime(args.device, args.precision, args.deterministic, args.channels_last)
    vqvae, vq_ckpt = load_vqvae(run, rt.device)
    vq_fingerprint = fingerprint(vq_ckpt["model"])
    latent_shape = vqvae.cfg.latent_shape
    samples, classes = training_files(args.data_config, expand_volumes=False)  # the cache key's files: no volume is read
    diffusion = GaussianDiffusion(args.diffusion_steps, args.schedule, args.loss, args.prediction, args.min_snr_gamma,
                                  args.timestep_sampling)
    chosen = {k: v for k, v in asdict(unet_config(args, latent_shape)).items()  # not flags: a resumed run keeps its own
              if k not in ("scale_shift_norm", "min_group_width", "conditions")}
    resume = checkpoint_to_resume(ckpt_path, "unet", args.resume, {**chosen, **diffusion.config()},
                                  diffusion_defaults=GaussianDiffusion().config())
    if resume and resume["vqvae_fingerprint"] != vq_fingerprint:
        raise BadInputError(f"{ckpt_path} was trained on another VQ-VAE than {run / 'vqvae.pt'}: move it (and "
                            f"unet.prev.pt) away and run train-unet again without --resume")
    check_processes(resume and resume.get("rng"), rt)  # before the latents are encoded
    if not resume and snapshot_files(run) and rt.main:  # an earlier stage 2's, whose unet.pt is gone: not this one's
        aside = run / f"{SNAPSHOTS}.replaced"
        shutil.rmtree(aside, ignore_errors=True)
        (run / SNAPSHOTS).replace(aside)
        rt.log(f"moved the EMA snapshots of an earlier stage 2 to {aside}: autoguidance and `driver.py ema` would "
               f"have taken them for this run's")

    # data: the latent cache, scaled to unit variance (the scale is measured, saved and reused), and the conditions
    if not resume:  # a participants table's error before the latents are encoded, which may take minutes
        training_conditions(args, None, classes, [p for p, _ in samples], torch.tensor([k for _, k in samples]))
    z, labels, paths = latent_cache(args, samples, vqvae, vq_ckpt, rt)
    conditions, y, table, report = training_conditions(args, resume, classes, paths, labels)
    if conditions:
        rt.log(report)
    y = y.to(rt.device)
    cfg = model_config(UNetConfig, resume, ckpt_path) if resume else unet_config(args, latent_shape,
                                                                                 tuple(c.size for c in conditions))
    latent_scale = resume["latent_scale"] if resume else 1.0 / z.std().item()
    latents = (z * latent_scale).to(rt.device)
    latent_absmax = resume["latent_absmax"] if resume else latents.abs().max().item()  # range for clipping x0
    max_steps = total_steps(args, len(latents), rt.world)

    # model, EMA, optimizer (the model in its memory layout before the EMA copy and the optimizer state); seeded
    # here, so that the initial weights do not depend on whether the latent cache was written (a DataLoader draws its seed)
    torch.manual_seed(args.seed)
    model = place_model(UNet(cfg), rt)
    diffusion = diffusion.to(rt.device)
    ema = EMA(model, args.ema_decay)  # the sampling weights, in eval mode
    optimizer = adamw(model.parameters(), args.lr, weight_decay=0.0)
    step = restore_training(resume, model, optimizer, rt, args.lr, ckpt_path)
    if resume:
        load_weights(ema.module, resume["ema"], ckpt_path, "EMA")
        ema.updates = resume["ema_updates"]
        chosen = resume.get("sampling_ema")  # `driver.py ema`'s choice: of the weights until now, not of those to come
        if chosen and trains_further(args, step, max_steps, resume):
            rt.log(f"the EMA length `driver.py ema` chose (sigma_rel {chosen['sigma_rel']:g}) is set aside: the UNet "
                   f"trains on, and is sampled from its own EMA until `driver.py ema` chooses again")
    posthoc = PowerFunctionEMA(model) if args.posthoc_ema and rt.main else None  # EMA lengths chosen after training
    # once training goes on from a checkpoint, the snapshots after it are drawn again, the same, and one written only
    # because the run stopped there goes too; a finished run resumed trains nothing and keeps them all
    stopped_at = step if posthoc and resume else None
    if posthoc and resume:
        posthoc.load_state_dict(resume["posthoc_ema"])
        resume_snapshots(posthoc, run, step)
    torch.manual_seed(args.seed + rt.rank)  # the same weights on every rank, its own noise and steps t after
    train_model = wrap_model(model, rt, args.compile, str(Path(args.run) / "compile_cache"))
    batches = index_batches(len(latents), args.batch_size, args.seed, rt.rank, rt.world, start=step * args.grad_accum,
                            device=rt.device)

    def loss(idx):
        x0 = latents[idx]
        if rt.channels_last:
            x0 = x0.contiguous(memory_format=torch.channels_last)
        given = drop_conditions(y[idx], args.label_dropout) if conditions else None
        with rt.autocast:
            value = diffusion.loss(train_model, x0, y=given)
        return value, value.detach()[None]

    def draw():  # 8 samples of the EMA weights, DDIM 50 steps, from fixed noise
        noise = torch.randn(8, *latent_shape, generator=torch.Generator().manual_seed(0)).to(rt.device)
        with torch.no_grad(), rt.autocast:
            for _, _, x0 in diffusion.sample_steps(ema.module, noise, sampler="ddim", steps=50):
                pass
            return vqvae.decode(x0 / latent_scale).float(), 8

    def after_step(step, taken):
        nonlocal stopped_at
        if stopped_at is not None:
            drop_snapshots_after(run, stopped_at, keep_last=stopped_at % args.posthoc_ema == 0
                                 or stopped_at % args.save_every == 0)
            stopped_at = None
        if taken:
            ema.update(model)
        if posthoc:
            posthoc.update(model, step)
        if args.posthoc_ema and step % args.posthoc_ema == 0:  # every rank decides: the profiles are rank 0's alone
            if any_rank(posthoc is not None and not posthoc.finite(), rt):
                raise BadInputError(f"the post-hoc EMA became NaN/inf by step {step}: stopped without writing its "
                                    "snapshot; try a lower --lr, or --skip-nonfinite to skip such steps")
            if posthoc:
                posthoc.snapshot(run)

    def payload():
        return {"kind": "unet", "ema": ema.module.state_dict(), "ema_updates": ema.updates,
                "posthoc_ema": posthoc.state_dict() if posthoc else None,
                "config": asdict(cfg), "diffusion": diffusion.config(), "latent_scale": latent_scale,
                "latent_absmax": latent_absmax, "latent_shape": list(latent_shape), "vqvae_fingerprint": vq_fingerprint,
                "classes": classes, "conditions": to_saved(conditions), "labels": table.record() if table else None}

    conditioning = (f"conditional on {', '.join(c.name for c in conditions)}, each dropped with p={args.label_dropout}"
                    if conditions else "unconditional")
    start_stage(args, rt, "unet", f"UNet {sum(p.numel() for p in model.parameters()) / 1e6:.2f}M params ({conditioning}) "
                f"on latents {tuple(latents.shape[1:])}, {len(latents)} latents, scale {latent_scale:.4f}, steps {step} -> "
                f"{max_steps} of {args.batch_size * args.grad_accum * rt.world} latents ({rt.world} process(es)) on {rt.device}, {rt.precision}")
    train_loop(Stage("unet", model, train_model, optimizer, batches=batches, loss=loss, stats=("loss",), draw=draw,
                     grid="samples", payload=payload,
                     on_save=lambda step: posthoc.snapshot(run) if posthoc else None, after_step=after_step,
                     unit="latents"),
               args, rt, step, max_steps, resume)
