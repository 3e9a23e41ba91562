#!/usr/bin/env bash
# One set-up for a fresh machine: system libraries, uv, the locked virtual environment.
# Idempotent: a second run only checks. Used by `make demo`, `make test` and CI.
set -euo pipefail
cd "$(dirname "$0")/.."
# EASEL_PROFILE=thin: the client alone (no MLX, no mflux) in .venv-thin, as a thin install has it;
# the test run uses it to prove the client needs neither.
PROFILE=${EASEL_PROFILE:-full}
if [ "$PROFILE" = "thin" ]; then VENV=${EASEL_VENV:-.venv-thin}; else VENV=${EASEL_VENV:-.venv}; fi
PY=${PYTHON:-python3}

say() { printf '[setup] %s\n' "$*"; }

os=$(uname -s)
if [ "$os" = "Linux" ]; then
    lock=requirements/linux-cpu.txt
    [ "${EASEL_CUDA:-0}" = "1" ] && lock=requirements/linux-cuda.txt
    [ "$PROFILE" = "thin" ] && lock=requirements/linux-thin.txt
    # Debian packages: OpenBLAS (MLX's CPU backend is ~25x faster with it) and libpython3.11
    # (the rotel collector binary used by the telemetry tests links against it).
    need=()
    ls /usr/lib/*/libopenblas.so.0 >/dev/null 2>&1 || need+=(libopenblas0-pthread)
    ls /usr/lib/*/libpython3.11.so.1.0 >/dev/null 2>&1 || need+=(libpython3.11)
    if [ ${#need[@]} -gt 0 ]; then
        if command -v apt-get >/dev/null 2>&1; then
            sudo=""; [ "$(id -u)" -ne 0 ] && sudo="sudo"
            say "installing Debian packages: ${need[*]}"
            $sudo apt-get update -qq
            DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq "${need[@]}" >/dev/null
        else
            say "WARNING: cannot install ${need[*]} (no apt-get); CPU renders will be ~20x slower"
        fi
    fi
elif [ "$os" = "Darwin" ]; then
    [ "$PROFILE" = "thin" ] && { echo "the thin profile is locked for Linux only" >&2; exit 1; }
    lock=requirements/macos-arm64.txt
else
    echo "unsupported OS: $os" >&2; exit 1
fi

if ! command -v uv >/dev/null 2>&1 && ! "$PY" -m uv --version >/dev/null 2>&1; then
    say "installing uv"
    "$PY" -m pip install --quiet --disable-pip-version-check uv
fi
UV="uv"; command -v uv >/dev/null 2>&1 || UV="$PY -m uv"

stamp="$VENV/.easel-lock"
want="$(cat "$lock" pyproject.toml | sha256sum | cut -d' ' -f1)"
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ] && [ -x "$VENV/bin/easel" ]; then
    exit 0
fi
say "creating $VENV from $lock"
[ -x "$VENV/bin/python" ] || $UV venv --quiet --python "$PY" "$VENV"
# sync installs exactly the locked set (hashes checked), so the lock's overrides hold.
$UV pip sync --quiet --python "$VENV/bin/python" "$lock"
$UV pip install --quiet --python "$VENV/bin/python" --no-deps -e .
if [ "$os" = "Linux" ] && [ "${EASEL_CUDA:-0}" != "1" ]; then
    bad=$($UV pip list --python "$VENV/bin/python" 2>/dev/null | grep -i -E '^(torch|nvidia-|mlx-cuda)' || true)
    if [ -n "$bad" ]; then echo "CPU install pulled GPU packages: $bad" >&2; exit 1; fi
fi
if [ "$PROFILE" = "thin" ]; then
    bad=$($UV pip list --python "$VENV/bin/python" 2>/dev/null | grep -i -E '^(mlx|mflux|torch)' || true)
    if [ -n "$bad" ]; then echo "the thin install pulled the model stack: $bad" >&2; exit 1; fi
fi
echo "$want" > "$stamp"
say "ready: $VENV"
