"""Help texts shared by commands (kept free of heavy imports: `kici --help` stays fast)."""

EVENT_HELP = """\b
EVENT is one of:
  push                       a push to --branch (default: the current branch)
  tag                        a tag push (--tag, default v0.0.0-local)
  pr[:ACTION]                open (default), sync, close, reopen, or any GitHub action (labeled, …);
                             --branch is the target branch, --source-branch the head branch
  dispatch[:TYPE]            a manual dispatch; --input K=V for its inputs
  schedule[:CRON]            a scheduled run
  comment[:ACTION]           an issue comment (created by default); --payload for the body
  review[:ACTION], review_comment[:ACTION], release[:ACTION], create[:branch|tag], delete[:branch|tag],
  status[:STATE], workflow_run[:ACTION], fork, star[:ACTION], watch[:ACTION]
  kici_event:NAME            an event emitted by another workflow (--payload for its payload)
  workflow_complete[:STATUS] / job_complete[:STATUS]
  generic_webhook:SOURCE[:EVENT]
  webhook:NAME[:ACTION]      a raw provider event for catch-all webhook() triggers
"""
