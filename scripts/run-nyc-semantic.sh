#!/usr/bin/env bash
# Semantic POI ids on NYC, in the background (hours on a 2-core CPU): whole-history SFT on codes
# (every train check-in of every user is a target), then a short list SFT on the semantic prompt
# from it, then greedy constrained evaluation on the fixed val sample (choices are made on val; test is for
# the final table), and the history stage's adapter ranking by beam search over the next code
# (`eval --beam-next`), each against counter-hour on the same instances. Everything lands under
# $OUT (default runs/nyc-semantic/).
#   HIST_STEPS  optimizer steps of the history stage, 4 windows each (0 = one epoch)
#   HIST2=1     then a second history epoch from the first's final adapter (new data order, peak
#               lr 3e-4: the first epoch's schedule ends at 1e-4) into $OUT/history2; the list
#               SFT ($OUT/list2) and the beam ranking then start from it
#   LIST_STEPS  steps of the list SFT (4 prompts each), LIMIT  val instances evaluated,
#   BEAMS       beams of the next-code ranking (at least prompt.k)
#   TIME_TOKENS=1  check-in times as weekday and hour tokens (prompt.time_tokens): 2.3x fewer
#               history tokens on NYC (528k against 1.22M an epoch)
#   RESUME=1    continue unfinished stages from their last checkpoints (a stage with a final/
#               adapter is skipped, with or without it)
set -euo pipefail
cd "$(dirname "$0")/.."
out=${OUT:-runs/nyc-semantic}
bin=target/release/refine-poi
resume=(); [[ "${RESUME:-0}" == 1 ]] && resume=(--resume)
source scripts/nyc-semantic-flags.sh
common=("${semantic_common[@]}" --set data.dir=$out/data)
history=("${semantic_history[@]}")

[[ -f $out/data/codebook.json ]] || $bin preprocess --config configs/nyc.toml --set data.dir=$out/data --quiet
[[ -d $out/history/sft/final ]] || $bin sft-warmup "${common[@]}" "${resume[@]}" "${history[@]}" --set run_dir=$out/history
hist=$out/history list=$out/list
if [[ "${HIST2:-0}" == 1 ]]; then
  [[ -d $out/history2/sft/final ]] || $bin sft-warmup "${common[@]}" "${resume[@]}" "${history[@]}" --set run_dir=$out/history2 \
    --set model.adapter=$out/history/sft/final "${semantic_epoch2[@]}"
  hist=$out/history2 list=$out/list2
fi
[[ -d $list/sft/final ]] || $bin sft-warmup "${common[@]}" "${resume[@]}" --set run_dir=$list --set model.adapter=$hist/sft/final \
  --set sft.examples=prompts --set sft.warmup_steps=4 --set sft.save_every=8 --set sft.max_steps="${LIST_STEPS:-48}" --set sft.eval_every=0
limit=${LIMIT:-200}
$bin eval --run $list/sft --split val --limit "$limit" --max-new-tokens 40 --constrained --quiet \
  --predictions $list/sft/eval/val-$limit.jsonl
$bin eval --data $out/data --split val --method counter-hour --limit "$limit" --quiet \
  --out $out/eval/counter-hour-val-$limit.json --predictions $out/eval/counter-hour-val-$limit.jsonl
$bin eval --compare $list/sft/eval/val-$limit.jsonl $out/eval/counter-hour-val-$limit.jsonl \
  --out $out/eval/$(basename $hist)-list-vs-counter-hour-val-$limit.json
$bin eval --run $hist/sft --split val --limit "$limit" --beam-next "${BEAMS:-20}" --quiet \
  --out $hist/sft/eval/val-$limit-beam.json --predictions $hist/sft/eval/val-$limit-beam.jsonl
$bin eval --compare $hist/sft/eval/val-$limit-beam.jsonl $out/eval/counter-hour-val-$limit.jsonl \
  --out $out/eval/$(basename $hist)-beam-vs-counter-hour-val-$limit.json
