#!/usr/bin/env bash
# The raw-id GRPO row of the README's full-test table (about 100 minutes on a 2-core CPU):
# configs/nyc-raw.toml's GRPO (100 steps, G = 8, 2 prompts a step, raw-id lists) from the raw-id SFT
# warm-up of scripts/run-nyc-raw-sft.sh (run it first), its best checkpoint on the config's fixed
# val sample (64) kept, evaluated once on all 2,058 test instances, and compared, paired, with
# counter-hour and with its SFT start on the same instances.
#   OUT  run folder of the SFT warm-up (default runs/nyc-raw-sft)
#   BIN  the binary (default target/release/refine-poi, built first)
set -euo pipefail
cd "$(dirname "$0")/.."
out=${OUT:-runs/nyc-raw-sft}
if [ -z "${BIN:-}" ]; then cargo build --release --quiet; fi
bin=${BIN:-target/release/refine-poi}
for f in "$out/sft/best" "$out/test/sft-test.jsonl" "$out/test/counter-hour.jsonl"; do
  [ -e "$f" ] || { echo "missing $f: run scripts/run-nyc-raw-sft.sh first" >&2; exit 1; }
done
$bin --quantized-base grpo-train --config configs/nyc-raw.toml --set run_dir="$out" --set data.dir="$out/data"
$bin --quantized-base eval --run "$out/grpo" --split test --out "$out/test/grpo-test.json" --predictions "$out/test/grpo-test.jsonl"
$bin eval --compare "$out/test/grpo-test.jsonl" "$out/test/counter-hour.jsonl" | tee "$out/test/compare-grpo-vs-counter-hour.txt"
$bin eval --compare "$out/test/grpo-test.jsonl" "$out/test/sft-test.jsonl" | tee "$out/test/compare-grpo-vs-sft.txt"
