"""The job runner: one child process per job, `python -m kici.runner --protocol-fd N`.

The parent (`kici run local` now, the agent later) starts it through `kici.runner.client.RunnerProcess`,
which writes a `JobSpec` line to its stdin and reads `kici.engine.runner_protocol` messages from the
protocol fd. The runner checks the lock file's hash (drift gate), imports the workflow, runs the job's
rules, steps and hooks with their timeouts, retries and cancel, turns everything the job writes into log
lines, kills whatever the job left running, and reports a `JobResult`.

Start-up is part of every job's latency, so the runner imports only the standard library, `kici.sdk`,
`kici.engine` modules that do not need pydantic, and the workflow: no CLI, HTTP or database library, and
not even pydantic (`wire` speaks the protocol's JSON by hand; `ctx.event` is built lazily).

Modules: `__main__` (process set-up and the way out), `job_runner` (the job), `calls` (running one
callable so it can be stopped), `context` (`ctx`), `shell` (`ctx.sh`), `env_files` (`$KICI_ENV`,
`$KICI_PATH`), `stdio` (fds 1/2 → log lines), `proctree` (process trees via /proc), `reaper` (child
subreaper), `wire` (protocol, runner side) and `client` (protocol, parent side).
"""
