#!/usr/bin/env bash
# Runs a list of variants of one config, each into its own run directory, then evaluates each
# and writes a report comparing them.
#
#   scripts/sweep.sh --config configs/nyc-raw.toml --variants configs/ablations/nyc.txt \
#       --out runs/ablations [--stages grpo] [--split val] [--limit 200] \
#       [--slurm [sbatch options]] [-- --set key=value ...]
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
#
# --slurm submits one sbatch job per variant instead (the sbatch options that follow, up to
# `--`, go to every job, e.g. --slurm --time=4:00:00 --cpus-per-task=2), and a report job that
# runs when they all succeed. Each job runs its training through srun, can be requeued, and on
# SIGUSR1 or SIGTERM (`scancel --signal=USR1`, Slurm's warning before the time limit) its run
# writes a checkpoint and the job asks to be requeued, to resume from it. Logs: OUT/NAME.slurm.log.
# --only NAME runs one variant (what each job runs); --report-only writes the report of the
# variants evaluated so far, naming the others.
# REFINE_POI names the binary (default: target/release/refine-poi, built if missing);
# SWEEP_LAUNCH prefixes every training command (e.g. "srun", or "mpirun -np 4" for
# data-parallel training).
set -euo pipefail

usage() { sed -n '2,33p' "$0" | sed 's/^# \{0,1\}//'; exit "${1:-0}"; }

config="" variants="" out="" stages="grpo" split="val" limit="" common=() slurm=0 sbatch_opts=() only="" report_only=0
while [[ $# -gt 0 ]]; do
    case "$1" in
        --config) config="$2"; shift 2 ;;
        --variants) variants="$2"; shift 2 ;;
        --out) out="$2"; shift 2 ;;
        --stages) stages="$2"; shift 2 ;;
        --split) split="$2"; shift 2 ;;
        --limit) limit="$2"; shift 2 ;;
        --only) only="$2"; shift 2 ;;
        --report-only) report_only=1; shift ;;
        --slurm)
            slurm=1; shift
            while [[ $# -gt 0 && "$1" != "--" ]]; do sbatch_opts+=("$1"); shift; done ;;
        -h|--help) usage 0 ;;
        --) shift; common=("$@"); break ;;
        *) echo "sweep.sh: unknown argument '$1' (see --help)" >&2; exit 2 ;;
    esac
done
[[ -n "$config" && -n "$variants" && -n "$out" ]] || { echo "sweep.sh: --config, --variants and --out are required (see --help)" >&2; exit 2; }
[[ -f "$config" ]] || { echo "sweep.sh: no config file $config" >&2; exit 2; }
[[ -f "$variants" ]] || { echo "sweep.sh: no variants file $variants" >&2; exit 2; }

mkdir -p "$out"
out="$(cd "$out" && pwd)"
# One sweep at a time in OUT (one job at a time per variant with --only): an advisory lock
# (flock, as refine-poi's own run-dir locks) held until this script exits; the kernel drops it
# if the script dies, so it is never stale.
lock="$out/.lock${only:+-$only}"
exec 9>>"$lock"
if ! flock -n 9; then
    echo "sweep.sh: $out${only:+ ($only)} is in use by another sweep ($(tr '\n' ' ' < "$lock")): wait for it to end, or choose another --out" >&2
    exit 1
fi
if [[ -s "$lock" ]]; then
    echo "sweep.sh: warning: taking over the lock of $out${only:+ ($only)} left by a process that is gone ($(tr '\n' ' ' < "$lock"))" >&2
fi
printf 'pid %s\nhost %s\nstarted %s\ncommand sweep.sh\n' "$$" "$(uname -n)" "$(date -u +%Y-%m-%dT%H:%M:%SZ)" > "$lock"
trap ': > "$lock"' EXIT

root="$(cd "$(dirname "$0")/.." && pwd)"
bin="${REFINE_POI:-$root/target/release/refine-poi}"
if [[ ! -x "$bin" ]]; then
    (cd "$root" && cargo build --release --locked)
fi
read -r -a launch <<< "${SWEEP_LAUNCH:-}"

command_of() {
    case "$1" in
        sft) echo sft-warmup ;;
        grpo) echo grpo-train ;;
        *) echo "sweep.sh: unknown stage '$1' (sft, grpo)" >&2; exit 2 ;;
    esac
}

IFS=',' read -r -a stage_list <<< "$stages"
for stage in "${stage_list[@]}"; do command_of "$stage" > /dev/null; done
last="${stage_list[${#stage_list[@]}-1]}"
report_of() { echo "$out/$1/$last/eval/$split${limit:+-$limit}.json"; }

