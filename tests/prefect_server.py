"""A real `prefect server start` on 127.0.0.1 for tests: a free port, its own PREFECT_HOME,
analytics off; yields the API URL and the environment its clients need; stopped (its whole
process group) on exit, whatever the outcome."""

from __future__ import annotations

import os
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from pipelines.mlflow_server import free_port
from pipelines.process_group import stop_group

BIN = Path(sys.executable).parent


def wait_healthy(url: str, server: subprocess.Popen, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert server.poll() is None, f"prefect server exited with {server.returncode}"
        try:
            with urllib.request.urlopen(f"{url}/health", timeout=2) as response:
                if response.status == 200:
                    return
        except OSError:
            pass
        time.sleep(0.5)
    raise TimeoutError(f"prefect server not healthy after {timeout} s")


@contextmanager
def prefect_server(tmp: Path, **settings: str) -> Iterator[tuple[str, dict[str, str]]]:
    """`settings`: extra PREFECT_* variables for the server and its clients."""
    port = free_port()
    url = f"http://127.0.0.1:{port}/api"
    env = {
        **os.environ,
        "PREFECT_HOME": str(tmp / "prefect-home"),
        "PREFECT_API_URL": url,
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        "DO_NOT_TRACK": "1",
        "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}",
        **settings,
    }
    log = (tmp / "prefect-server.log").open("w")
    server = subprocess.Popen(
        [str(BIN / "prefect"), "server", "start", "--host", "127.0.0.1", "--port", str(port),
         "--no-ui"],
        env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
    )
    try:
        wait_healthy(url, server, timeout=90)
        yield url, env
    finally:
        stop_group(server, timeout=20)
        log.close()
