"""Are the samples' fine-detail errors the quantiser's? A quality.py row's samples (the sampling of `driver.py sample`,
one seed) decoded as always, through the quantiser, and by the decoder straight from the sampled z (CompVis' LDM
calls this `force_not_quantize`); the held-out floor images' reconstructions both ways; and how near the sampled and
the encoded z lie to their nearest code (the ratio of the nearest code's distance to the second's: near 1, a tie that
the quantiser settles either way).

    python bench/decode_unquantised.py --out runs/q34 --row ours [--seed 1]

OUT is a finished `bench/quality.py --out` folder: its feature network and held-out split are reused, and seed 1
draws the same samples as quality.py's row. Prints a table; writes OUT/decode_unquantised_ROW_seedSEED.json.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import driver  # noqa: E402
import predict  # noqa: E402
from evaluation.evaluate import feature_network, score_rows, stack  # noqa: E402
from evaluation.report import format_level_table, format_table  # noqa: E402
from quality import held_out_split, layout_version  # noqa: E402
from runtime.models import load_run  # noqa: E402


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_row_arguments(parser)
    args = parser.parse_args()
    out, run = Path(args.out), Path(args.out) / args.row
    reference, floor, features, model, sampling = load_row(args)
    samples, sampled = samples_and_latents(model, sampling, len(floor), args.seed)
    decode = predict.decode
    vq = model.vqvae
    with torch.no_grad():
        scale = model.latent_scale
        encoded = torch.cat([vq.encode(x) for x in floor.split(64)]) * scale   # scaled, as the sampler's
        rows = {"samples, quantised": samples,
                "samples, not quantised": decode(vq, sampled, scale, quantise=False),
                "reconstructions, quantised": decode(vq, encoded, scale),
                "reconstructions, not quantised": decode(vq, encoded, scale, quantise=False)}
        ties = {"sampled z": nearest_codes(vq, sampled / scale), "encoded z (floor images)": nearest_codes(vq, encoded / scale)}
    scores = score_rows(rows, reference, features, "cpu")
    print(f"{format_table(scores)}\n\nSWD x1e3 per Laplacian level:\n\n{format_level_table(scores)}\n")
    for name, t in ties.items():
        print(f"{name}: nearest code at {t['nearest_distance_median']:.4f} (median), nearest/second "
              f"{t['ratio_median']:.3f} (median), above 0.9 for {t['ratio_above_0.9']:.1%} of positions")
    record = {"run": str(run), "seed": args.seed, "sampler": sampling.sampler, "steps": sampling.steps,
              "scores": scores, "nearest_codes": ties}
    (out / f"decode_unquantised_{args.row}_seed{args.seed}.json").write_text(json.dumps(record, indent=2))


def add_row_arguments(parser: argparse.ArgumentParser):
    """A finished quality.py row and a sampling seed: the flags this script and detail_loss.py share."""
    parser.add_argument("--out", required=True, help="a finished bench/quality.py --out folder")
    parser.add_argument("--data", default="../shared/data/adni_ad_nc", help="quality.py's --data (default: %(default)s)")
    parser.add_argument("--holdout", type=float, default=0.1, help="quality.py's --holdout (default: %(default)s)")
    parser.add_argument("--row", default="ours", help="the row (run folder OUT/ROW) to sample (default: %(default)s)")
    parser.add_argument("--seed", type=int, default=1, help="sampling seed; quality.py samples `ours` with 1")


def load_row(args, sample_flags: tuple[str, ...] | list[str] = ()) -> tuple:
    """quality.py's reference half A, floor half B and feature network; the row's run and `driver.py sample`'s sampling
    (with `sample_flags`)."""
    out, run = Path(args.out), Path(args.out) / args.row
    dataset, (train_idx, ref_idx, floor_idx), key = held_out_split(args.data, args.holdout, layout_version([run]))
    reference, _ = stack(dataset, ref_idx)
    floor, _ = stack(dataset, floor_idx)
    features = feature_network(out, dataset, train_idx, key, "cpu")
    model = load_run(run, "cpu")
    sampling = predict.sampling_from_args(driver.parse(["sample", "--run", str(run), *sample_flags]), model)
    return reference, floor, features, model, sampling


def samples_and_latents(model, sampling, num: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """`num` samples drawn as `driver.py sample --seed` draws them, and the scaled latents they were decoded from."""
    latents, decode = [], predict.decode   # the sampled latents, as sample_batches hands them to the decoder

    def keeping_latents(vqvae, z, scale, batch_size=64, quantise=True):
        latents.append(z.clone())
        return decode(vqvae, z, scale, batch_size, quantise)

    predict.decode = keeping_latents
    try:
        torch.manual_seed(seed)
        samples = predict.generate(model, sampling, num)[0]
    finally:
        predict.decode = decode
    return samples, torch.cat(latents)


def nearest_codes(vq, z: torch.Tensor) -> dict:
    """The distance of each latent position to its nearest code, and to the second nearest."""
    flat = z.permute(0, 2, 3, 1).reshape(-1, z.shape[1]).float()
    two = torch.cdist(flat, vq.quantizer.codebook.float()).topk(2, largest=False).values
    ratio = two[:, 0] / two[:, 1]
    return {"nearest_distance_median": two[:, 0].median().item(), "ratio_median": ratio.median().item(),
            "ratio_above_0.9": (ratio > 0.9).float().mean().item()}


if __name__ == "__main__":
    main()
