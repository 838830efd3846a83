"""The KiCI agent (`kici-agent`): connects out to the orchestrator, takes jobs, clones, runs each job's
steps in a runner child process, and streams status and logs back. See DESIGN.md §6."""
