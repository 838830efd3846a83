"""`kici-admin`: the command line for the orchestrator's admin REST API (talks HTTP only; imports nothing
from the orchestrator)."""
