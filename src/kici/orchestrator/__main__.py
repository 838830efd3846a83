"""`python -m kici.orchestrator` = `kici-orchestrator`."""

from kici.orchestrator.main import main

main()
