"""Stopping helper servers that were started in sessions of their own (start_new_session):
each one's whole process group, politely first."""

from __future__ import annotations

import os
import signal
import subprocess
import time


def stop_group(*procs: subprocess.Popen, timeout: float) -> None:
    """SIGTERM the process group of every one of `procs` at once, SIGKILL the groups still
    running `timeout` s later; reap them. One deadline for all: stopping N servers that each
    take the whole timeout costs it once, not N times."""
    running = [p for p in procs if p.poll() is None]
    for proc in running:
        os.killpg(proc.pid, signal.SIGTERM)
    deadline = time.monotonic() + timeout
    for proc in running:
        try:
            proc.wait(timeout=max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
