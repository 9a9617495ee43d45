#!/usr/bin/env bash
# The main job end to end on a fresh machine, on the default model and the NYC data: build,
# fetch the model, preprocess, evaluate the baselines, the zero-shot model, a short LoRA SFT
# warm-up, and the warmed-up model, all on the same test instances. Everything lands under
# runs/nyc-quick/. A few minutes on a 2-core CPU after the build; configs/nyc.toml is the longer run.
set -euo pipefail
cd "$(dirname "$0")/.."
out=runs/nyc-quick
limit=${LIMIT:-64}        # test instances for the model evaluations (the same sample for every method)
sft_steps=${SFT_STEPS:-4} # optimizer steps of the warm-up (4 examples each)

cargo build --release --quiet
bash scripts/fetch-model.sh
bin=target/release/refine-poi

$bin preprocess --format csv --input data/nyc/checkins.csv.gz --out $out/data --quiet
for method in popularity counter markov; do
  $bin eval --data $out/data --split test --method $method --out $out/eval/$method-test.json --quiet
  $bin eval --data $out/data --split test --method $method --limit "$limit" --out $out/eval/$method-test-$limit.json --quiet
done
$bin eval --data $out/data --split test --method llm --limit "$limit" \
  --out $out/eval/zero-shot-test-$limit.json --predictions $out/eval/zero-shot-test-$limit.jsonl --quiet
$bin sft-warmup --config configs/nyc.toml --quiet \
  --set run_dir=$out --set data.dir=$out/data --set sft.max_steps=$sft_steps --set sft.eval_every=0
$bin eval --data $out/data --split test --method llm --limit "$limit" --adapter $out/sft/final \
  --out $out/eval/sft-test-$limit.json --predictions $out/eval/sft-test-$limit.jsonl --quiet
echo "reports and predictions in $out/eval/"
