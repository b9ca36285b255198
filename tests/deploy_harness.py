"""The deployment test's process helpers: they are product code now (simulations/processes.py)."""

from simulations.processes import BIN, Processes, alive, descendants, free_port, start_time, wait_for  # noqa: F401
