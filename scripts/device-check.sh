#!/usr/bin/env bash
# The prepared check for a bare GPU machine: no Rust toolchain, no network, files carried in
# pieces of at most 64 MiB a call (the lent H200 machines). Two halves:
#
#   scripts/device-check.sh pack [--binary PATH] [--model PATH] [--codebook FILE] [--piece-mib 40]
#       Here, after scripts/build-cuda.sh: packs the CUDA binary (stripped), the default model
#       and, with --codebook, the codebook.json of NYC preprocessed here into .device/
#       (git-ignored) as parts of --piece-mib each, with their checksums, and prints the calls
#       that carry them over, one part a call, the last one running the check.
#
#   scripts/device-check.sh unpack DIR
#       Joins and verifies the parts into DIR (refine-poi, models/): what `run` does first.
#
#   scripts/device-check.sh run [--device cuda|cpu] [--small] [--out DIR] [--binary PATH] [--model PATH]
#       There (or here, as a dry run with --device cpu): joins and checks the parts when
#       .device/ holds them, finds the CUDA libraries the binary needs, and runs, each bounded in
#       time, with everything written to DIR (default: $OUT/device-check, else runs/device-check):
#         1. selfcheck in f32 and in bf16: the default model's logits against the golden values
#            of tests/fixtures/reference, LoRA gradients against finite differences (f64) and
#            against the CPU in f32;
#         2. bench: prefill, decoding at batch 1 and 64, the GEMM rate at the model's shapes;
#         3. bench --grpo: one GRPO step of 8 prompts at G = 8 and at G = 16;
#         4. preprocess NYC (data/nyc, shipped), a 32-step SFT warm-up (the answer format: from
#            a fresh adapter every answer is invalid and GRPO has no signal), then 20 GRPO steps
#            from it, with a greedy validation of 32 instances at the end.
#       --small shrinks 2-4 for a CPU (batch 8, one prompt at G = 4, 2 steps of each stage): the
#       dry run. DIR ends with at most 8 files (what a device call brings back): log.txt,
#       summary.txt, selfcheck-f32.json, selfcheck-bf16.json, bench.json, bench-grpo-g8.json,
#       bench-grpo-g16.json, train-metrics.jsonl (both stages, each line with its "stage").
#       Exit status: 0 when every step passed.
#
#   scripts/device-check.sh run --semantic [--epochs 2] [--deadline 520] [--codebook FILE] ...
#       Training on the GPU instead of steps 2-4: NYC preprocessed there, with the codebook
#       packed by pack --codebook in place of the one made there (the adapter's codes must be
#       those of the machine that evaluates it; the log says whether they differed), then the
#       selfcheck in f32, then
#       whole-history SFT epochs (scripts/nyc-semantic-flags.sh, time tokens on; epoch 2 from
#       epoch 1's adapter), each adapter tarred into DIR as history1.tar, history2.tar, then
#       while time is left bench, each finished epoch ranked on the val split (eval --beam-next
#       20; eval.tar) and the bf16 selfcheck; the summary goes to log.txt only. The epochs take what is left of
#       --deadline seconds (counted from the start), the first first; an epoch cut short leaves its
#       newest checkpoint's adapter instead, and no later epoch runs.
set -uo pipefail
cd "$(dirname "$0")/.."
mode="${1:-}"
shift || true
stash="$(realpath -m "${DEVICE_STASH:-.device}")"  # where the parts are (tests set another folder)

