#!/usr/bin/env bash
# A real `--features cuda` build on a machine without a GPU or a system CUDA toolkit.
#
# The CUDA 12.4 compiler, headers and libraries come from Debian trixie's packages, served by
# the Debian registry: nvidia-cuda-toolkit (nvcc, cicc, ptxas, cudafe++, fatbinary),
# nvidia-cuda-dev (headers, libcudart and the libcuda link stub), the runtime libraries candle
# links (cuBLAS, cuBLASLt, cuRAND, NVRTC), and libcu++, Thrust and CUB (headers nvcc includes). They are
# unpacked with `dpkg -x` into a local folder (default .cuda/, git-ignored); nothing is
# installed system-wide. nvcc gets a profile pointing at that folder, and uses the system's
# g++ (12 on bookworm; CUDA 12.4 takes up to 13). Then candle's kernels are compiled for real
# (PTX for the chosen compute capability, plus its static GGUF/MoE kernels as SASS) and the
# binary is linked.
#
#   scripts/build-cuda.sh [--compute-cap 80] [--runtime 12|13] [extra cargo build arguments]
#
# --compute-cap: 80 (Ampere, the default; its PTX also runs on Hopper through the driver's JIT)
# or 90 (Hopper SASS).
# --runtime: the CUDA libraries the binary links and needs where it runs.
#   12 (default): Debian's CUDA 12.4 libraries (libcudart, libcublas, libcublasLt, libcurand,
#      libnvrtc): install them there, or point LD_LIBRARY_PATH at .cuda/root/usr/lib/x86_64-linux-gnu.
#   13: the CUDA 13.0 libraries of PyPI's nvidia-* wheels, the ones PyTorch's cu130 builds
#      install, so the binary runs on a machine whose only CUDA is such a PyTorch (the lent
#      GPU machines). The kernels are still compiled by nvcc 12.4: its PTX is JIT-compiled by
#      any newer driver. cudarc's bindings are then its CUDA 13.0 ones (CUDARC_CUDA_VERSION).
# Output: target/cuda-smNN[-cuda13]/release/refine-poi. CUDA_LOCAL sets the folder,
# DEBIAN_MIRROR the mirror.
set -euo pipefail
cd "$(dirname "$0")/.."
cap=80 runtime=12
while [[ "${1:-}" == --compute-cap || "${1:-}" == --runtime ]]; do
    case "$1" in --compute-cap) cap="$2" ;; --runtime) runtime="$2" ;; esac
    shift 2
done
[[ "$runtime" == 12 || "$runtime" == 13 ]] || { echo "build-cuda.sh: --runtime 12 or 13" >&2; exit 1; }
prefix="${CUDA_LOCAL:-$PWD/.cuda}"
mirror="${DEBIAN_MIRROR:-http://deb.debian.org/debian}"
root="$prefix/root"
toolkit="$root/usr/lib/nvidia-cuda-toolkit/bin"
lib="$root/usr/lib/x86_64-linux-gnu"
started=$(date +%s)

# name=version of every package: pinned, so the build is the same on any day.
nonfree=(nvidia-cuda-toolkit nvidia-cuda-dev libcudart12 libnvvm4 libcublas12 libcublaslt12 libcurand10 libnvrtc12 libnvrtc-builtins12.4)
main=(libcu++-dev libthrust-dev libcub-dev)

fetch() { # fetch COMPONENT ARCH PACKAGE...: downloads and unpacks each package of trixie's index
    local component="$1" arch="$2"; shift 2
    local index="$prefix/trixie-$component-$arch.Packages"
    [[ -s "$index" ]] || curl -sSfL "$mirror/dists/trixie/$component/binary-$arch/Packages.xz" | xz -d > "$index"
    for pkg in "$@"; do
        local file
        file="$(awk -v p="$pkg" '$1 == "Package:" { hit = ($2 == p) } hit && $1 == "Filename:" { print $2; exit }' "$index")"
        [[ -n "$file" ]] || { echo "build-cuda.sh: no package $pkg in trixie/$component" >&2; exit 1; }
        local deb="$prefix/debs/$(basename "$file")"
        [[ -s "$deb" ]] || curl -sSfL -o "$deb" "$mirror/$file"
        dpkg -x "$deb" "$root"
    done
}

