#!/usr/bin/env bash
# Run the whole suite in the full venv, then the thin-client rooms in a venv without MLX or mflux
# (EASEL_PROFILE=thin): the client must work, and be tested, without the model stack.
# pytest exits 5 when it collects nothing: that is a failure here too, because a suite that ran no
# test proves nothing.
set -uo pipefail
cd "$(dirname "$0")/.."
VENV=${EASEL_VENV:-.venv}
THIN_ROOMS=(tests/architecture tests/wire tests/lorafile tests/packs tests/batch tests/lora_tools tests/dataset
            tests/telemetry tests/cli)

run() {  # label python pytest-args...
    local label=$1 py=$2; shift 2
    echo "== $label"
    PYTHONUNBUFFERED=1 "$py" -m pytest -q -p no:cacheprovider "$@"
    local rc=$?
    if [ $rc -eq 5 ]; then echo "$label: pytest collected no tests" >&2; return 1; fi
    return $rc
}

run "full suite ($VENV)" "$VENV/bin/python" "$@"
full=$?
thin=0
if [ $# -eq 0 ] && [ "$(uname -s)" = "Linux" ]; then
    rooms=()
    for r in "${THIN_ROOMS[@]}"; do [ -d "$r" ] && rooms+=("$r"); done
    EASEL_PROFILE=thin bash scripts/setup.sh || exit 1
    run "thin client (.venv-thin: no MLX, no mflux)" .venv-thin/bin/python -m "not mlx" "${rooms[@]}"
    thin=$?
fi
[ $full -eq 0 ] && [ $thin -eq 0 ]
