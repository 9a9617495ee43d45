#!/usr/bin/env bash
# The main job end to end on a fresh machine, on the default model and the NYC data:
# build, fetch the model, preprocess, evaluate the baselines and the model on the test split.
# Everything lands under runs/nyc/. Takes a few minutes on a 2-core CPU (most of it the build).
set -euo pipefail
cd "$(dirname "$0")/.."
out=runs/nyc
limit=${LIMIT:-64}   # instances for the LLM evaluation (the same sample for every method)

cargo build --release --quiet
bash scripts/fetch-model.sh
bin=target/release/refine-poi

$bin preprocess --format csv --input data/nyc/checkins.csv.gz --out $out/data --quiet
for method in popularity counter markov; do
  $bin eval --data $out/data --split test --method $method --out $out/eval/$method-test.json --quiet
done
# The same sample of instances for the counter and the model, so the two compare directly.
$bin eval --data $out/data --split test --method counter --limit "$limit" --out $out/eval/counter-test-$limit.json --quiet
$bin eval --data $out/data --split test --method llm --limit "$limit" \
  --out $out/eval/zero-shot-test-$limit.json --predictions $out/eval/zero-shot-test-$limit.jsonl --quiet
echo "reports and predictions in $out/eval/"
