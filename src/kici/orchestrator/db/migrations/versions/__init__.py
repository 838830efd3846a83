"""Numbered migrations: `NNNN_what.py`, revision id `NNNN`, each naming the previous one."""