pack() {
    local binary=target/cuda-sm90-cuda13/release/refine-poi piece=40 model=models/SmolLM2-135M-Instruct.Q4_1.gguf codebook=""
    while [[ $# -gt 0 ]]; do
        case "$1" in
            --binary) binary="$2"; shift 2 ;;
            --codebook) codebook="$2"; shift 2 ;;
            --model) model="$2"; shift 2 ;;
            --piece-mib) piece="$2"; shift 2 ;;
            *) echo "device-check.sh pack: unknown argument $1" >&2; exit 2 ;;
        esac
    done
    [[ -x "$binary" ]] || { echo "device-check.sh: no binary at $binary (build it with scripts/build-cuda.sh --compute-cap 90 --runtime 13)" >&2; exit 1; }
    [[ -f "$model" ]] || { echo "device-check.sh: no model at $model (scripts/fetch-model.sh)" >&2; exit 1; }
    rm -rf "$stash" && mkdir -p "$stash/bundle/models"
    strip -o "$stash/bundle/refine-poi" "$binary"
    cp "$model" "$stash/bundle/models/SmolLM2-135M-Instruct.Q4_1.gguf"
    local members=(refine-poi models) check="run --device cuda"
    if [[ -n "$codebook" ]]; then
        [[ -f "$codebook" ]] || { echo "device-check.sh: no codebook at $codebook (refine-poi preprocess writes one)" >&2; exit 1; }
        cp "$codebook" "$stash/bundle/codebook.json"
        members+=(codebook.json) check="run --device cuda --semantic"
    fi
    tar -C "$stash/bundle" -czf "$stash/bundle.tar.gz" "${members[@]}"
    rm -rf "$stash/bundle"
    split -b "${piece}M" -d -a 2 "$stash/bundle.tar.gz" "$stash/part-"
    (cd "$stash" && sha256sum bundle.tar.gz part-* > SHA256SUMS && rm bundle.tar.gz)
    local rel parts=() n=0 p
    rel="$(realpath --relative-to=. "$stash")"
    for p in "$stash"/part-*; do parts+=("$rel/$(basename "$p")"); done
    echo "device-check.sh: $(du -sh "$stash" | cut -f1) in ${#parts[@]} parts under $rel/ (binary stripped from $(du -h "$binary" | cut -f1))"
    echo "Carry them one call each, in order, within the machine's idle time (files under ignored paths stay while it is warm):"
    for p in "${parts[@]}"; do
        n=$((n + 1))
        if [[ $n -lt ${#parts[@]} ]]; then
            echo "  run  carry=[\"$p\"]  command: ls -l $rel"
        else
            echo "  run  carry=[\"$p\", \"$rel/SHA256SUMS\"]  timeout_s=560  command: bash scripts/device-check.sh $check"
        fi
    done
}

# Joins and verifies the carried parts into $1 (refine-poi, models/).
unpack() {
    local into="$1"
    (cd "$stash" && sha256sum --quiet -c <(grep part- SHA256SUMS)) || { echo "device-check.sh: a carried part is missing or damaged" >&2; return 1; }
    cat "$stash"/part-* > "$into/bundle.tar.gz"
    (cd "$into" && sha256sum --quiet -c <(grep bundle.tar.gz "$stash/SHA256SUMS")) \
        || { echo "device-check.sh: the joined parts are not the packed bundle" >&2; return 1; }
    tar -C "$into" -xzf "$into/bundle.tar.gz" && rm "$into/bundle.tar.gz"
}

# The folders of the CUDA libraries a --runtime 13 binary links, wherever this machine keeps
# them (PyTorch's nvidia-* wheels, a CUDA toolkit), for LD_LIBRARY_PATH.
cuda_library_path() {
    local dirs=() lib found
    for lib in libcublas.so.13 libcublasLt.so.13 libcudart.so.13 libcurand.so.10 libnvrtc.so.13; do
        found="$(find /usr/local /opt /usr/lib /root -name "$lib*" 2>/dev/null | head -1)"
        [[ -n "$found" ]] && dirs+=("$(dirname "$found")")
    done
    printf '%s\n' "${dirs[@]}" | sort -u | paste -sd:
}

run_check() {
    local device=cuda small=0 out="" binary="" model=models/SmolLM2-135M-Instruct.Q4_1.gguf
    local semantic=0 epochs=2 deadline=520 codebook=""
    while [[ $# -gt 0 ]]; do
        case "$1" in
            --device) device="$2"; shift 2 ;;
            --small) small=1; shift ;;
            --semantic) semantic=1; shift ;;
            --epochs) epochs="$2"; shift 2 ;;
            --deadline) deadline="$2"; shift 2 ;;
            --codebook) codebook="$2"; shift 2 ;;
            --out) out="$2"; shift 2 ;;
            --binary) binary="$2"; shift 2 ;;
            --model) model="$2"; shift 2 ;;
            *) echo "device-check.sh run: unknown argument $1" >&2; exit 2 ;;
        esac
    done
    out="${out:-${OUT:+$OUT/device-check}}"
    out="${out:-runs/device-check}"
    rm -rf "$out" && mkdir -p "$out"
    out="$(cd "$out" && pwd)"
    local log="$out/log.txt" work
    work="$(mktemp -d)"
    local started=$SECONDS failed=()
    say() { echo "device-check: $*" | tee -a "$log"; }
    if [[ -f "$stash/SHA256SUMS" && -z "$binary" ]]; then
        unpack "$work" || { say "cannot unpack the carried parts"; exit 1; }
        binary="$work/refine-poi" model="$work/models/SmolLM2-135M-Instruct.Q4_1.gguf"
        [[ -f "$work/codebook.json" && -z "$codebook" ]] && codebook="$work/codebook.json"
        say "unpacked the carried binary and model ($((SECONDS - started)) s)"
    fi
    binary="${binary:-target/release/refine-poi}"
    [[ -x "$binary" ]] || { say "no binary at $binary"; exit 1; }
    if [[ "$device" != cpu ]]; then
        local libs
        libs="$(cuda_library_path)"
        export LD_LIBRARY_PATH="${libs}${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
    fi
    {
        echo "== $(date -u +%FT%TZ) on $(hostname), device $device, small $small"
        uname -a
        nproc
        command -v nvidia-smi > /dev/null && nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
        echo "LD_LIBRARY_PATH=${LD_LIBRARY_PATH:-}"
        ldd "$binary" | grep -E 'cuda|cublas|curand|nvrtc|not found' || true
    } >> "$log" 2>&1
    if ldd "$binary" | grep -q 'not found'; then
        say "the binary misses libraries (see log.txt): stopping"
        exit 1
    fi

    local bin=("$binary" --device "$device")
    # step NAME LIMIT_S OUTFILE -- ARGS...: runs the binary, its JSON to OUTFILE, the rest to the log.
    step() {
        local name="$1" limit="$2" file="$3"
        shift 4
        local t0=$SECONDS
        echo "== $name: ${bin[*]} $*" >> "$log"
        if timeout "$limit" "${bin[@]}" "$@" > "${file:-/dev/null}" 2>> "$log"; then
            say "$name: ok ($((SECONDS - t0)) s)"
        else
            say "$name: FAILED, exit $? ($((SECONDS - t0)) s)"
            failed+=("$name")
        fi
    }
    # The --semantic run: selfcheck f32, the history epochs under the deadline, then bench and
    # selfcheck bf16 in what time is left.
    train_semantic() {
        [[ -f "$codebook" ]] || { say "no codebook: pack --codebook FILE, or run --codebook FILE"; exit 1; }
        local data="$work/data"
        step "preprocess NYC" 60 "" -- preprocess --config configs/nyc.toml --set "data.dir=$data" --quiet
        if cmp -s "$codebook" "$data/codebook.json"; then
            say "the codebook made here is the carried one"
        else
            say "the codebook made here differs from the carried one: training on the carried one"
            cp "$codebook" "$data/codebook.json"
        fi
        local HIST_STEPS=0 TIME_TOKENS=1
        [[ $small == 1 ]] && HIST_STEPS=2
        source scripts/nyc-semantic-flags.sh
        local common=("${semantic_common[@]}" --set "data.dir=$data" --set "model.path=$model")
        step "selfcheck f32" 90 "$out/selfcheck-f32.json" -- selfcheck --model "$model" --dtype f32
        local e prev="" limit left ckpt
        for e in $(seq 1 "$epochs"); do
            # A whole first epoch matters more than a second one, or than bench: each epoch may
            # take all the time left.
            limit=$((deadline - (SECONDS - started) - 20))
            [[ $limit -lt 30 ]] && { say "history epoch $e: skipped, $limit s left"; break; }
            local from=()
            [[ -n "$prev" ]] && from=(--set "model.adapter=$prev" "${semantic_epoch2[@]}")
            step "history epoch $e" "$limit" "" -- sft-warmup "${common[@]}" "${semantic_history[@]}" "${from[@]}" \
                --set "run_dir=$work/history$e"
            sed "s/^{/{\"stage\":\"history$e\",/" "$work/history$e/sft/metrics.jsonl" >> "$out/train-metrics.jsonl" 2>/dev/null
            if [[ -d "$work/history$e/sft/final" ]]; then
                tar -C "$work/history$e/sft" -cf "$out/history$e.tar" final config.toml
                prev="$work/history$e/sft/final"
            else
                ckpt="$(cat "$work/history$e/sft/checkpoints/last" 2>/dev/null)"
                if [[ -n "$ckpt" ]]; then
                    tar -C "$work/history$e/sft" -cf "$out/history$e.tar" --exclude "optimizer*" "checkpoints/$ckpt" config.toml
                    say "history epoch $e: cut short; $out/history$e.tar holds $ckpt's adapter"
                fi
                break
            fi
        done
        left=$((deadline - (SECONDS - started)))
        [[ $left -gt 40 ]] && step "bench" $((left > 90 ? 60 : left - 20)) "$out/bench.json" -- bench --model "$model" --samples "$batch" --repeats "$repeats" --new-tokens 64
        # Each finished epoch ranked on the val split (next-code beam search, the settings
        # chosen on the CPU), for choosing between them; into eval.tar.
        mkdir -p "$work/eval"
        local limit_val=()
        [[ $small == 1 ]] && limit_val=(--limit 8)
        for e in $(seq 1 "$epochs"); do
            left=$((deadline - (SECONDS - started) - 15))
            [[ -d "$work/history$e/sft/final" && $left -gt 30 ]] || continue
            step "eval val, epoch $e" "$left" "" -- eval --run "$work/history$e/sft" --split val "${limit_val[@]}" --beam-next 20 \
                --quiet --out "$work/eval/history$e-val.json" --predictions "$work/eval/history$e-val.jsonl"
        done
        [[ -n "$(ls "$work/eval")" ]] && tar -C "$work" -cf "$out/eval.tar" eval
        left=$((deadline - (SECONDS - started)))
        [[ $left -gt 40 ]] && step "selfcheck bf16" $((left - 20)) "$out/selfcheck-bf16.json" -- selfcheck --model "$model" --dtype bf16
        true
    }
    local batch=64 prompts=8 groups=(8 16) new=48 repeats=3 sft=32 steps=20 val=32 per_step=2 group=8
    if [[ $small == 1 ]]; then
        batch=8 prompts=1 groups=(4 4) new=16 repeats=1 sft=2 steps=2 val=8 per_step=1 group=4
    fi
    if [[ $semantic == 1 ]]; then
        train_semantic
    else
    for dtype in f32 bf16; do
        step "selfcheck $dtype" 120 "$out/selfcheck-$dtype.json" -- selfcheck --model "$model" --dtype "$dtype"
    done
    step "bench" 120 "$out/bench.json" -- bench --model "$model" --samples "$batch" --repeats "$repeats" --new-tokens 64
    step "bench --grpo G=${groups[0]}" 120 "$out/bench-grpo-g8.json" -- bench --model "$model" --grpo --prompts "$prompts" --samples "${groups[0]}" --prompt-tokens 420 --new-tokens "$new" --repeats 2
    step "bench --grpo G=${groups[1]}" 150 "$out/bench-grpo-g16.json" -- bench --model "$model" --grpo --prompts "$prompts" --samples "${groups[1]}" --prompt-tokens 420 --new-tokens "$new" --repeats 2
    local run=(--config configs/nyc-raw.toml --set "run_dir=$work/nyc" --set "data.dir=$work/nyc/data" --set "model.path=$model")
    step "preprocess NYC" 120 "" -- preprocess "${run[@]}" --quiet
    step "sft-warmup, $sft steps" 120 "" -- sft-warmup "${run[@]}" --quiet --set "sft.max_steps=$sft" --set sft.eval_every=0
    step "grpo-train, $steps steps" 240 "" -- grpo-train "${run[@]}" --quiet --set "grpo.max_steps=$steps" \
        --set "grpo.prompts_per_step=$per_step" --set "grpo.group=$group" --set "grpo.eval_every=$steps" --set "grpo.eval_instances=$val" \
        --set grpo.save_every=10
    for stage in sft grpo; do
        sed "s/^{/{\"stage\":\"$stage\",/" "$work/nyc/$stage/metrics.jsonl" >> "$out/train-metrics.jsonl" 2>/dev/null
    done
    fi
    rm -rf "$work"

    python3 - "$out" > "$out/summary.txt" 2>> "$log" <<'EOF'
