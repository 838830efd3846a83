#!/usr/bin/env bash
# KiCI quickstart: installs KiCI into .venv (if needed), then walks through the authoring loop on a
# sample repository in a temporary directory: kici init → compile → preview → run local.
# Unattended; removes the sample repository when it ends (also on Ctrl-C).
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/lib/venv.sh
ensure_venv ""
KICI="$PWD/.venv/bin/kici"

demo=$(mktemp -d "${TMPDIR:-/tmp}/kici-quickstart-XXXXXX")
trap 'rm -rf "$demo"' EXIT
step() { printf '\n\033[1m== %s\033[0m\n' "$*"; }

step "a sample repository in $demo"
cd "$demo"
git init -q -b main
git config user.name "KiCI Quickstart"
git config user.email "quickstart@kici.invalid"
mkdir -p src tests
cat > src/calc.py <<'PY'
def add(a: int, b: int) -> int:
    return a + b
PY
cat > tests/test_calc.py <<'PY'
import sys
sys.path.insert(0, "src")
from calc import add

assert add(2, 3) == 5
print("tests passed")
PY

step "kici init: scaffold .kici/ with an example workflow"
"$KICI" init
cat > .kici/workflows/ci.py <<'PY'
"""Lint, test on two Python versions (a matrix), then report — needs, outputs and secrets in action."""
from kici import Context, job, need, pr, push, step, workflow


@step
def test(ctx: Context) -> dict[str, str]:
    ctx.log.info(f"testing with python {ctx.matrix.py}")
    ctx.sh("python3 tests/test_calc.py")
    return {"python": ctx.matrix.py}


lint = job("lint", steps=[step("compile", "python3 -m py_compile src/calc.py")])
tests = job("test", needs=[lint], matrix={"py": ["3.11", "3.12"]}, steps=[test])


@job("report", needs=[need(tests, when="always")])
def report(ctx: Context) -> None:
    merged = ctx.outputs_of("test")["merged"]
    ctx.log.info(f"tested on: {merged}")
    ctx.log.info(f"the token is {ctx.secrets.get('DEMO_TOKEN')} (masked in every log line)")


ci = workflow("ci", on=[push(branches=["main"]), pr(target=["main"], paths=["src/**", "tests/**"])],
              jobs=[lint, tests, report])
PY
echo 'DEMO_TOKEN=s3cr3t-value' > .kici/.secrets
git add -A && git commit -q -m "add calc and CI"

step "kici compile: write .kici/kici.lock.json"
"$KICI" compile
"$KICI" compile --check

step "kici preview push: what a push to main would run"
"$KICI" preview push --branch main

step "kici preview pr:open --files docs/readme.md: a PR touching only docs"
"$KICI" preview pr:open --branch main --files docs/readme.md

step "kici run local push: run it here, through the same runner agents use"
"$KICI" run local push --branch main

step "done"
echo "The sample repository is removed on exit. Next: docs/user/getting-started.md"
