#!/usr/bin/env bash
# Type-checks the crate with the `cuda` feature on a machine without a GPU or CUDA toolkit
# (our dev and CI machines): `cargo check --features cuda --all-targets`.
#
# This checks that our Rust code compiles against candle's CUDA API. The CUDA kernels
# themselves are NOT compiled: the build scripts of candle-kernels (via the `cudaforge` crate)
# and of cudarc want `nvcc`, so a stub `nvcc` is put first on PATH that reports a CUDA
# version and writes empty outputs (.ptx files, .o files, an empty static library).
# `cargo check` does not link, so the missing CUDA libraries (cudart, cublas, ...) don't matter.
#
# The stub's empty PTX/objects land in the build-script output of candle-kernels, so never
# share this target dir with a real CUDA build (default: target/cuda-check).
# Extra arguments are passed on to cargo check. Override the target dir with CARGO_TARGET_DIR,
# the reported CUDA version with STUB_CUDA_VERSION (e.g. 13.0; it selects cudarc's API level).
set -euo pipefail
cd "$(dirname "$0")/.."

stub=$(mktemp -d)
trap 'rm -rf "$stub"' EXIT
cat >"$stub/nvcc" <<'EOF'
#!/usr/bin/env bash
# Stub nvcc for `cargo check` only: creates the requested outputs, compiles nothing.
set -euo pipefail
version=${STUB_CUDA_VERSION:-12.8}
out="" outdir="" lib=0 ptx=0 sources=()
while [ $# -gt 0 ]; do
  case "$1" in
    --version|-V)
      # cudarc parses the 4th line ("..., release X.Y, ..."), cudaforge any line with "release".
      printf '%s\n' "nvcc: NVIDIA (R) Cuda compiler driver (stub for cargo check)" \
        "Copyright (c) 2005-2025 NVIDIA Corporation" "Built on stub" \
        "Cuda compilation tools, release $version, V$version.0" "Build cuda_$version.stub"
      exit 0 ;;
    --list-gpu-code) printf 'sm_80\n'; exit 0 ;;
    -o) out=$2; shift ;;
    --output-directory|-odir) outdir=$2; shift ;;
    --lib|-lib) lib=1 ;;
    --ptx|-ptx) ptx=1 ;;
    *.cu) sources+=("$1") ;;
  esac
  shift
done
if [ "$lib" = 1 ]; then
  printf '!<arch>\n' >"$out"   # an empty `ar` archive (libmoe.a)
elif [ "$ptx" = 1 ] && [ -z "$out" ]; then
  for src in "${sources[@]}"; do
    name=$(basename "$src" .cu)
    : >"${outdir:-.}/$name.ptx"   # candle-kernels include_str!s these
  done
elif [ -n "$out" ]; then
  : >"$out"                    # an empty object file (or a single .ptx)
fi
EOF
chmod +x "$stub/nvcc"

export PATH="$stub:$PATH"
unset NVCC NVCC_CCBIN CUDARC_CUDA_VERSION   # cudaforge prefers $NVCC over PATH; keep the stub in charge
export CUDA_COMPUTE_CAP=${CUDA_COMPUTE_CAP:-80}   # else cudaforge asks nvidia-smi for it
export CARGO_TARGET_DIR=${CARGO_TARGET_DIR:-target/cuda-check}

cargo check --features cuda --all-targets "$@"
