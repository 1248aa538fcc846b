"""The client half of the warm stage server (`pipelines.stage_server`): a `python -m stages.X`
process that finds a server named in its environment hands its argv, working directory,
environment and standard streams to it, relays the signals it gets, and exits with the
status of the run the server forked for it. Standard library only, because the point is
that this process never imports torch: a stage process otherwise spends seconds on imports
before its first useful line, and `dvc repro` starts one per stage.

Anything that keeps the handover from happening (no server named, a server of another
checkout, one that is gone) leaves the stage to run in this process as it always did.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import struct
import sys
from pathlib import Path

ENV_SOCKET = "CHIPPRUNE_STAGE_SERVER"        # the server's Unix socket
ENV_ROOT = "CHIPPRUNE_STAGE_SERVER_ROOT"     # the checkout whose code the server imported
HEADER = struct.Struct("!I")                 # the request's length, sent with the three fds
RELAYED = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP, signal.SIGQUIT)
ROOT = Path(__file__).resolve().parent.parent


def invoked_module() -> str | None:
    """The module `python -m` is locating right now (while its package imports), else None:
    sys.argv[0] is "-m" only in that phase, and sys.orig_argv keeps the module's name."""
    if sys.argv[:1] != ["-m"]:
        return None
    orig = list(getattr(sys, "orig_argv", ()))
    for i, arg in enumerate(orig[1:], start=1):
        if arg == "-m":
            return orig[i + 1] if i + 1 < len(orig) else None
        if arg.startswith("-m"):
            return arg[2:]
    return None


def server_for_this_checkout(env=os.environ) -> str | None:
    """The socket to hand this stage to, or None: no server, a server that imported another
    checkout's code (a `dvc exp` temp workspace, a sweep copy: its code may differ), or a
    rank of a multi-process run (started by a launcher that waits for it)."""
    path = env.get(ENV_SOCKET)
    if not path or "WORLD_SIZE" in env:
        return None
    try:
        if Path(env.get(ENV_ROOT, "")).resolve() != ROOT:
            return None
    except OSError:
        return None
    return path


def _read_line(sock: socket.socket, buf: bytearray) -> str | None:
    while b"\n" not in buf:
        chunk = sock.recv(4096)
        if not chunk:
            return None
        buf += chunk
    line, _, rest = bytes(buf).partition(b"\n")
    buf[:] = rest
    return line.decode()


def forward(module: str, args: list[str], path: str) -> int | None:
    """Run `module args` in the server at `path`; its exit status (negative: killed by that
    signal), or None when no server answers there (the caller runs the stage itself)."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.connect(path)
    except OSError:
        sock.close()
        return None
    request = json.dumps({"module": module, "args": args, "cwd": os.getcwd(),
                          "env": dict(os.environ)}).encode()

    def relay(signum, _frame):
        try:
            sock.sendall(f"sig {signum}\n".encode())
        except OSError:
            pass

    # Once the request is out the run may start at once, so a signal can come before this
    # process would otherwise have its relay in place (and kill it, leaving the run). Hold
    # the signals until the request is sent and the relay installed: one that came in the
    # meantime is delivered, and relayed, on unblocking (never written into the request).
    held = signal.pthread_sigmask(signal.SIG_BLOCK, RELAYED)
    try:
        try:
            socket.send_fds(sock, [HEADER.pack(len(request))], [0, 1, 2])
            sock.sendall(request)
        except OSError:
            sock.close()
            return None
        for s in RELAYED:
            signal.signal(s, relay)
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, held)
    buf = bytearray()
    while True:
        line = _read_line(sock, buf)
        if line is None:  # the server went away mid-run
            print(f"error: the stage server at {path} stopped during {module}", file=sys.stderr)
            return 1
        if line.startswith("exit "):
            return int(line.split()[1])


def exit_like(status: int) -> None:
    """Leave with `status` as the shell reports it: a negative status re-raises its signal."""
    sys.stdout.flush()
    sys.stderr.flush()
    if status < 0:
        signal.signal(-status, signal.SIG_DFL)
        os.kill(os.getpid(), -status)
    os._exit(status if status >= 0 else 128 - status)


def hand_over_if_served() -> None:
    """Called while the `stages` package imports: when this process is `python -m stages.X`
    and a server for this checkout runs, the server runs the stage and this process exits
    with its status; otherwise return and let the stage run here."""
    module = invoked_module()
    if not module or not module.startswith("stages."):
        return
    path = server_for_this_checkout()
    if path is None:
        return
    status = forward(module, sys.argv[1:], path)
    if status is not None:
        exit_like(status)
