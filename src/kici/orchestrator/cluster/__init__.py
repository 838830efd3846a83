"""Several orchestrator processes on one PostgreSQL database.

- `identity`: this process's node id and address (`KICI_NODE_NAME`, `KICI_NODE_ADDRESS`).
- `node.Node`: the node's row in `nodes`, renewed as a lease; the leader lease; taking over the agents
  of nodes whose lease ran out.
- `leadership.Leadership`: whether this node holds the leader duties (sweeps, schedules, retention, the
  reporting outbox) and the fence every write of those duties passes (its term, checked in the write's
  transaction).
- `bus.ClusterBus`: messages between nodes (PostgreSQL LISTEN/NOTIFY, with a polled table as fallback).

With one node (SQLite, the embedded default) all of it runs the same way: one row in `nodes`, this node
always the leader, the bus delivering in-process.
"""
