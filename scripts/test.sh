#!/usr/bin/env bash
# Creates .venv if missing, installs KiCI with its test extras, then runs ruff, mypy (strict on engine/,
# orchestrator/, admin/ and agent/) and the whole pytest suite (in KICI_TEST_WORKERS parallel workers, default
# 4). Extra arguments go to pytest. Installs the
# distribution's Chromium (apt-get, when root) if /usr/bin/chromium is missing, for the browser tests, and
# bubblewrap (`bwrap`) for the agent's KICI_SANDBOX=bwrap tests.
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/lib/venv.sh
ensure_venv test

echo "== ruff"
.venv/bin/ruff check src tests bench
echo "== mypy (strict: engine, orchestrator, admin, agent)"
.venv/bin/mypy
# The dashboard's browser tests (tests/browser) drive the distribution's Chromium, never a downloaded one.
if [ ! -x /usr/bin/chromium ]; then
    if [ "$(id -u)" = "0" ] && command -v apt-get >/dev/null; then
        echo "== /usr/bin/chromium is missing: installing the distribution's chromium (apt-get) for the browser tests"
        apt-get update -q
        DEBIAN_FRONTEND=noninteractive apt-get install -y -q chromium
    else
        echo "== /usr/bin/chromium is missing and this is not root with apt-get: install the 'chromium' package," \
             "or the browser tests (tests/browser) fail" >&2
    fi
fi
# The agent's bwrap sandbox tests (tests/integration/agent/test_bwrap.py) run the distribution's bubblewrap.
if ! command -v bwrap >/dev/null; then
    if [ "$(id -u)" = "0" ] && command -v apt-get >/dev/null; then
        echo "== bwrap is missing: installing the distribution's bubblewrap (apt-get) for the sandbox tests"
        apt-get update -q
        DEBIAN_FRONTEND=noninteractive apt-get install -y -q bubblewrap
    else
        echo "== bwrap is missing and this is not root with apt-get: install the 'bubblewrap' package," \
             "or the bwrap sandbox tests are skipped" >&2
    fi
fi
# The suite runs in KICI_TEST_WORKERS worker processes (pytest-xdist; 0 = in this process). Most tests wait
# on real processes, sockets and databases rather than the CPU, so four workers on two cores cut the wall
# time about fourfold. `worksteal` rebalances the long end-to-end tests across workers as they finish.
workers="${KICI_TEST_WORKERS:-4}"
echo "== pytest ($workers workers)"
set +e
.venv/bin/python -m pytest -n "$workers" --dist worksteal "$@"
rc=$?
set -e
if [ "$rc" -eq 5 ]; then
    echo "pytest collected no tests: treating as failure" >&2
    exit 1
fi
exit "$rc"
