#!/usr/bin/env bash
# Regenerate the hash-locked requirement sets (names, versions, hashes; no addresses).
set -euo pipefail
export MACOSX_DEPLOYMENT_TARGET=14.0  # MLX ships macOS 14+ wheels only
cd "$(dirname "$0")/.."
common=(--python-version 3.11 --generate-hashes --no-header --no-annotate --quiet --universal)
compile() {  # out platform overrides extras...
    local out=$1 platform=$2 overrides=$3; shift 3
    local extras=()
    for e in "$@"; do extras+=(--extra "$e"); done
    uv pip compile pyproject.toml "${extras[@]}" --python-version 3.11 --generate-hashes \
        --no-header --no-annotate --quiet --python-platform "$platform" \
        --override "$overrides" --prerelease=if-necessary-or-explicit -o "$out"
    # uv writes index/find-links lines when configured; a lock must not name a host.
    sed -i -E '/^--(index-url|extra-index-url|find-links)/d' "$out"
}
# The thin client alone (no MLX, no mflux): CI runs the client tests in it.
compile requirements/linux-thin.txt x86_64-manylinux_2_35 requirements/overrides-linux-cpu.txt dev
compile requirements/linux-cpu.txt x86_64-manylinux_2_35 requirements/overrides-linux-cpu.txt daemon cluster dev
compile requirements/linux-cuda.txt x86_64-manylinux_2_35 requirements/overrides-no-torch.txt daemon cuda dev
compile requirements/macos-arm64.txt aarch64-apple-darwin requirements/overrides-no-torch.txt daemon cluster dev
echo "locks written"
