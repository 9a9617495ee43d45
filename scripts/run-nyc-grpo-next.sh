#!/usr/bin/env bash
# GRPO in the next-code form on NYC (about 35 minutes on a 2-core CPU), from the shipped history
# adapter (adapters/nyc): each step samples 8 codes for each of 8 train instances' history
# prompts and rewards the target's code. Then every saved checkpoint and the starting adapter
# rank the fixed val sample by the next code (`eval --beam-next 20`), each compared, paired,
# with the start. Test is not run here: it waits for the choice made on val.
#   GRPO_STEPS, GRPO_LR, GRPO_CODES, GRPO_HIT, GRPO_RANK, GRPO_SOFT  see scripts/nyc-semantic-flags.sh
#   LIMIT  val instances (default 200)
#   RESUME=1    continue the run from its last checkpoint
set -euo pipefail
cd "$(dirname "$0")/.."
out=${OUT:-runs/nyc-grpo-next}
bin=target/release/refine-poi
resume=(); [[ "${RESUME:-0}" == 1 ]] && resume=(--resume)
TIME_TOKENS=1 source scripts/nyc-semantic-flags.sh
[[ -f $out/data/codebook.json ]] || $bin preprocess --config configs/nyc.toml --set data.dir=$out/data --quiet
cmp $out/data/codebook.json adapters/nyc/codebook.json
[[ -d $out/grpo/final ]] || $bin grpo-train "${semantic_common[@]}" "${semantic_grpo[@]}" "${resume[@]}" \
  --set data.dir=$out/data --set run_dir=$out
limit=${LIMIT:-200}
rank() {  # rank ADAPTER NAME: val sample, beam over the next code
  [[ -f $out/eval/$2-val-$limit.jsonl ]] || $bin eval --data $out/data --split val --limit "$limit" --method llm --adapter "$1" \
    --prompt-config adapters/nyc/prompt.toml --beam-next 20 --quiet --out $out/eval/$2-val-$limit.json \
    --predictions $out/eval/$2-val-$limit.jsonl
}
mkdir -p $out/eval
rank adapters/nyc start
# final/ is ranked only when no checkpoint holds the same step.
final_step=$(sed -n 's/.*"step": *\([0-9]*\).*/\1/p' $out/grpo/final/final.json)
ckpts=($out/grpo/checkpoints/step-*)
[[ -d $out/grpo/checkpoints/step-$final_step ]] || ckpts+=($out/grpo/final)
for ckpt in "${ckpts[@]}"; do
  name=grpo-$(basename $ckpt)
  rank $ckpt $name
  $bin eval --compare $out/eval/$name-val-$limit.jsonl $out/eval/start-val-$limit.jsonl --out $out/eval/$name-vs-start-val-$limit.json
done
