#!/usr/bin/env bash
# Run the whole suite. pytest exits 5 when it collects nothing: that is a failure here too,
# because a suite that ran no test proves nothing.
set -uo pipefail
cd "$(dirname "$0")/.."
VENV=${EASEL_VENV:-.venv}
PYTHONUNBUFFERED=1 "$VENV/bin/python" -m pytest -q -p no:cacheprovider "$@"
rc=$?
if [ $rc -eq 5 ]; then echo "pytest collected no tests" >&2; exit 1; fi
exit $rc
