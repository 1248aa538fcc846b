"""Stopping a helper server that was started in a session of its own (start_new_session):
its whole process group, politely first."""

from __future__ import annotations

import os
import signal
import subprocess


def stop_group(proc: subprocess.Popen, timeout: float) -> None:
    """SIGTERM `proc`'s process group, SIGKILL it after `timeout` s; reap `proc`."""
    if proc.poll() is not None:
        return
    os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