# The variants: names (checked) and their overrides.
names=() variant_sets=()
while IFS= read -r line || [[ -n "$line" ]]; do
    line="${line%%#*}"
    read -r -a words <<< "$line" || true
    [[ ${#words[@]} -eq 0 ]] && continue
    name="${words[0]}"
    [[ "$name" =~ ^[A-Za-z0-9._-]+$ ]] || { echo "sweep.sh: bad variant name '$name' (letters, digits, . _ -)" >&2; exit 2; }
    names+=("$name")
    variant_sets+=("${words[*]:1}")
done < "$variants"
[[ ${#names[@]} -gt 0 ]] || { echo "sweep.sh: $variants lists no variants" >&2; exit 2; }

# Trains (or resumes) and evaluates one variant. A training command stopped by a signal (exit
# 130, 138, 143: its checkpoint is written) makes the script exit with that status.
run_variant() {
    local name="$1" dir="$out/$1" sets status
    read -r -a sets <<< "$2"
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
        status=0
        ${launch[@]+"${launch[@]}"} "$bin" "$cmd" --config "$config" --set "run_dir=$dir" ${sets[@]+"${sets[@]}"} ${common[@]+"${common[@]}"} \
            ${resume[@]+"${resume[@]}"} --quiet < /dev/null > "$dir.$stage.json" 2> "$dir.$stage.log" 9>&- || status=$?
        case $status in
            0) ;;
            130|138|143) echo "== $name: $cmd stopped by a signal (status $status), checkpoint written"; exit $status ;;
            *) cat "$dir.$stage.log" >&2; echo "sweep.sh: $name: $cmd failed (log: $dir.$stage.log)" >&2; exit 1 ;;
        esac
    done
    report="$(report_of "$name")"
    if [[ -f "$report" ]]; then
        echo "== $name: $report exists, skipped"
    else
        echo "== $name: eval on $split${limit:+ ($limit instances)}"
        "$bin" eval --run "$dir/$last" --split "$split" ${limit:+--limit "$limit"} --quiet < /dev/null > /dev/null 9>&-
    fi
}

# The report over the variants evaluated so far.
write_report() {
    local runs=() missing=()
    for name in "${names[@]}"; do
        if [[ -f "$(report_of "$name")" ]]; then runs+=("$out/$name"); else missing+=("$name"); fi
    done
    [[ ${#missing[@]} -eq 0 ]] || echo "sweep.sh: not evaluated yet, left out of the report: ${missing[*]}" >&2
    [[ ${#runs[@]} -gt 0 ]] || { echo "sweep.sh: no variant is evaluated yet" >&2; exit 1; }
    "$bin" report "${runs[@]}" --out "$out/report"
}

# The sweep's own arguments, for the jobs it submits.
sweep_args=(--config "$(realpath "$config")" --variants "$(realpath "$variants")" --out "$out" --stages "$stages" --split "$split" ${limit:+--limit "$limit"})

submit() {
    command -v sbatch > /dev/null || { echo "sweep.sh: --slurm needs sbatch on PATH" >&2; exit 2; }
    local ids=() id
    for name in "${names[@]}"; do
        if [[ -f "$(report_of "$name")" ]]; then echo "== $name: evaluated, not submitted"; continue; fi
        job="$out/$name.sbatch"
        # SIGUSR1 two minutes before the time limit (to the job's steps: the srun'd training);
        # a run stopped by a signal checkpoints, and the job puts itself back in the queue.
        {
            echo '#!/usr/bin/env bash'
            echo "#SBATCH --job-name=sweep-$name"
            echo "#SBATCH --output=$out/$name.slurm.log"
            echo '#SBATCH --open-mode=append'
            echo '#SBATCH --requeue'
            echo '#SBATCH --signal=USR1@120'
            echo 'echo "== job $SLURM_JOB_ID on $(hostname), restart ${SLURM_RESTART_COUNT:-0}, $(date -u +%FT%TZ)"'
            echo 'status=0'
            printf 'REFINE_POI=%q SWEEP_LAUNCH=%q bash %q' "$bin" "${SWEEP_LAUNCH:-srun --ntasks=1}" "$root/scripts/sweep.sh"
            printf ' %q' "${sweep_args[@]}" --only "$name" -- ${common[@]+"${common[@]}"}
            echo ' || status=$?'
            echo 'if [[ $status -eq 138 || $status -eq 143 ]]; then echo "== requeued after status $status"; scontrol requeue "$SLURM_JOB_ID"; fi'
            echo 'exit $status'
        } > "$job"
        id="$(sbatch --parsable ${sbatch_opts[@]+"${sbatch_opts[@]}"} "$job")"
        id="${id%%;*}"
        ids+=("$id")
        echo "== $name: submitted job $id (log: $out/$name.slurm.log)"
    done
    local dep=()
    [[ ${#ids[@]} -gt 0 ]] && dep=(--dependency="afterok:$(IFS=:; echo "${ids[*]}")")
    id="$(sbatch --parsable ${sbatch_opts[@]+"${sbatch_opts[@]}"} ${dep[@]+"${dep[@]}"} --job-name=sweep-report \
        --output="$out/report.slurm.log" --wrap="$(printf '%q ' env REFINE_POI="$bin" bash "$root/scripts/sweep.sh" "${sweep_args[@]}" --report-only)")"
    echo "== report: job ${id%%;*} after ${ids[*]:-nothing} (OUT/report; or run: scripts/sweep.sh ... --report-only)"
}

if [[ -n "$only" ]]; then
    for i in "${!names[@]}"; do
        if [[ "${names[$i]}" == "$only" ]]; then run_variant "$only" "${variant_sets[$i]}"; exit 0; fi
    done
    echo "sweep.sh: no variant '$only' in $variants" >&2; exit 2
elif [[ $report_only -eq 1 ]]; then
    write_report
elif [[ $slurm -eq 1 ]]; then
    submit
else
    for i in "${!names[@]}"; do run_variant "${names[$i]}" "${variant_sets[$i]}"; done
    write_report
fi
