#!/usr/bin/env bash
# The main job end to end on a fresh machine, on the default model and the NYC data, with
# configs/nyc.toml's recipe (semantic POI ids): build, fetch the model, preprocess (its codebook
# is the shipped adapters'), evaluate the baselines and the untrained model, a short
# whole-history SFT warm-up, a few GRPO steps from the shipped history adapter (adapters/nyc:
# that warm-up run for 268 steps), evaluate the adapters on the same test instances, and report
# the runs side by side. Everything lands under runs/nyc-quick/. About ten minutes on a 2-core
# CPU after the build; configs/nyc.toml is the full run (hours).
set -euo pipefail
cd "$(dirname "$0")/.."
out=runs/nyc-quick
limit=${LIMIT:-64}          # test instances for the model evaluations (the same sample for every method)
sft_steps=${SFT_STEPS:-4}   # optimizer steps of the warm-up (4 history windows of up to 1,024 tokens each)
grpo_steps=${GRPO_STEPS:-4} # GRPO steps from adapters/nyc (8 prompts x 8 ranked lists of 10 codes each)

# A fresh start each time (the training commands refuse to overwrite a run that has checkpoints).
rm -rf "$out"
cargo build --release --quiet
bash scripts/fetch-model.sh
bin=target/release/refine-poi
run=(--config configs/nyc.toml --set run_dir=$out --set data.dir=$out/data --quiet)
eval=(--data $out/data --split test --quiet)

$bin preprocess "${run[@]}"
cmp $out/data/codebook.json adapters/nyc/codebook.json
for method in popularity counter markov counter-hour; do
  $bin eval "${eval[@]}" --method $method --out $out/eval/$method-test.json
  $bin eval "${eval[@]}" --method $method --limit "$limit" --out $out/eval/$method-test-$limit.json
done
# The untrained model has no tokens for the codes: it is asked for a list of raw ids.
$bin eval "${eval[@]}" --method llm --limit "$limit" --prompt-config configs/nyc-raw.toml \
  --out $out/eval/zero-shot-test-$limit.json --predictions $out/eval/zero-shot-test-$limit.jsonl
# The shipped history adapter ranks by the next code (README's headline row, on the sample).
$bin eval "${eval[@]}" --method llm --limit "$limit" --adapter adapters/nyc --prompt-config adapters/nyc/prompt.toml \
  --beam-next 20 --out $out/eval/adapters-nyc-test-$limit.json --predictions $out/eval/adapters-nyc-test-$limit.jsonl
$bin sft-warmup "${run[@]}" --set sft.max_steps=$sft_steps --set sft.eval_every=0 > /dev/null
$bin grpo-train "${run[@]}" --set grpo.init_adapter=adapters/nyc --set grpo.max_steps=$grpo_steps \
  --set grpo.prompts_per_step=8 --set grpo.eval_every=0 > /dev/null
# Each run ranks as it trained: by the next code (eval --run picks --beam-next 20 itself).
$bin eval --run $out/sft --split test --limit "$limit" --quiet
$bin eval --run $out/grpo --split test --limit "$limit" --quiet --predictions $out/grpo/eval/test-$limit.jsonl
$bin eval --compare $out/grpo/eval/test-$limit.jsonl $out/eval/adapters-nyc-test-$limit.jsonl \
  --out $out/eval/grpo-vs-adapters-nyc-test-$limit.json > /dev/null
$bin report $out/sft $out/grpo --out $out/report
echo "baseline, zero-shot and adapters/nyc reports in $out/eval/; the runs' evaluations in $out/{sft,grpo}/eval/; the comparison in $out/report/"
