#!/usr/bin/env bash
# Installs what the `mpi` feature (data-parallel training) needs from Debian's package registry:
# OpenMPI (mpirun and libmpi) and libclang (the bindings of the `mpi` crate are generated at
# build time). Does nothing when they are already there. Needs root (or sudo).
set -euo pipefail
if command -v mpirun > /dev/null && command -v mpicc > /dev/null && ldconfig -p | grep -q 'libclang[-.0-9]*\.so'; then
    exit 0
fi
sudo=(); [[ $(id -u) -eq 0 ]] || sudo=(sudo)
export DEBIAN_FRONTEND=noninteractive
"${sudo[@]}" apt-get update -q
"${sudo[@]}" apt-get install -y -q --no-install-recommends openmpi-bin libopenmpi-dev libclang-dev
