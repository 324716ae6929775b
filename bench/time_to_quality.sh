#!/usr/bin/env bash
# Issue 33, part 3: time to quality at 256 px. One run of the `full` preset on a data folder, stage 1 then stage 2
# then `driver.py evaluate`, in one command sized for the device tool's 10-minute cut (the minutes per stage are
# arguments; each stage also spends about 1.5 min starting on an H200, bench/README.md). Each step writes into OUT
# as it ends, so a command cut off still returns what it finished, and OUT holds at most 8 files (what the device
# tool brings back):
#   times.txt        the seconds at which each step ended
#   log.txt          every step's output, one after the other
#   report.md, metrics.json, eval_samples.png, eval_crops.png
#                    evaluate's tables, scores, sample grid and full-resolution crops (real, reconstructed, generated)
#   finest_band.md   the finest band's SWD of reconstructions and samples, and each against real
# The run itself (checkpoints, evaluate's other images) is kept in RUN_DIR (default OUT/run; on the device machine
# put it outside $OUT, whose files come back).
#
#   bash bench/time_to_quality.sh DATA OUT [VQ_MINUTES] [UNET_MINUTES]      (default: 2.5 and 3, the 2026-11-26 run's)
#   RUN_DIR=/tmp/ttq bash bench/time_to_quality.sh /tmp/adni_ad_nc $OUT 2.5 3
#   VQ_FLAGS="--reconstruction-loss l1 ..." bash bench/time_to_quality.sh DATA OUT 3 0     # stage 1 alone, scored
#
# Stage 1 holds out 10% of subjects (evaluate's reference A and floor B). Stage 2 warms its learning rate up over 100
# steps instead of the preset's 1000, as adversarial_256.sh did, so that a short budget is not spent warming up;
# UNET_MINUTES 0 skips it, and evaluate scores the reconstructions alone.
# Environment: PRESET (`tiny` for a dry run on the CPU), VQ_FLAGS, UNET_FLAGS, EVALUATE_FLAGS (more flags for each
# step: a recipe's stage-1 flags, or small shapes for the dry run in tests/test_bench.py).
set -euo pipefail
data=$1 out=$2 vq_minutes=${3:-2.5} unet_minutes=${4:-3}
preset=${PRESET:-full}
run=${RUN_DIR:-$out/run}
mkdir -p "$out"

step() {  # NAME COMMAND...: run it, its output appended to OUT/log.txt, then note the time
    local name=$1
    shift
    echo "== $name: $*" >>"$out/log.txt"
    "$@" >>"$out/log.txt" 2>&1 || { echo "$name failed; the end of $out/log.txt:"; tail -20 "$out/log.txt"; exit 1; }
    echo "$name done at ${SECONDS} s" | tee -a "$out/times.txt"
}

# shellcheck disable=SC2086  # the flags are words
step vqvae python3 driver.py train-vqvae --run "$run" --data "$data" --preset "$preset" --holdout 0.1 \
    --max-minutes "$vq_minutes" ${VQ_FLAGS:-}
if [ "$unet_minutes" != 0 ]; then
    # shellcheck disable=SC2086
    step unet python3 driver.py train-unet --run "$run" --max-minutes "$unet_minutes" --warmup 100 ${UNET_FLAGS:-}
fi
# shellcheck disable=SC2086
step evaluate python3 driver.py evaluate --run "$run" --out "$run/eval" ${EVALUATE_FLAGS:-}
for name in report.md metrics.json eval_samples.png eval_crops.png; do
    if [ -e "$run/eval/$name" ]; then cp "$run/eval/$name" "$out/"; fi
done

python3 - "$out" <<'EOF' | tee "$out/finest_band.md"
import json, sys
from pathlib import Path

out = Path(sys.argv[1])
metrics = json.loads((out / "metrics.json").read_text())
levels = metrics["swd_per_level"]
finest = max(next(iter(levels.values())), key=int)
real = levels["real (training)"][finest]
print(f"finest band ({finest} px), SWD x1e3 against the held-out reference; "
      f"stage 1 at step {metrics['vqvae_step']}\n")
print("| images | finest band | against real (training) |\n|---|---|---|")
for name, per_level in levels.items():
    print(f"| {name} | {per_level[finest]:.1f} | {per_level[finest] / real:.2f}x |")
EOF
