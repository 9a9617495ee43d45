#!/usr/bin/env bash
# Gowalla-CA end to end with configs/gowalla-ca.toml as shipped: preprocess, the baselines and
# the learned ranker, the SFT warm-up, GRPO, and every method on the full val and test splits
# (about 200 and 175 instances) with paired comparisons against counter-hour. Everything lands in
# runs/gowalla-ca/; about 50 minutes on 2 cores after the build. The numbers are in docs/results.md.
set -euo pipefail
cd "$(dirname "$0")/.."
cfg=configs/gowalla-ca.toml
out=runs/gowalla-ca
rm -rf "$out"
cargo build --release --quiet
bash scripts/fetch-model.sh
bin=target/release/refine-poi

$bin preprocess --config $cfg --quiet
mkdir -p $out/eval
for split in val test; do
  for method in popularity counter markov counter-hour; do
    $bin eval --data $out/data --split $split --method $method --out $out/eval/$method-$split.json \
      --predictions $out/eval/$method-$split.jsonl --quiet > /dev/null
  done
  $bin eval --data $out/data --split $split --method ranker --ranker-config $cfg --out $out/eval/ranker-$split.json \
    --predictions $out/eval/ranker-$split.jsonl --quiet > /dev/null
done
$bin sft-warmup --config $cfg --quiet > $out/sft.log
$bin grpo-train --config $cfg --quiet > $out/grpo.log
for stage in sft grpo; do
  for split in val test; do
    $bin eval --run $out/$stage --split $split --out $out/eval/$stage-$split.json \
      --predictions $out/eval/$stage-$split.jsonl --quiet > /dev/null
  done
done
for split in val test; do
  for method in ranker sft grpo; do
    echo "== $split: $method vs counter-hour"
    $bin eval --compare $out/eval/$method-$split.jsonl $out/eval/counter-hour-$split.jsonl
  done
  $bin prompt-stats --data $out/data --split $split --prompt-config $cfg
done
