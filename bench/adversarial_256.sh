#!/usr/bin/env bash
# Issue 15's GPU check: the `full` preset (256 px -> 4x32x32) with MSE alone against MSE + the adversarial patch
# loss, both pipelines trained at once on one GPU for the same minutes (so each gets about half of it), each
# scored by `driver.py evaluate` with one feature network: SWD per Laplacian level from 256 px down to 16,
# FID/KID, and full-resolution crops. Stage 1 is scored as soon as it is trained (OUT/ROW/stage1/report.md),
# the whole pipeline after stage 2 (OUT/ROW/report.md); UNET_MINUTES 0 stops after stage 1.
#
#   bash bench/adversarial_256.sh DATA OUT [VQ_MINUTES] [UNET_MINUTES]     (default: 8 and 15, as quality.py)
#   bash bench/adversarial_256.sh ../shared/data/adni_ad_nc runs/adv256
#   bash bench/adversarial_256.sh ../shared/data/adni_ad_nc runs/adv256 3.5 0   # stage 1 alone, scored
#
# Stage 1 holds out 10% of subjects (evaluate's reference A and floor B). Stage 2 warms its learning rate up
# over 100 steps instead of the preset's 1000, in both rows, so that a short budget is not spent warming up.
# Besides the minutes, each stage spent about 1.5 min starting on an H200 (bench/README.md).
# Environment: ADVERSARIAL (the adversarial row's stage-1 flags), PRESET (`tiny` for a quick try on a CPU).
# Both rows measure the MSE on the clamped output, the presets' default now; the two runs of this script in
# bench/README.md measured it on the raw output, before that default.
set -euo pipefail
data=$1 out=$2 vq_minutes=${3:-8} unet_minutes=${4:-15}
preset=${PRESET:-full}
adversarial=${ADVERSARIAL:-"--adversarial-weight 0.5 --adversarial-start 300"}
rows=(mse adversarial)
declare -A stage1_flags=([mse]="" [adversarial]="$adversarial")
mkdir -p "$out"

side_by_side() {  # run "$@" ROW for both rows at once, log to OUT/ROW.STAGE.log; fail if either failed
    local stage=$1 pids=() row
    shift
    for row in "${rows[@]}"; do
        "$@" "$row" >"$out/$row.$stage.log" 2>&1 &
        pids+=($!)
    done
    for pid in "${pids[@]}"; do wait "$pid"; done
}

train_vqvae() {
    # shellcheck disable=SC2086  # the row's flags are words
    python3 driver.py train-vqvae --run "$out/$1" --data "$data" --preset "$preset" --holdout 0.1 \
        --max-minutes "$vq_minutes" ${stage1_flags[$1]}
}
train_unet() { python3 driver.py train-unet --run "$out/$1" --max-minutes "$unet_minutes" --warmup 100; }

evaluate_both() {  # NAME FOLDER: evaluate both rows into OUT/ROW/FOLDER, with one feature network (the first
    local name=$1 folder=$2 row  # row's evaluate trains RUN/classifier.pt, the second row gets a copy)
    for row in "${rows[@]}"; do
        if [ "$row" != "${rows[0]}" ]; then cp "$out/${rows[0]}/classifier.pt" "$out/$row/"; fi
        python3 driver.py evaluate --run "$out/$row" --out "$out/$row/$folder" >"$out/$row.$name.log" 2>&1
    done
    echo "$name scored at ${SECONDS} s"
    for row in "${rows[@]}"; do
        echo "== $row, $name"
        grep -E "^(VQ-VAE|\| )" "$out/$row.$name.log"
    done
}

side_by_side vqvae train_vqvae
echo "stage 1 trained at ${SECONDS} s"
evaluate_both evaluate-stage1 stage1
if [ "$unet_minutes" = 0 ]; then exit 0; fi
side_by_side unet train_unet
echo "stage 2 trained at ${SECONDS} s"
evaluate_both evaluate .
