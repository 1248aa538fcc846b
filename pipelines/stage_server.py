"""A warm stage server for the length of one command: stage processes fork from a process
that has already imported torch, MLflow and every stage, instead of each paying for those
imports (5-7 s a stage on a loaded 2-core machine; `dvc repro` starts one process per stage).

    python -m pipelines.stage_server -- dvc repro

DVC still runs every stage as the `python -m stages.X ...` its dvc.yaml says and still
hashes, caches and locks it; only the Python inside changes hands (stages/_forward.py): the
stage process sends its argv, working directory, environment and standard streams over a
Unix socket, the server forks, and the fork runs the module as `__main__` exactly as
`python -m` would. The stage process relays SIGINT/SIGTERM to the fork and exits with its
status; if the stage process dies (`kill -9`), its fork is killed too.

The fork starts from the server's pristine state each time, never from an earlier stage's.
That is safe because the server has run no torch op: no OpenMP pool, no CUDA context exists
to be inherited. Torch's thread count, fixed at import, is set again from the stage's own
OMP_NUM_THREADS. The server only serves stages of the checkout it imported; any other
(a `dvc exp` temp workspace) runs in its own process as before. The Prefect flows start one
with `serving(root)`: the pipeline flow for its repo, the experiment flow for its workspace
copy (whose code the server then imports).
"""

from __future__ import annotations

import argparse
import atexit
import importlib
import json
import os
import pkgutil
import runpy
import select
import signal
import socket
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from pipelines.process_group import stop_group
from stages._forward import ENV_ROOT, ENV_SOCKET, HEADER, ROOT

THREAD_VARS = ("OMP_NUM_THREADS", "MKL_NUM_THREADS")


def preload() -> int:
    """Import what stages import (torch, MLflow's client, every stage module); returns torch's
    default thread count (with OMP_NUM_THREADS unset: torch's own)."""
    import torch

    import stages

    for mod in pkgutil.iter_modules(stages.__path__):
        importlib.import_module(f"stages.{mod.name}")
    # Also what stages import at their first use, once here instead of once per stage
    # process (seconds measured in a fork of this process): MLflow (when they log), the
    # sqlite store behind the default tracking URI (0.7, every stage), onnx (0.6, export),
    # torch._dynamo, which a stage's first optimizer imports (1.1, every training stage).
    # Imports only: no thread or connection may exist at fork.
    import mlflow  # noqa: F401
    import mlflow.store.tracking.sqlalchemy_store  # noqa: F401
    import mlflow.tracking  # noqa: F401
    import onnx  # noqa: F401
    import torch._dynamo  # noqa: F401

    return torch.get_num_threads()


def _recv_exact(conn: socket.socket, n: int) -> bytes:
    data = bytearray()
    while len(data) < n:
        chunk = conn.recv(n - len(data))
        if not chunk:
            raise ConnectionError("the stage process closed its socket mid-request")
        data += chunk
    return bytes(data)


def run_request(request: dict, fds: list[int], default_threads: int) -> int:
    """In the fork: become the stage process the request describes and run its module."""
    import torch

    for target, fd in enumerate(fds):
        os.dup2(fd, target)
        os.close(fd)
    os.chdir(request["cwd"])
    os.environ.clear()
    os.environ.update(request["env"])
    threads = os.environ.get("OMP_NUM_THREADS", "")
    torch.set_num_threads(int(threads) if threads.isdigit() and int(threads) > 0
                          else default_threads)
    sys.stdout.reconfigure(line_buffering=os.isatty(1))
    signal.signal(signal.SIGINT, signal.default_int_handler)
    for s in (signal.SIGTERM, signal.SIGHUP, signal.SIGQUIT, signal.SIGCHLD):
        signal.signal(s, signal.SIG_DFL)
    sys.path[0] = request["cwd"]
    module = request["module"]
    sys.argv = [module, *request["args"]]  # runpy puts the module's file in argv[0]
    sys.modules.pop(module, None)  # as under `python -m`: the module runs as __main__ only
    try:
        runpy.run_module(module, run_name="__main__", alter_sys=True)
        status = 0
    except SystemExit as e:
        if e.code is None or isinstance(e.code, int):
            status = e.code or 0
        else:
            print(e.code, file=sys.stderr)
            status = 1
    except KeyboardInterrupt:
        traceback.print_exc()
        status = -signal.SIGINT
    except BaseException:  # noqa: BLE001 - reported as Python reports an uncaught error
        traceback.print_exc()
        status = 1
    atexit._run_exitfuncs()  # what interpreter shutdown would run (MLflow ends its runs there)
    sys.stdout.flush()
    sys.stderr.flush()
    return status


