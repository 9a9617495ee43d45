#!/usr/bin/env bash
# Builds a dataset directory from the raw check-ins you have, with the protocol settings of the
# dataset's config (configs/NAME.toml, [preprocess]), into its data.dir.
#
#   scripts/prepare-dataset.sh nyc        path/to/dataset_tsmc2014.zip   # or dataset_TSMC2014_NYC.txt
#   scripts/prepare-dataset.sh tky        path/to/dataset_tsmc2014.zip   # or dataset_TSMC2014_TKY.txt
#   scripts/prepare-dataset.sh gowalla-ca path/to/loc-gowalla_totalCheckins.txt.gz [categories.csv]
#
# The TSMC2014 zip is unpacked into data/raw/ (its city's file only). NYC without a raw file uses
# the CSV shipped in data/nyc/ (`refine-poi preprocess --config configs/nyc.toml`). Extra
# arguments after the files are passed on (e.g. --set data.dir=/tmp/tky --strict is not one:
# use --set preprocess.strict=true). REFINE_POI names the binary (default: target/release/refine-poi).
set -euo pipefail

usage() { sed -n '2,13p' "$0" | sed 's/^# \{0,1\}//'; exit "${1:-0}"; }
[[ $# -ge 2 ]] || usage 2
name="$1"; raw="$2"; shift 2
categories=""
if [[ $# -gt 0 && "$1" != --* ]]; then categories="$1"; shift; fi

root="$(cd "$(dirname "$0")/.." && pwd)"
config="$root/configs/$name.toml"
[[ -f "$config" ]] || { echo "prepare-dataset.sh: no config for '$name' (nyc, tky, gowalla-ca)" >&2; exit 2; }
[[ -f "$raw" ]] || { echo "prepare-dataset.sh: no such file: $raw" >&2; exit 2; }
bin="${REFINE_POI:-$root/target/release/refine-poi}"
[[ -x "$bin" ]] || (cd "$root" && cargo build --release --locked)

sets=()
case "$name" in
    nyc|tky)
        city="$(echo "$name" | tr a-z A-Z)"
        if [[ "$raw" == *.zip ]]; then
            member="$(unzip -Z1 "$raw" | grep "dataset_TSMC2014_${city}.txt$" | head -1)"
            [[ -n "$member" ]] || { echo "prepare-dataset.sh: $raw has no dataset_TSMC2014_${city}.txt" >&2; exit 2; }
            mkdir -p "$root/data/raw"
            unzip -p "$raw" "$member" > "$root/data/raw/dataset_TSMC2014_${city}.txt"
            raw="$root/data/raw/dataset_TSMC2014_${city}.txt"
        fi
        sets+=(--set preprocess.format=foursquare) ;;
    gowalla-ca)
        # The config reads the shipped CSV; the raw SNAP file needs its reader and the California box.
        sets+=(--set preprocess.format=gowalla --set "preprocess.bbox=32.5,-124.5,42.0,-114.1")
        [[ -z "$categories" ]] || sets+=(--set "preprocess.categories=$categories") ;;
esac
"$bin" preprocess --config "$config" --set "preprocess.input=$raw" "${sets[@]}" "$@"
