#!/usr/bin/env bash
# The raw-id list SFT row of the README's full-test table (about 70 minutes on a 2-core CPU):
# configs/nyc-raw.toml's raw-id prompt, a 64-step list warm-up whose best checkpoint on the config's
# fixed val sample (64) is kept, evaluated once on all 2,058 test instances, and compared, paired,
# with counter-hour on the same instances.
#   OUT  run folder (default runs/nyc-raw-sft)
set -euo pipefail
cd "$(dirname "$0")/.."
out=${OUT:-runs/nyc-raw-sft}
bin=target/release/refine-poi
cargo build --release --quiet
mkdir -p "$out/test"
$bin preprocess --config configs/nyc-raw.toml --set data.dir="$out/data"
$bin sft-warmup --config configs/nyc-raw.toml --set run_dir="$out" --set data.dir="$out/data" --set sft.max_steps=64
$bin --quantized-base eval --run "$out/sft" --split test --out "$out/test/sft-test.json" --predictions "$out/test/sft-test.jsonl"
$bin eval --data "$out/data" --split test --method counter-hour --out "$out/test/counter-hour.json" --predictions "$out/test/counter-hour.jsonl"
$bin eval --compare "$out/test/sft-test.jsonl" "$out/test/counter-hour.jsonl" | tee "$out/test/compare-sft-vs-counter-hour.txt"
