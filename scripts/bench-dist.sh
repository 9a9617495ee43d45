#!/usr/bin/env bash
# Data-parallel scaling on this machine: a few steps of `grpo-train` and `sft-warmup` on the
# default model and NYC (configs/nyc-raw.toml; GRPO with 4 prompts x 8 samples a step, SFT with
# 4 examples a step) with 1, 2 and 4 ranks under mpirun, oversubscribed if need be; prints the
# median seconds per step and the share of it spent summing gradients across ranks.
# Needs the binary built with `--features mpi` (built here if missing) and OpenMPI's mpirun.
#
#   scripts/bench-dist.sh [--steps 3] [--ranks "1 2 4"] [--data DIR]
set -euo pipefail
cd "$(dirname "$0")/.."
steps=3 ranks="1 2 4" data=""
while [[ $# -gt 0 ]]; do
    case "$1" in
        --steps) steps="$2"; shift 2 ;;
        --ranks) ranks="$2"; shift 2 ;;
        --data) data="$2"; shift 2 ;;
        *) sed -n '2,9p' "$0" | sed 's/^# \{0,1\}//'; exit 2 ;;
    esac
done
cargo build --release --locked --features mpi --quiet
bin="${CARGO_TARGET_DIR:-target}/release/refine-poi"
bash scripts/fetch-model.sh
tmp="$(mktemp -d)"
trap 'rm -rf "$tmp"' EXIT
if [[ -z "$data" ]]; then
    data="$tmp/data"
    "$bin" preprocess --config configs/nyc-raw.toml --set data.dir="$data" --quiet
fi
cores="$(nproc)"
echo "machine: $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | xargs), $cores cores; $(date -u +%FT%TZ)"
echo
echo "| stage | ranks | threads/rank | s/step (median of $steps) | all-reduce share |"
echo "|---|---|---|---|---|"
for stage in grpo sft; do
    for n in $ranks; do
        threads=$(( cores / n > 0 ? cores / n : 1 ))
        run="$tmp/$stage-$n"
        sets=(--config configs/nyc-raw.toml --set run_dir="$run" --set data.dir="$data" --quiet)
        if [[ $stage == grpo ]]; then
            # From a fresh adapter, with every group in the update (as if each carried signal).
            cmd=(grpo-train "${sets[@]}" --set grpo.init_adapter=none --set grpo.prompts_per_step=4 --set grpo.skip_zero_signal=false
                --set grpo.max_steps="$steps" --set grpo.eval_every=0 --set grpo.save_every=0)
        else
            cmd=(sft-warmup "${sets[@]}" --set sft.max_steps="$steps" --set sft.eval_every=0 --set sft.save_every=0)
        fi
        if [[ $n -eq 1 ]]; then
            RAYON_NUM_THREADS=$threads "$bin" "${cmd[@]}" > /dev/null
        else
            mpirun --allow-run-as-root --oversubscribe --bind-to none -np "$n" -x RAYON_NUM_THREADS=$threads \
                -x OMPI_MCA_btl_vader_single_copy_mechanism=none "$bin" "${cmd[@]}" > /dev/null
        fi
        python3 - "$run/$stage/metrics.jsonl" "$stage" "$n" "$threads" <<'PY'
import json, statistics, sys
path, stage, n, threads = sys.argv[1:]
rows = [json.loads(l) for l in open(path) if '"val"' not in l]
step = statistics.median(r["step_s"] for r in rows)
ar = statistics.median((r["time"]["allreduce"] if stage == "grpo" else r["allreduce_s"]) / r["step_s"] for r in rows)
print(f"| {stage} | {n} | {threads} | {step:.1f} | {100 * ar:.2f}% |")
PY
    done
done
