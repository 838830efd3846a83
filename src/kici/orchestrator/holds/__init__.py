"""Held work and its approvals: runs of untrusted code held by a trust policy, and jobs gated by their
deployment environment. Both are decided by the same commands (`kici-admin held …`, the `held` REST routes,
`/kici approve` comments), which go through the gates registered in `gates.py`."""
