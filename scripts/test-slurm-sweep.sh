#!/usr/bin/env bash
# `scripts/sweep.sh --slurm` against a real single-node Slurm (scripts/slurm-local.sh): two
# variants of a short SFT warm-up of the default model on NYC are submitted; once variant `b`
# has written a checkpoint it gets `scancel --signal=USR1`, so its run checkpoints and the job
# requeues itself; both finish and are evaluated, and the report job writes a report with both.
# Checks all that and exits non-zero if anything is missing. Needs root (the daemons); several
# minutes on 2 cores. Its output is in docs/cluster.md.
#
#   scripts/test-slurm-sweep.sh [OUT]     # default OUT: /tmp/refine-poi-slurm-sweep
set -euo pipefail
cd "$(dirname "$0")/.."
out="${1:-/tmp/refine-poi-slurm-sweep}"
bash scripts/slurm-local.sh start
export SLURM_CONF="${SLURM_LOCAL_DIR:-/tmp/refine-poi-slurm}/slurm.conf"
cargo build --release --locked --quiet
bash scripts/fetch-model.sh
rm -rf "$out"
mkdir -p "$out/bin"
# The jobs run their own copy: a rebuild meanwhile does not change what they run.
cp target/release/refine-poi "$out/bin/"
bin="$out/bin/refine-poi"
data="$out/data"
"$bin" preprocess --config configs/nyc-raw.toml --set data.dir="$data" --quiet
printf 'a   --set sft.lr=1e-3\nb   --set sft.lr=2e-3\n' > "$out/variants.txt"
# 10 steps of one example each, a checkpoint every 2, evaluation on 8 val instances.
common=(--set data.dir="$data" --set sft.max_steps=10 --set sft.grad_accum=1 --set sft.warmup_steps=2
    --set sft.eval_every=0 --set sft.save_every=2)
log="$out/submit.log"
REFINE_POI="$bin" bash scripts/sweep.sh --config configs/nyc-raw.toml --variants "$out/variants.txt" --out "$out/sweep" \
    --stages sft --split val --limit 8 --slurm --cpus-per-task=1 --mem=4G -- "${common[@]}" | tee "$log"
job_a="$(sed -n 's/^== a: submitted job \([0-9]*\).*/\1/p' "$log")"
job_b="$(sed -n 's/^== b: submitted job \([0-9]*\).*/\1/p' "$log")"
[[ -n "$job_a" && -n "$job_b" ]] || { echo "FAIL: no job ids in $log" >&2; exit 1; }

wait_for() { # wait_for SECONDS WHAT COMMAND...: polls COMMAND every 2 s
    local limit="$1" what="$2"; shift 2
    for _ in $(seq $((limit / 2))); do "$@" && return 0; sleep 2; done
    echo "FAIL: timed out waiting for $what" >&2; squeue >&2; exit 1
}
steps_of() { [[ -f "$out/sweep/$1/sft/metrics.jsonl" ]] && wc -l < "$out/sweep/$1/sft/metrics.jsonl" || echo 0; }
has_checkpoint() { compgen -G "$out/sweep/b/sft/checkpoints/step-*" > /dev/null; }
wait_for 900 "a checkpoint of b" has_checkpoint
echo "== b at step $(steps_of b): scancel --signal=USR1 $job_b"
scancel --signal=USR1 "$job_b"
requeued() { scontrol show job "$job_b" | grep -q 'Restarts=1'; }
wait_for 300 "b to be requeued" requeued
# Slurm holds a requeued batch job back for about two minutes (BeginTime), while the node
# cleans up after its first run (starting it earlier fails: "Job credential revoked").
echo "== b requeued at step $(steps_of b); it starts again after $(scontrol show job "$job_b" | sed -n 's/.*EligibleTime=\([^ ]*\).*/\1/p')"
idle() { [[ -z "$(squeue -h)" ]]; }
wait_for 1800 "every job to finish" idle

fail=0
check() { if eval "$2"; then echo "ok: $1"; else echo "FAIL: $1" >&2; fail=1; fi; }
for v in a b; do
    check "$v trained to the end" "[[ -f $out/sweep/$v/sft/final/adapter_config.json ]]"
    check "$v evaluated" "[[ -f $out/sweep/$v/sft/eval/val-8.json ]]"
    check "$v logged steps 1..10 once each" "[[ \$(python3 -c 'import json,sys; print([json.loads(l)[\"step\"] for l in open(sys.argv[1])])' $out/sweep/$v/sft/metrics.jsonl) == '[1, 2, 3, 4, 5, 6, 7, 8, 9, 10]' ]]"
done
check "b stopped on SIGUSR1 with a checkpoint" "grep -q 'stopped by a signal (status 138)' $out/sweep/b.slurm.log"
check "b requeued itself and ran again" "grep -q 'requeued after status 138' $out/sweep/b.slurm.log && grep -q 'restart 1' $out/sweep/b.slurm.log"
check "b resumed from its checkpoint" "grep -q 'sft-warmup --resume' $out/sweep/b.slurm.log"
check "the report shows both" "grep -q '^| a *| sft *| sft.lr=0.001 ' $out/sweep/report/report.md && grep -q '^| b *| sft *| sft.lr=0.002 ' $out/sweep/report/report.md"
echo "--- b.slurm.log"; cat "$out/sweep/b.slurm.log"
echo "--- report.txt"; cat "$out/sweep/report/report.txt"
exit $fail
