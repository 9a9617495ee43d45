#!/usr/bin/env bash
# The main job end to end on a fresh machine, on the default model and the NYC data: build,
# fetch the model, preprocess, evaluate the baselines and the zero-shot model, a short LoRA SFT
# warm-up, a few GRPO steps from it, evaluate both adapters on the same test instances, and
# report the runs side by side. Everything lands under runs/nyc-quick/. Minutes on a 2-core CPU
# after the build; configs/nyc.toml is the longer run.
set -euo pipefail
cd "$(dirname "$0")/.."
out=runs/nyc-quick
limit=${LIMIT:-64}         # test instances for the model evaluations (the same sample for every method)
sft_steps=${SFT_STEPS:-4}  # optimizer steps of the warm-up (4 examples each)
grpo_steps=${GRPO_STEPS:-4} # GRPO steps (2 prompts x 8 samples each)

# A fresh start each time (the training commands refuse to overwrite a run that has checkpoints).
rm -rf "$out"
cargo build --release --quiet
bash scripts/fetch-model.sh
bin=target/release/refine-poi
run=(--config configs/nyc.toml --set run_dir=$out --set data.dir=$out/data --quiet)

$bin preprocess "${run[@]}"
for method in popularity counter markov counter-hour; do
  $bin eval --data $out/data --split test --method $method --out $out/eval/$method-test.json --quiet
  $bin eval --data $out/data --split test --method $method --limit "$limit" --out $out/eval/$method-test-$limit.json --quiet
done
$bin eval --data $out/data --split test --method llm --limit "$limit" --prompt-config configs/nyc.toml \
  --out $out/eval/zero-shot-test-$limit.json --predictions $out/eval/zero-shot-test-$limit.jsonl --quiet
$bin sft-warmup "${run[@]}" --set sft.max_steps=$sft_steps --set sft.eval_every=0 > /dev/null
$bin grpo-train "${run[@]}" --set grpo.max_steps=$grpo_steps --set grpo.eval_every=0 > /dev/null
$bin eval --run $out/sft --split test --limit "$limit" --quiet
$bin eval --run $out/grpo --split test --limit "$limit" --quiet
$bin report $out/sft $out/grpo --out $out/report
echo "baseline and zero-shot reports in $out/eval/; the runs' evaluations in $out/{sft,grpo}/eval/; the comparison in $out/report/"
