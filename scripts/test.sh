#!/usr/bin/env bash
# Creates .venv if missing, installs KiCI with its test extras, then runs ruff, mypy (strict on engine/,
# orchestrator/, admin/ and agent/) and the whole pytest suite. Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/lib/venv.sh
ensure_venv test

echo "== ruff"
.venv/bin/ruff check src tests bench
echo "== mypy (strict: engine, orchestrator, admin, agent)"
.venv/bin/mypy
echo "== pytest"
set +e
.venv/bin/python -m pytest "$@"
rc=$?
set -e
if [ "$rc" -eq 5 ]; then
    echo "pytest collected no tests: treating as failure" >&2
    exit 1
fi
exit "$rc"
