#!/usr/bin/env bash
# KiCI quickstart: installs KiCI into .venv (if needed), then
#  1. the authoring loop on a sample repository in a temporary directory: kici init → compile → preview →
#     run local;
#  2. the real thing on the embedded default (SQLite, no configuration): an orchestrator and an agent are
#     started, the repository is registered as a `git` source with its post-commit hook, a commit starts
#     a run, and `kici-admin runs watch` shows it live until it succeeds. The web dashboard's URL and the
#     token to sign in with are printed (open it while the run goes on).
# Unattended. Everything it started is stopped and the temporary directory removed when it ends (also on
# Ctrl-C) — unless `--keep` is given: then orchestrator and agent keep running and it prints how to use
# and stop them.
set -euo pipefail
cd "$(dirname "$0")/.."
keep=false
[ "${1:-}" = "--keep" ] && keep=true
. scripts/lib/venv.sh
ensure_venv ""
BIN="$PWD/.venv/bin"
KICI="$BIN/kici"

demo=$(mktemp -d "${TMPDIR:-/tmp}/kici-quickstart-XXXXXX")
pids=()
cleanup() {
  local pid
  for pid in "${pids[@]}"; do kill "$pid" 2>/dev/null || true; done
  for pid in "${pids[@]}"; do
    for _ in $(seq 1 100); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
    kill -9 "$pid" 2>/dev/null || true
  done
  rm -rf "$demo"
}
trap 'cleanup' EXIT
trap 'exit 130' INT TERM
step() { printf '\n\033[1m== %s\033[0m\n' "$*"; }

step "a sample repository in $demo/repo"
mkdir "$demo/repo"
cd "$demo/repo"
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
    if ctx.secrets.has("DEMO_TOKEN"):  # from .kici/.secrets in local runs
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

step "the real thing: an orchestrator (embedded SQLite, data in $demo/orchestrator)"
port=$("$BIN/python" -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
url="http://127.0.0.1:$port"
admin_token="kici_quickstart_$("$BIN/python" -c 'import secrets; print(secrets.token_hex(24))')"
env -u KICI_DATABASE_URL KICI_PORT="$port" KICI_DATA_DIR="$demo/orchestrator" \
  KICI_BOOTSTRAP_ADMIN_TOKEN="$admin_token" KICI_LOG_FORMAT=json \
  "$BIN/kici-orchestrator" 2> "$demo/orchestrator.log" &
pids+=($!)
ready() { "$BIN/python" -c 'import sys, urllib.request; urllib.request.urlopen(sys.argv[1], timeout=2)' "$url/ready" 2>/dev/null; }
for _ in $(seq 1 300); do
  ready && break
  kill -0 "${pids[0]}" 2>/dev/null || { cat "$demo/orchestrator.log"; exit 1; }
  sleep 0.1
done
ready || { echo "the orchestrator did not become ready"; cat "$demo/orchestrator.log"; exit 1; }
echo "orchestrator ready at $url"
echo "Dashboard: $url/  (sign in with the token $admin_token)"
export KICI_ADMIN_URL="$url" KICI_ADMIN_TOKEN="$admin_token"
ADMIN="$BIN/kici-admin"

step "an agent (labels: linux), connecting out to the orchestrator"
root_steps=()
step_user=()
if [ "$(id -u)" -eq 0 ]; then
  # An agent running as root runs steps as an unprivileged user, which could not even read this demo's
  # private temp dir: for the demo, steps run as root, allowed explicitly on the agent's token. A real
  # deployment creates a step user instead (docs/operator/agent/getting-started.md).
  echo "(running as root: this demo's agent runs its steps as root, allowed by its token's --allow-root-steps)"
  root_steps=(--allow-root-steps)
  step_user=(KICI_AGENT_STEP_USER=root)
fi
agent_token=$("$ADMIN" agent-token create --name quickstart --labels linux "${root_steps[@]}" --json \
  | "$BIN/python" -c 'import json, sys; print(json.load(sys.stdin)["token"])')
env "${step_user[@]}" KICI_ORCHESTRATOR_URL="$url" KICI_AGENT_TOKEN="$agent_token" KICI_AGENT_ID=quickstart-agent \
  KICI_LABELS=linux KICI_WORK_DIR="$demo/agent" "$BIN/kici-agent" 2> "$demo/agent.log" &
pids+=($!)
for _ in $(seq 1 300); do
  "$ADMIN" agents list --connected 2>/dev/null | grep -q quickstart-agent && break
  kill -0 "${pids[1]}" 2>/dev/null || { cat "$demo/agent.log"; exit 1; }
  sleep 0.1
done
"$ADMIN" agents list

step "register the repository as a git source, with its post-commit hook"
"$ADMIN" source add git sample --url "$demo/repo" --repo acme/sample
"$ADMIN" source hook sample > .git/hooks/post-commit
chmod 700 .git/hooks/post-commit

step "commit: the hook notifies the orchestrator, which dispatches to the agent"
echo "# sample" > README.md
git add -A && git commit -q -m "add a README"
sha=$(git rev-parse HEAD)
run_id=""
for _ in $(seq 1 300); do
  run_id=$("$ADMIN" runs list --json | "$BIN/python" -c '
import json, sys
runs = [r for r in json.load(sys.stdin) if r["sha"] == sys.argv[1]]
print(runs[0]["id"] if runs else "")' "$sha")
  [ -n "$run_id" ] && break
  sleep 0.1
done
[ -n "$run_id" ] || { echo "no run appeared"; cat "$demo/orchestrator.log"; exit 1; }

step "kici-admin runs watch $run_id"
"$ADMIN" runs watch "$run_id"
"$ADMIN" runs jobs "$run_id"

step "done"
echo "Dashboard: $url/runs/$run_id — sign in at $url/login with the token:"
echo "  $admin_token"
echo "  (an owner token; \`kici-admin token create --name NAME --role viewer\` makes read-only ones for a team)"
echo "The orchestrator's API is at $url/api/v1/admin (schema: $url/openapi.json), e.g.:"
echo "  KICI_ADMIN_URL=$url KICI_ADMIN_TOKEN=$admin_token $ADMIN runs list"
echo "  curl -H 'Authorization: Bearer $admin_token' $url/api/v1/admin/runs"
echo "Metrics: $url/metrics    Health: $url/health"
if $keep; then
  trap - EXIT
  echo
  echo "The dashboard stays up at $url/ (token above)."
  echo "Still running (--keep): orchestrator pid ${pids[0]}, agent pid ${pids[1]}; sample repository $demo/repo."
  echo "Commit in $demo/repo to start more runs. Stop everything with:"
  echo "  kill ${pids[0]} ${pids[1]} && rm -rf $demo"
else
  echo "Stopping the orchestrator and the agent and removing $demo (run with --keep to leave them running)."
fi
echo "Next: docs/user/getting-started.md and docs/operator/index.md"
