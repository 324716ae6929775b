"""Where a decoder's held-out PSNR goes: quality.py rows with the same stage 1 and other decoders (`train-decoder`),
each row's reconstructions of the floor half against the first row's, band by band.

    python bench/decoder_bands.py --out runs/s1gan_seed0 --rows ours,ours-dec10

For each row: PSNR, the error's energy in each Laplacian band (the metric's pyramid, finest first), and against the
first row A, for a row B of the same codes: the energy of what B's decoder changed, ||B - A||², and its part along
A's error, 2<B - A, A - x>; MSE(B) = MSE(A) + both, exactly. Were A the conditional mean E[x | code] (the decoder that
MSE training seeks), the second would be 0 on average and any change would cost its whole energy in MSE: the
perception-distortion trade-off (Blau and Michaeli 2018) for one latent. Then B's finest band on A's coarser ones:
how much PSNR a decoder keeps that changes the finest band alone. Prints a table; writes OUT/decoder_bands.json.
"""
from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from evaluation.evaluate import stack  # noqa: E402
from evaluation.metrics import reconstruction_metrics, sliced_wasserstein  # noqa: E402
from losses.reconstruction import laplacian_pyramid  # noqa: E402
from quality import held_out_split, layout_version  # noqa: E402
from runtime.checkpoint import fingerprint, load_checkpoint  # noqa: E402
from runtime.models import load_vqvae  # noqa: E402


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True, help="a bench/quality.py --out folder")
    parser.add_argument("--rows", required=True, help="ROW,ROW[,...]: run folders OUT/ROW of one stage 1, the first A")
    parser.add_argument("--data", default="../shared/data/adni_ad_nc",
                        help="quality.py's --data (default: %(default)s)")
    parser.add_argument("--holdout", type=float, default=0.1, help="quality.py's --holdout (default: %(default)s)")
    args = parser.parse_args()
    out, rows = Path(args.out), args.rows.split(",")
    stage1 = {fingerprint(load_checkpoint(out / row / "vqvae.pt", "vqvae")["model"]) for row in rows}
    if len(stage1) > 1:  # the decomposition compares decoders of the same codes
        raise SystemExit(f"error: the rows {', '.join(rows)} hold {len(stage1)} different stage 1s; give rows of one")
    version = layout_version([out / r for r in rows])
    dataset, (_, ref_idx, floor_idx), _ = held_out_split(args.data, args.holdout, version)
    reference, _ = stack(dataset, ref_idx)
    floor, _ = stack(dataset, floor_idx)
    recons = {}
    for row in rows:
        with torch.no_grad():
            recons[row] = reconstruction_metrics(load_vqvae(out / row, "cpu")[0], floor)[1]
    a = recons[rows[0]]
    record = {row: compare(a, b, floor, reference) for row, b in recons.items()}
    print("| row | PSNR | error energy per band x1e4, finest first | ||B-A||² x1e4 | 2<B-A, A-x> x1e4 "
          "| B's finest band on A: PSNR, finest band |\n|---|---|---|---|---|---|")
    for row, r in record.items():
        bands = ", ".join(f"{e:.2f}" for e in r["error_energy_per_band"])
        print(f"| {row} | {r['psnr']:.3f} | {bands} | {r['change_energy']:.2f} | {r['change_along_error']:.2f} "
              f"| {r['finest_band_on_a']['psnr']:.3f}, {r['finest_band_on_a']['swd_finest']:.2f} |")
    (out / "decoder_bands.json").write_text(json.dumps({"rows": rows, "data": args.data, "scores": record}, indent=2))


def compare(a: torch.Tensor, b: torch.Tensor, x: torch.Tensor, reference: torch.Tensor) -> dict:
    """B's reconstructions of x against A's (all clamped as shown), energies as mean squares x1e4."""
    psnr = lambda r: 10 * math.log10(4 / (r - x).pow(2).mean().item())  # noqa: E731  (data range 2: [-1, 1])
    mix = (a - laplacian_pyramid(a)[0] + laplacian_pyramid(b)[0]).clamp(-1, 1)
    return {"psnr": psnr(b),
            "error_energy_per_band": [level.pow(2).mean().item() * 1e4 for level in laplacian_pyramid(b - x)],
            "change_energy": (b - a).pow(2).mean().item() * 1e4,
            "change_along_error": 2 * ((b - a) * (a - x)).mean().item() * 1e4,
            "finest_band_on_a": {"psnr": psnr(mix),
                                 "swd_finest": sliced_wasserstein(mix, reference)[f"swd_{x.shape[-1]}"]}}


if __name__ == "__main__":
    main()