def handle(conn: socket.socket, default_threads: int) -> None:
    """In a fork per request: fork the stage, relay the signals the stage process sends,
    kill the stage if that process goes away, and send back the stage's exit status."""
    header, fds, _flags, _addr = socket.recv_fds(conn, HEADER.size, 3)
    (length,) = HEADER.unpack(header)
    request = json.loads(_recv_exact(conn, length))
    signal.signal(signal.SIGCHLD, signal.SIG_DFL)
    pid = os.fork()
    if pid == 0:
        conn.close()
        status = 1
        try:
            status = run_request(request, fds, default_threads)
        finally:
            if status < 0:  # die of the signal, as Python does after a KeyboardInterrupt
                signal.signal(-status, signal.SIG_DFL)
                os.kill(os.getpid(), -status)
            os._exit(status if status >= 0 else 128 - status)
    for fd in fds:
        os.close(fd)
    pidfd = os.pidfd_open(pid)
    buf = b""
    while True:
        ready, _, _ = select.select([conn, pidfd], [], [])
        if pidfd in ready:
            break
        chunk = conn.recv(4096)
        if not chunk:  # the stage process is gone: nobody waits for this run any more
            os.kill(pid, signal.SIGKILL)
            break
        buf += chunk
        *lines, buf = buf.split(b"\n")
        for line in lines:
            if line.startswith(b"sig "):
                os.kill(pid, int(line.split()[1]))
    _, wait_status = os.waitpid(pid, 0)
    code = os.waitstatus_to_exitcode(wait_status)  # negative: killed by that signal
    try:
        conn.sendall(f"exit {code}\n".encode())
    except OSError:
        pass


def serve(path: str, parent: int | None = None) -> None:
    """Bind `path` first (so stage processes queue on it while the imports run), import,
    then fork a handler per connection until SIGTERM, or until the process `parent` is gone
    (checked every second: a server outliving a killed flow run would otherwise wait on its
    socket forever)."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.bind(path)
    sock.listen(64)
    for var in THREAD_VARS:  # torch's default then is what a stage started cold gets
        os.environ.pop(var, None)
    default_threads = preload()
    signal.signal(signal.SIGCHLD, signal.SIG_IGN)  # handlers are reaped by the kernel
    while parent is None or os.getppid() == parent:
        if not select.select([sock], [], [], 1.0)[0]:
            continue
        conn, _ = sock.accept()
        if os.fork() == 0:
            sock.close()
            try:
                handle(conn, default_threads)
            finally:
                os._exit(0)
        conn.close()


@contextmanager
def serving(root: Path) -> Iterator[dict[str, str]]:
    """A warm server for the stages of the checkout at `root` while the block runs (its own
    code: a sweep's workspace copy gets a server of its own); yields the environment entries
    that hand a stage to it, or none if it did not start (stages then start cold)."""
    with tempfile.TemporaryDirectory(prefix="chipprune-stages-") as tmp:
        path = str(Path(tmp) / "socket")
        server = subprocess.Popen([sys.executable, "-m", "pipelines.stage_server", "--serve", path,
                                   "--parent", str(os.getpid())], cwd=root, start_new_session=True)
        try:
            deadline = time.monotonic() + 30
            while not os.path.exists(path) and server.poll() is None:
                if time.monotonic() > deadline:
                    break
                time.sleep(0.02)
            if os.path.exists(path):
                yield {ENV_SOCKET: path, ENV_ROOT: str(Path(root).resolve())}
            else:
                print("warning: the stage server did not start; stages start cold",
                      file=sys.stderr)
                yield {}
        finally:
            stop_group(server, timeout=10)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="pipelines.stage_server", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--serve", metavar="SOCKET", help=argparse.SUPPRESS)
    ap.add_argument("--parent", type=int, help=argparse.SUPPRESS)
    ap.add_argument("command", nargs=argparse.REMAINDER, help="-- then the command to run")
    args = ap.parse_args(argv)
    if args.serve:
        serve(args.serve, args.parent)
        return 0
    command = args.command[1:] if args.command[:1] == ["--"] else args.command
    if not command:
        ap.error("give the command to run after --")
    with serving(ROOT) as env:
        return subprocess.call(command, env={**os.environ, **env})


if __name__ == "__main__":
    sys.exit(main())
