"""stop_group: every group asked to stop at once, the ones that ignore it killed."""

from __future__ import annotations

import subprocess
import sys

from pipelines.process_group import stop_group

STUBBORN = "import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); print(1, flush=True); time.sleep(60)"
POLITE = "import time; print(1, flush=True); time.sleep(60)"


def _start(code: str) -> subprocess.Popen:
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE,
                            start_new_session=True)
    proc.stdout.readline()  # its handler is installed
    return proc


def test_polite_groups_end_on_sigterm_stubborn_ones_are_killed():
    polite, stubborn, other = _start(POLITE), _start(STUBBORN), _start(STUBBORN)
    stop_group(stubborn, polite, other, timeout=1)
    assert polite.returncode == -15
    assert stubborn.returncode == other.returncode == -9
    for proc in (polite, stubborn, other):
        proc.stdout.close()
    stop_group(polite, timeout=1)  # an ended one is left alone