import json, os, sys
out = sys.argv[1]
def load(name):
    try:
        return json.load(open(os.path.join(out, name)))
    except (OSError, ValueError):
        return None
for dtype in ("f32", "bf16"):
    s = load(f"selfcheck-{dtype}.json")
    if s:
        g, fd, c = s["golden_logits"], s["finite_differences"], s["gradient_against_cpu"]
        worst = max(p["max_abs_diff"] for p in g["positions"])
        print(f"selfcheck {dtype}: {'pass' if s['passed'] else 'FAIL'}; golden logits max |diff| {worst:.4f} "
              f"(tolerance {g['tolerance']:g}), top-1 all same {all(p['top1_same'] for p in g['positions'])}, "
              f"greedy same {g['greedy_same']}; finite differences max error {fd['max_error']:.2e}; "
              f"gradient vs CPU f32: relative error {c['relative_error']:.2e}, cosine {c['cosine']:.4f}")
b = load("bench.json")
if b:
    print(f"bench ({b['device']}, {b['dtype']}): prefill {b['prefill_tokens_per_s']:.0f} tok/s, decode b1 "
          f"{b['decode_batch1_tokens_per_s']:.1f} tok/s, b{b['decode_batch_samples']} {b['decode_batch_tokens_per_s']:.0f} tok/s; "
          f"GEMM at prefill shapes {b['gemm_at_prefill_shapes']['gflops_layer']:.0f} GFLOP/s; peak RSS {b['peak_rss_mib']:.0f} MiB")
