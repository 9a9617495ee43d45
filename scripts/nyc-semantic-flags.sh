# The settings of the semantic NYC runs, in one place: sourced by run-nyc-semantic.sh (on the CPU)
# and by device-check.sh run --semantic (on a GPU), so that both train the same thing.
#   semantic_common   the prompt: semantic ids, no categories (the codes' second level carries
#                     them); with TIME_TOKENS=1, check-in times as weekday and hour tokens
#   semantic_history  the whole-history SFT stage: every train check-in of every user is a
#                     target, windows of 1,024 tokens, 4 windows a step, one epoch (or HIST_STEPS)
#   semantic_epoch2   what a second history epoch changes: a new data order and peak lr 3e-4
#                     (the first epoch's schedule ends at 1e-4); add model.adapter=<first>/sft/final
time_tokens=false; [[ "${TIME_TOKENS:-0}" == 1 ]] && time_tokens=true
semantic_common=(--config configs/nyc.toml --set prompt.ids=semantic --set prompt.categories=false
  --set prompt.time_tokens=$time_tokens --quiet)
semantic_history=(--set sft.examples=histories --set data.train_instances=0 --set sft.history_tokens=1024
  --set sft.batch_size=1 --set sft.grad_accum=4 --set sft.max_steps="${HIST_STEPS:-0}" --set sft.epochs=1
  --set sft.warmup_steps=10 --set sft.eval_every=0 --set sft.save_every=10)
semantic_epoch2=(--set sft.seed=1 --set sft.lr=3e-4)
#   semantic_grpo     GRPO in the next-code form from the shipped history adapter: GRPO_PROMPTS
#                     prompts a step (default 8, a checkpoint every GRPO_SAVE_EVERY steps, default 20),
#                     8 samples each of GRPO_CODES distinct codes (default 1), reward = GRPO_HIT x hit
#                     + GRPO_RANK x 1/rank + GRPO_SOFT x soft accuracy (the list-only terms off), no KL
#                     term, lr GRPO_LR, exact gradients through the whole prompt, GRPO_STEPS steps.
#                     Defaults: the second run (one code, hit only, lr 3e-5, 60 steps); the first was
#                     GRPO_SOFT=0.5 GRPO_LR=1e-4 GRPO_STEPS=100, the third (ranked lists)
#                     GRPO_CODES=10 GRPO_HIT=0 GRPO_RANK=1 GRPO_LR=5e-5 (docs/results.md)
semantic_grpo=(--set grpo.form=next --set grpo.init_adapter=adapters/nyc --set grpo.temperature=1 --set grpo.group=8
  --set grpo.codes_per_sample="${GRPO_CODES:-1}"
  --set grpo.prompts_per_step="${GRPO_PROMPTS:-8}" --set grpo.beta=0 --set grpo.lr="${GRPO_LR:-3e-5}" --set grpo.max_steps="${GRPO_STEPS:-60}"
  --set grpo.eval_every=0 --set grpo.save_every="${GRPO_SAVE_EVERY:-20}" --set grpo.keep_checkpoints=5 --set data.train_instances=0
  --set rewards.weights.format=0 --set rewards.weights.length=0 --set rewards.weights.diversity=0
  --set rewards.weights.rank="${GRPO_RANK:-0}" --set rewards.weights.hit="${GRPO_HIT:-1}"
  --set rewards.weights.soft_accuracy="${GRPO_SOFT:-0}")
