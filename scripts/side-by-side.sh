#!/usr/bin/env bash
# For people, not CI: refine-poi's `bench` beside Hugging Face transformers (and llama.cpp when
# llama-cpp-python is installed in the venv) on this machine, in one sitting, with the same
# prompt, lengths, threads and model file. Prints one JSON object per system to stdout.
#
#   bash scripts/side-by-side.sh                 # refine-poi and transformers
#   LLAMA_CPP=1 bash scripts/side-by-side.sh     # also builds and times llama-cpp-python
#
# On the AVX-512 Xeon of the twelfth session, llama-cpp-python built natively crashed in
# llama_decode; its AVX2 build ran: CMAKE_ARGS="-DGGML_NATIVE=OFF -DGGML_AVX512=OFF -DGGML_AVX2=ON
# -DGGML_FMA=ON -DGGML_F16C=ON" LLAMA_CPP=1 bash scripts/side-by-side.sh
#
# The first run creates .venv-ref/ (PyPI's torch wheel pulls about 5 GB of CUDA libraries it will
# not use; llama-cpp-python compiles llama.cpp, several minutes on 2 cores). Run it on an otherwise
# idle machine: every system shares the same cores.
set -euo pipefail
cd "$(dirname "$0")/.."
threads=${THREADS:-2}
args=(--prompt-tokens "${PROMPT_TOKENS:-400}" --new-tokens "${NEW_TOKENS:-64}" --samples "${SAMPLES:-8}" --repeats "${REPEATS:-3}")
bash scripts/fetch-model.sh >&2
gguf=models/SmolLM2-135M-Instruct.Q4_1.gguf
venv=.venv-ref
if [ ! -x "$venv/bin/python" ] || ! "$venv/bin/python" -c 'import torch, transformers, gguf, accelerate' 2>/dev/null; then
  python3 -m venv "$venv"
  "$venv/bin/pip" install --quiet torch transformers accelerate gguf numpy >&2
fi
if [ "${LLAMA_CPP:-0}" = 1 ] && ! "$venv/bin/python" -c 'import llama_cpp' 2>/dev/null; then
  "$venv/bin/pip" install --quiet llama-cpp-python >&2
fi
cargo build --release --quiet >&2
echo "machine: $(lscpu | sed -n 's/^Model name: *//p'), $(nproc) cores, $(grep -o -w -E 'avx512f|avx2|fma' /proc/cpuinfo | sort -u | tr '\n' ' '); $(date -u +%FT%TZ)" >&2
RAYON_NUM_THREADS=$threads target/release/refine-poi bench --model "$gguf" "${args[@]}"
"$venv/bin/python" scripts/side_by_side.py "$gguf" --system hf --threads "$threads" "${args[@]}"
if "$venv/bin/python" -c 'import llama_cpp' 2>/dev/null; then
  "$venv/bin/python" scripts/side_by_side.py "$gguf" --system llama-cpp --threads "$threads" "${args[@]}" ||
    echo "llama.cpp: failed (exit $?)" >&2
else
  echo "llama.cpp: not installed in $venv (LLAMA_CPP=1 installs it)" >&2
fi
