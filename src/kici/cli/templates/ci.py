"""CI for this repository. Edit, then run `kici compile` and commit .kici/kici.lock.json.

Try it locally with `kici preview push` and `kici run local push`.
"""

from kici import Context, job, pr, push, step, workflow


@step
def hello(ctx: Context) -> dict[str, str]:
    ctx.log.info(f"running {ctx.workflow}/{ctx.job} for a {ctx.event.type} event")
    result = ctx.sh("git log -1 --oneline || true")
    return {"head": result.stdout.strip()}


check = job("check", steps=[hello, step("python", "python3 --version")])

ci = workflow(
    "ci",
    on=[push(branches=["main"]), pr(target=["main"])],
    jobs=[check],
)