for name in ("bench-grpo-g8.json", "bench-grpo-g16.json"):
    g = load(name)
    if g:
        t = g["breakdown_seconds"]
        print(f"GRPO step, {g['prompts']} prompts x G = {g['group']}: {g['step_seconds']:.2f} s "
              f"({', '.join(f'{k} {v:.2f}' for k, v in t.items() if isinstance(v, (int, float)))})")
try:
    rows = [json.loads(l) for l in open(os.path.join(out, "train-metrics.jsonl"))]
except OSError:
    rows = []
stages = sorted({r["stage"] for r in rows if r["stage"].startswith("history")})
for stage, key in [("sft", "loss"), ("grpo", "reward")] + [(s, "loss") for s in stages]:
    steps = [r for r in rows if r["stage"] == stage and key in r]
    if steps:
        secs = sum(r.get("step_s", 0.0) for r in steps)
        tokens = sum(r.get("tokens", 0) for r in steps)
        print(f"{stage}: {len(steps)} steps, {secs:.1f} s of steps, {tokens} tokens, {key} first {steps[0][key]:.3f} last {steps[-1][key]:.3f}")
    for v in [r for r in rows if r["stage"] == stage and "val" in r][-1:]:
        a = v["val"]["all"]
        print(f"{stage} validation ({a['n']} val instances): MRR {a['mrr']:.3f}, Acc@10 {a['acc@10']:.3f}, invalid {v.get('val_invalid_rate')}")
if not rows:
    print("training: no metrics")
EOF
    cat "$out/summary.txt" | tee -a "$log"
    # Eight files come back from a device call: with eval.tar, the summary lives in the log only.
    [[ $semantic == 1 ]] && rm "$out/summary.txt"
    say "done in $((SECONDS - started)) s; ${#failed[@]} step(s) failed${failed[*]:+: ${failed[*]}}; everything in $out"
    [[ ${#failed[@]} -eq 0 ]]
}

case "$mode" in
    pack) pack "$@" ;;
    run) run_check "$@" ;;
    unpack) mkdir -p "${1:?unpack DIR}" && unpack "$1" ;;
    *) echo "usage: scripts/device-check.sh pack [--binary PATH] [--piece-mib N] | unpack DIR | run [--device cuda|cpu] [--small] [--out DIR] [--binary PATH] [--model PATH]" >&2; exit 2 ;;
esac
