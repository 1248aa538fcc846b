"""A `forward` client for tests: `python -c CLIENT MODULE ARGS...` hands `python -m MODULE
ARGS...` to the stage server named in its environment (any module: the server runs what it
is sent as `__main__`) and exits with the run's status, without importing torch itself."""

from __future__ import annotations

import textwrap

CLIENT = textwrap.dedent("""
    import os, sys
    from stages._forward import ENV_SOCKET, exit_like, forward
    status = forward(sys.argv[1], sys.argv[2:], os.environ[ENV_SOCKET])
    if status is None:
        sys.exit("not served")
    exit_like(status)
""")