if [[ ! -x "$toolkit/cicc" || ! -f "$toolkit/nvcc.profile.local" ]]; then
    command -v dpkg > /dev/null && command -v curl > /dev/null && command -v xz > /dev/null \
        || { echo "build-cuda.sh: needs dpkg, curl and xz" >&2; exit 1; }
    mkdir -p "$prefix/debs" "$root"
    echo "build-cuda.sh: fetching CUDA 12.4 from Debian trixie into $prefix (about 1.4 GB)"
    fetch non-free amd64 "${nonfree[@]}"
    # The packaged profile is a link to /etc/nvcc.profile with absolute /usr paths: replace it
    # with one relative to the toolkit's own folder.
    rm -f "$toolkit/nvcc.profile"
    cat > "$toolkit/nvcc.profile" <<'EOF'
NVVMIR_LIBRARY_DIR = $(_HERE_)/../libdevice
PATH		+= $(_HERE_):$(_HERE_)/../../../bin:
INCLUDES	+= "-I$(_HERE_)/../../../include" $(_SPACE_)
LIBRARIES	=+ $(_SPACE_) "-L$(_HERE_)/../../x86_64-linux-gnu/stubs" "-L$(_HERE_)/../../x86_64-linux-gnu"
EOF
    touch "$toolkit/nvcc.profile.local"
fi
# The CUDA 13.0 libraries, from PyPI: the oldest 13.0 releases, so that whatever 13.x a
# machine has defines every symbol the binary takes.
cu13=(nvidia-cublas==13.0.0.19 nvidia-cuda-runtime==13.0.48 nvidia-curand==10.4.0.35 nvidia-cuda-nvrtc==13.0.48)
if [[ "$runtime" == 13 && ! -f "$prefix/cu13/lib/libcublas.so" ]]; then
    echo "build-cuda.sh: fetching the CUDA 13.0 libraries from PyPI into $prefix/cu13"
    mkdir -p "$prefix/cu13/wheels" "$prefix/cu13/lib"
    python3 -m pip download -q --no-deps --only-binary=:all: --platform manylinux_2_27_x86_64 \
        --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 -d "$prefix/cu13/wheels" "${cu13[@]}"
    for w in "$prefix"/cu13/wheels/*.whl; do
        python3 -c 'import sys, zipfile; zipfile.ZipFile(sys.argv[1]).extractall(sys.argv[2])' "$w" "$prefix/cu13/unpacked"
    done
    find "$prefix/cu13/unpacked" -name 'lib*.so*' -exec cp -t "$prefix/cu13/lib" {} +
    # The linker wants the unversioned names.
    for l in cublas cublasLt cudart curand nvrtc; do
        so="$(ls "$prefix"/cu13/lib/lib$l.so.* | head -1)"
        ln -sf "$(basename "$so")" "$prefix/cu13/lib/lib$l.so"
    done
fi
# Headers from main: libcu++, and Thrust and CUB (candle's MoE kernels include Thrust).
[[ -f "$root/usr/include/thrust/device_ptr.h" ]] || fetch main all "${main[@]}"
fetched=$(date +%s)

export PATH="$toolkit:$PATH"
export CUDA_COMPUTE_CAP="$cap"
# cudarc links the CUDA libraries by name; the driver's libcuda only as the toolkit's stub.
suffix=""
if [[ "$runtime" == 13 ]]; then
    export CUDARC_CUDA_VERSION=13000 suffix=-cuda13
    export RUSTFLAGS="${RUSTFLAGS:-} -L native=$prefix/cu13/lib -L native=$lib/stubs"
else
    export RUSTFLAGS="${RUSTFLAGS:-} -L native=$lib -L native=$lib/stubs"
fi
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-target/cuda-sm$cap$suffix}"
nvcc --version | tail -2
cargo build --release --locked --features cuda "$@"
done_at=$(date +%s)
bin="$CARGO_TARGET_DIR/release/refine-poi"
# Evidence that candle's kernels were compiled, not stubbed: PTX modules for this capability.
ptx="$(find "$CARGO_TARGET_DIR"/release/build/candle-kernels-*/out -name '*.ptx' -size +1k | wc -l)"
[[ "$ptx" -gt 0 ]] || { echo "build-cuda.sh: no compiled PTX in candle-kernels' build output" >&2; exit 1; }
echo "build-cuda.sh: $ptx PTX modules of candle's kernels, target $(grep -ho '^.target sm_[0-9a-z]*' "$(find "$CARGO_TARGET_DIR"/release/build/candle-kernels-*/out -name '*.ptx' | head -1)")"
echo "build-cuda.sh: $bin for sm_$cap ($(du -h "$bin" | cut -f1)); fetch $((fetched - started)) s, build $((done_at - fetched)) s on $(nproc) cores"
