#!/usr/bin/env bash
# Runs a list of variants of one config, each into its own run directory, then evaluates each
# and writes a report comparing them.
#
#   scripts/sweep.sh --config configs/nyc.toml --variants configs/ablations/nyc.txt \
#       --out runs/ablations [--stages grpo] [--split val] [--limit 200] [-- --set key=value ...]
#
# The variants file has one variant per line: a name, then `--set key=value` overrides
# (blank lines and # comments are skipped):
#
#   baseline
#   no-kl      --set grpo.beta=0
#   k5         --set prompt.k=5
#
# Variant NAME runs in OUT/NAME (its run_dir). For each stage (sft-warmup for "sft", grpo-train
# for "grpo"), a finished stage (final/ exists) is skipped, a started one is resumed, and a new
# one starts; so rerunning the same command after an interruption carries on. Each variant's
# last stage is then evaluated on the split (`refine-poi eval --run`; skipped when its report
# exists) and `refine-poi report` writes OUT/report/ (report.txt/.md/.csv, curves.svg).
# Overrides after `--` apply to every variant (e.g. --set data.dir=/tmp/nyc).
# REFINE_POI names the binary (default: target/release/refine-poi, built if missing).
set -euo pipefail

usage() { sed -n '2,23p' "$0" | sed 's/^# \{0,1\}//'; exit "${1:-0}"; }

config="" variants="" out="" stages="grpo" split="val" limit="" common=()
while [[ $# -gt 0 ]]; do
    case "$1" in
        --config) config="$2"; shift 2 ;;
        --variants) variants="$2"; shift 2 ;;
        --out) out="$2"; shift 2 ;;
        --stages) stages="$2"; shift 2 ;;
        --split) split="$2"; shift 2 ;;
        --limit) limit="$2"; shift 2 ;;
        -h|--help) usage 0 ;;
        --) shift; common=("$@"); break ;;
        *) echo "sweep.sh: unknown argument '$1' (see --help)" >&2; exit 2 ;;
    esac
done
[[ -n "$config" && -n "$variants" && -n "$out" ]] || { echo "sweep.sh: --config, --variants and --out are required (see --help)" >&2; exit 2; }
[[ -f "$config" ]] || { echo "sweep.sh: no config file $config" >&2; exit 2; }
[[ -f "$variants" ]] || { echo "sweep.sh: no variants file $variants" >&2; exit 2; }

mkdir -p "$out"
# One sweep at a time in OUT: an advisory lock (flock, as refine-poi's own run-dir locks) held
# until this script exits; the kernel drops it if the script dies, so it is never stale.
lock="$out/.lock"
exec 9>>"$lock"
if ! flock -n 9; then
    echo "sweep.sh: $out is in use by another sweep ($(tr '\n' ' ' < "$lock")): wait for it to end, or choose another --out" >&2
    exit 1
fi
if [[ -s "$lock" ]]; then
    echo "sweep.sh: warning: taking over the lock of $out left by a process that is gone ($(tr '\n' ' ' < "$lock"))" >&2
fi
printf 'pid %s\nhost %s\nstarted %s\ncommand sweep.sh\n' "$$" "$(uname -n)" "$(date -u +%Y-%m-%dT%H:%M:%SZ)" > "$lock"
trap ': > "$lock"' EXIT

root="$(cd "$(dirname "$0")/.." && pwd)"
bin="${REFINE_POI:-$root/target/release/refine-poi}"
if [[ ! -x "$bin" ]]; then
    (cd "$root" && cargo build --release --locked)
fi

command_of() {
    case "$1" in
        sft) echo sft-warmup ;;
        grpo) echo grpo-train ;;
        *) echo "sweep.sh: unknown stage '$1' (sft, grpo)" >&2; exit 2 ;;
    esac
}

names=()
while IFS= read -r line || [[ -n "$line" ]]; do
    line="${line%%#*}"
    read -r -a words <<< "$line" || true
    [[ ${#words[@]} -eq 0 ]] && continue
    name="${words[0]}"
    sets=("${words[@]:1}")
    [[ "$name" =~ ^[A-Za-z0-9._-]+$ ]] || { echo "sweep.sh: bad variant name '$name' (letters, digits, . _ -)" >&2; exit 2; }
    names+=("$name")
    dir="$out/$name"
    IFS=',' read -r -a stage_list <<< "$stages"
    for stage in "${stage_list[@]}"; do
        cmd="$(command_of "$stage")"
        if [[ -f "$dir/$stage/final/adapter_config.json" ]]; then
            echo "== $name: $stage done, skipped"
            continue
        fi
        resume=()
        # Any checkpoint, or a started run (its config written): carry on from there.
        if compgen -G "$dir/$stage/checkpoints/step-*" > /dev/null || [[ -f "$dir/$stage/config.toml" ]]; then resume=(--resume); fi
        echo "== $name: $cmd ${resume[*]:-}"
        "$bin" "$cmd" --config "$config" --set "run_dir=$dir" ${sets[@]+"${sets[@]}"} ${common[@]+"${common[@]}"} ${resume[@]+"${resume[@]}"} --quiet \
            < /dev/null > "$dir.$stage.json" 2> "$dir.$stage.log" 9>&- || {
            cat "$dir.$stage.log" >&2; echo "sweep.sh: $name: $cmd failed (log: $dir.$stage.log)" >&2; exit 1; }
    done
    last="${stage_list[${#stage_list[@]}-1]}"
    report="$dir/$last/eval/$split${limit:+-$limit}.json"
    if [[ -f "$report" ]]; then
        echo "== $name: $report exists, skipped"
    else
        echo "== $name: eval on $split${limit:+ ($limit instances)}"
        "$bin" eval --run "$dir/$last" --split "$split" ${limit:+--limit "$limit"} --quiet < /dev/null > /dev/null 9>&-
    fi
done < "$variants"
[[ ${#names[@]} -gt 0 ]] || { echo "sweep.sh: $variants lists no variants" >&2; exit 2; }

runs=()
for name in "${names[@]}"; do runs+=("$out/$name"); done
"$bin" report "${runs[@]}" --out "$out/report"
