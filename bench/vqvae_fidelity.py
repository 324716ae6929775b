"""VQ-VAE fidelity on held-out subjects: PSNR, SSIM (torchmetrics) and codebook use.

    python bench/vqvae_fidelity.py --run RUN [--data PATH]

Uses the run's own subject split (train-vqvae --holdout F --holdout-seed S); with --holdout 0 at training
time nothing was held out and the numbers are on training images (the script says so).
"""
import argparse
import json
import sys
from pathlib import Path

import torch
from torch.utils.data import DataLoader, Subset
from torchmetrics.image import PeakSignalNoiseRatio, StructuralSimilarityIndexMeasure

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from dataset import load_slices, split_by_subject  # noqa: E402
from modules import VQVAE, VQVAEConfig  # noqa: E402
from train import load_checkpoint  # noqa: E402


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run", required=True, help="run folder with vqvae.pt")
    parser.add_argument("--data", default=None, help="image folder (default: the one the run was trained on)")
    args = parser.parse_args()

    ckpt = load_checkpoint(Path(args.run) / "vqvae.pt", "vqvae")
    train_args = ckpt["args"]
    model = VQVAE(VQVAEConfig(**ckpt["config"])).eval()
    model.load_state_dict(ckpt["model"])
    dataset = load_slices(args.data or ckpt["data"], train_args["image_size"], train_args["channels"])
    holdout = train_args.get("holdout", 0.0)
    if holdout > 0:
        _, held = split_by_subject([p for p, _ in dataset.samples], holdout, train_args.get("holdout_seed", 0))
        dataset, which = Subset(dataset, held), f"{len(held)} held-out images"
    else:
        which = f"{len(dataset)} TRAINING images (the run held nothing out)"

    psnr = PeakSignalNoiseRatio(data_range=2.0)
    ssim = StructuralSimilarityIndexMeasure(data_range=2.0)
    counts = torch.zeros(model.cfg.codebook_size)
    with torch.no_grad():
        for x, _ in DataLoader(dataset, batch_size=64):
            z_q, _, idx, _ = model.quantize(model.encode(x))
            recon = model.decoder(z_q).clamp(-1, 1)
            psnr.update(recon, x)
            ssim.update(recon, x)
            counts += torch.bincount(idx.flatten(), minlength=len(counts)).float()
    p = counts / counts.sum()
    result = {"images": which, "psnr": round(psnr.compute().item(), 2), "ssim": round(ssim.compute().item(), 4),
              "codebook_used": round((counts > 0).float().mean().item(), 3),
              "perplexity": round(torch.exp(-(p * torch.log(p + 1e-10)).sum()).item(), 1),
              "step": ckpt["step"]}
    print(json.dumps(result))


if __name__ == "__main__":
    main()
