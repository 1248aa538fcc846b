"""A local MLflow tracking server for the length of one command, so the command's stage
processes log through HTTP instead of each opening the sqlite store themselves: importing
and starting MLflow's SQLAlchemy store costs about a second per process, the REST client
almost nothing, and `dvc repro` of the default grid starts some 60 stage processes.

    python -m pipelines.mlflow_server [--store sqlite:///ABS/mlflow.db] [--port 0] -- dvc repro

The server listens on 127.0.0.1 only, on a free port unless --port is given, and writes to
the same store the stages would use without it (`chipprune.reporting.tracking.tracking_uri()`);
artifacts still go where each experiment's artifact location says. It is stopped when the
command ends, whatever the outcome; the exit status is the command's.
"""

from __future__ import annotations

import argparse
import os
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager

from chipprune.reporting.tracking import tracking_uri
from pipelines.process_group import stop_group


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _healthy(url: str) -> bool:
    try:
        with urllib.request.urlopen(f"{url}/health", timeout=2) as r:
            return r.status == 200
    except (urllib.error.URLError, OSError):
        return False


@contextmanager
def local_server(store: str, port: int = 0, timeout: float = 90.0) -> Iterator[str]:
    """Start `mlflow server` on 127.0.0.1 for `store`; yield its URL once /health answers;
    stop it (its whole process group) on exit."""
    if store.startswith(("http://", "https://")):
        raise ValueError(f"{store}: already a tracking server; give a database store")
    port = port or free_port()
    url = f"http://127.0.0.1:{port}"
    log = tempfile.TemporaryFile()
    # No server-side job execution: it runs GenAI jobs we never submit, as three huey
    # consumer processes polling the store, about half a core on a 2-core machine.
    env = {**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "mlflow", "server", "--backend-store-uri", store,
         "--host", "127.0.0.1", "--port", str(port), "--workers", "1"],
        stdout=log, stderr=subprocess.STDOUT, start_new_session=True, env=env,
    )
    try:
        deadline = time.monotonic() + timeout
        while not _healthy(url):
            if proc.poll() is not None or time.monotonic() > deadline:
                log.seek(0)
                tail = log.read().decode(errors="replace").strip().splitlines()[-5:]
                why = "exited" if proc.poll() is not None else f"not healthy after {timeout:.0f} s"
                raise RuntimeError(f"MLflow server for {store} on {url} {why}: " + " | ".join(tail))
            time.sleep(0.3)
        yield url
    finally:
        stop_group(proc, timeout=15)
        log.close()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="pipelines.mlflow_server", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--store", default=None, help="database store (default: the stages' own)")
    ap.add_argument("--port", type=int, default=0, help="default: a free port")
    ap.add_argument("command", nargs=argparse.REMAINDER, help="-- then the command to run")
    args = ap.parse_args(argv)
    command = args.command[1:] if args.command[:1] == ["--"] else args.command
    if not command:
        ap.error("give the command to run after --")
    store = args.store or tracking_uri()
    if store.startswith(("http://", "https://")):  # MLFLOW_TRACKING_URI names a server already
        return subprocess.call(command)
    try:
        with local_server(store, args.port) as url:
            print(f"MLflow tracking server {url} for this run", flush=True)
            return subprocess.call(command, env={**os.environ, "MLFLOW_TRACKING_URI": url})
    except (RuntimeError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
