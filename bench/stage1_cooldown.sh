#!/usr/bin/env bash
# Stage 1 with a constant learning rate against --cooldown 0.2 (a linear fall to zero over the last 20% of the run),
# two runs at a time (one thread each on a CPU), per seed; then each VQ-VAE scored alone by `driver.py evaluate`
# (held-out PSNR, SWD per Laplacian level of its reconstructions; one domain classifier shared by all runs).
#
#   bash bench/stage1_cooldown.sh DATA OUT [SEED ...]                      (default: seeds 0 and 1; tiny, 1000 steps)
#   bash bench/stage1_cooldown.sh ../shared/data/adni_ad_nc runs/cooldown 0 1
#   PRESET=full MINUTES=1.75 bash bench/stage1_cooldown.sh ../shared/data/adni_ad_nc runs/cooldown_gpu 0   # a GPU
#
# Environment: PRESET (tiny), STEPS (1000), MINUTES (a wall-clock budget per run instead of STEPS; the cooldown
# then ends where the minutes run out). Both rows use the preset's stage-1 loss: on the clamped output now,
# on the raw output in this script's runs in bench/README.md, before that default.
set -euo pipefail
data=$1 out=$2
shift 2
seeds=("$@")
if [ ${#seeds[@]} = 0 ]; then seeds=(0 1); fi
budget=(--max-steps "${STEPS:-1000}")
if [ -n "${MINUTES:-}" ]; then budget=(--max-steps 1000000000 --max-minutes "$MINUTES"); fi
mkdir -p "$out"

train() {  # NAME SEED COOLDOWN
    OMP_NUM_THREADS=1 python3 driver.py train-vqvae --run "$out/$1" --data "$data" --preset "${PRESET:-tiny}" \
        --holdout 0.1 --seed "$2" --cooldown "$3" "${budget[@]}" >"$out/$1.train.log" 2>&1
}

for seed in "${seeds[@]}"; do
    train "constant$seed" "$seed" 0 &
    train "cooldown$seed" "$seed" 0.2 &
    wait
done
for seed in "${seeds[@]}"; do
    for name in "constant$seed" "cooldown$seed"; do
        first="$out/constant${seeds[0]}"
        if [ "$out/$name" != "$first" ]; then cp "$first/classifier.pt" "$out/$name/"; fi
        python3 driver.py evaluate --run "$out/$name" --out "$out/$name/stage1" >"$out/$name.evaluate.log" 2>&1
        echo "== $name"
        grep -E "^(VQ-VAE|\| reconstructions)" "$out/$name.evaluate.log"
    done
done
