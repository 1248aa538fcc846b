"""The warm stage server (pipelines/stage_server.py) and its client (stages/_forward.py): a
served `python -m stages.X` never imports torch itself, behaves as the stage run in its own
process would (output, exit status, signals, thread count, identical checkpoints), dies with
its stage process, and falls back to running cold whenever it cannot be served."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch
import yaml

from stages._forward import ENV_ROOT, ENV_SOCKET
from tests.conftest import REPO
from tests.served import CLIENT

pytestmark = pytest.mark.slow(cost=40)  # seconds alone, for test ordering

HELPER = textwrap.dedent("""
    import os, sys, time
    import torch
    what = sys.argv[1]
    if what == "threads":
        print(torch.get_num_threads(), flush=True)
    elif what == "imported":
        print(" ".join(m for m in sys.argv[2:] if m in sys.modules), flush=True)
    elif what == "exit":
        sys.exit(int(sys.argv[2]))
    elif what == "raise":
        raise RuntimeError("boom from the helper")
    elif what == "self-kill":
        os.kill(os.getpid(), 15)
    elif what == "sleep":
        open(sys.argv[2], "w").write(str(os.getpid()))
        try:  # "ready" inside: a SIGINT right after it still lands in the handler
            print("ready", flush=True)
            time.sleep(60)
        except KeyboardInterrupt:
            print("interrupted", flush=True)
            sys.exit(3)
""")

@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """A stage server of this checkout on a socket in a temporary folder, stopped after."""
    path = tmp_path_factory.mktemp("server") / "socket"
    proc = subprocess.Popen([sys.executable, "-m", "pipelines.stage_server", "--serve", str(path)],
                            cwd=REPO, start_new_session=True)
    deadline = time.monotonic() + 30
    while not path.exists():
        assert proc.poll() is None and time.monotonic() < deadline, "server did not bind"
        time.sleep(0.05)
    yield str(path)
    os.killpg(proc.pid, signal.SIGTERM)
    proc.wait(timeout=10)


def served_env(path, **extra):
    env = {k: v for k, v in os.environ.items() if k != "OMP_NUM_THREADS"}
    return {**env, ENV_SOCKET: path, ENV_ROOT: str(REPO), "PYTHONPATH": str(REPO), **extra}


@pytest.fixture
def helper(tmp_path):
    (tmp_path / "helper_mod.py").write_text(HELPER)
    return tmp_path


def client(args, cwd, env, **kw):
    """`forward` from a process of its own (it installs signal handlers)."""
    return subprocess.Popen([sys.executable, "-c", CLIENT, *args], cwd=cwd, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **kw)


def test_exit_status_output_and_errors_pass_through(server, helper):
    env = served_env(server)
    p = client(["helper_mod", "exit", "7"], helper, env)
    _, err = p.communicate(timeout=60)
    assert p.returncode == 7 and "not served" not in err
    p = client(["helper_mod", "raise"], helper, env)
    _, err = p.communicate(timeout=60)
    assert p.returncode == 1 and "RuntimeError: boom from the helper" in err
    p = client(["helper_mod", "self-kill"], helper, env)
    p.communicate(timeout=60)
    assert p.returncode == -signal.SIGTERM  # the stage process dies of the stage's signal


def test_thread_count_follows_the_stage_environment(server, helper):
    for threads in ("1", "2"):
        p = client(["helper_mod", "threads"], helper, served_env(server, OMP_NUM_THREADS=threads))
        out, err = p.communicate(timeout=60)
        assert (p.returncode, out.strip()) == (0, threads), err
    env = served_env(server)
    p = client(["helper_mod", "threads"], helper, env)
    out, _ = p.communicate(timeout=60)
    cold = subprocess.run([sys.executable, "helper_mod.py", "threads"], cwd=helper, env=env,
                          capture_output=True, text=True, timeout=60)
    assert int(out) == int(cold.stdout)  # unset: torch's own default, as a cold process has


def test_a_served_stage_finds_what_stages_import_at_first_use_imported(server, helper):
    """The sqlite tracking store, onnx and torch._dynamo (a stage's first optimizer) come
    with the fork instead of costing seconds in every stage process."""
    first_use = ["mlflow.store.tracking.sqlalchemy_store", "onnx", "torch._dynamo"]
    p = client(["helper_mod", "imported", *first_use], helper, served_env(server))
    out, err = p.communicate(timeout=60)
    assert (p.returncode, out.split()) == (0, first_use), err


def _wait_ready(proc):
    line = proc.stdout.readline()
    assert line.strip() == "ready", proc.stderr.read()


def test_sigint_reaches_the_stage(server, helper):
    p = client(["helper_mod", "sleep", str(helper / "pid")], helper, served_env(server))
    _wait_ready(p)
    p.send_signal(signal.SIGINT)
    out, _ = p.communicate(timeout=30)
    assert p.returncode == 3 and "interrupted" in out


def test_killing_the_stage_process_kills_its_run(server, helper):
    p = client(["helper_mod", "sleep", str(helper / "pid")], helper, served_env(server))
    _wait_ready(p)
    pid = int((helper / "pid").read_text())
    assert pid != p.pid  # the run is the server's fork, not the client
    p.kill()
    p.wait(timeout=10)
    deadline = time.monotonic() + 10
    while True:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            break
        assert time.monotonic() < deadline, f"run {pid} outlived its killed stage process"
        time.sleep(0.05)


def _stage(args, cwd, env):
    """`python -X importtime -m stages...`: its stderr lists the modules this process
    itself imported (a served stage's fork does not trace)."""
    return subprocess.run([sys.executable, "-X", "importtime", "-m", *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=300)


def imported_torch(proc) -> bool:
    return any(line.startswith("import time:") and line.split("|")[-1].strip() == "torch"
               for line in proc.stderr.splitlines())


@pytest.fixture
def digits_workspace(tmp_path, mlflow_store):
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    params["train_dense"]["epochs"] = 1
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    return tmp_path


def test_a_served_stage_equals_the_cold_one_and_never_imports_torch(server, digits_workspace):
    # one thread in both (their arithmetic is then the same): two would spin on cores the
    # other test worker holds (the served training used 26 s of CPU so, the cold one 8)
    ws, env = digits_workspace, served_env(server, OMP_NUM_THREADS="1")
    prep = _stage(["stages.prepare", "digits", "data", "prep.json"], ws, env)
    assert prep.returncode == 0 and not imported_torch(prep), prep.stderr[-2000:]
    served = _stage(["stages.train_dense", "digits", "resnet20", "data", "served"], ws, env)
    assert served.returncode == 0 and not imported_torch(served), served.stderr[-2000:]
    shutil.rmtree(ws / ".chipprune", ignore_errors=True)  # no resuming from the other run
    cold_env = {**env, ENV_SOCKET: ""}
    cold = _stage(["stages.train_dense", "digits", "resnet20", "data", "cold"], ws, cold_env)
    assert cold.returncode == 0 and imported_torch(cold), cold.stderr[-2000:]
    a = torch.load(ws / "served/checkpoint.pt", weights_only=True)["state_dict"]
    b = torch.load(ws / "cold/checkpoint.pt", weights_only=True)["state_dict"]
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert (ws / "served/history.csv").read_text().splitlines()[1].split(",")[:3] == \
        (ws / "cold/history.csv").read_text().splitlines()[1].split(",")[:3]


def test_bad_input_is_the_stage_own_error(server, digits_workspace):
    p = _stage(["stages.prepare", "nosuch", "data", "prep.json"], digits_workspace,
               served_env(server))
    assert p.returncode == 2 and not imported_torch(p)
    assert "error: datasets.nosuch" in p.stderr and not (digits_workspace / "data").exists()


@pytest.mark.parametrize("why", ["another checkout", "no server there"])
def test_stages_run_cold_when_they_cannot_be_served(server, digits_workspace, why):
    env = served_env(server)
    if why == "another checkout":
        env[ENV_ROOT] = str(digits_workspace)
    else:
        env[ENV_SOCKET] = str(digits_workspace / "gone.socket")
    p = _stage(["stages.prepare", "digits", "data", "prep.json"], digits_workspace, env)
    assert p.returncode == 0 and imported_torch(p), p.stderr[-2000:]
    assert (digits_workspace / "data/train.pt").is_file()


def _read(path: Path) -> bytes:
    try:
        return path.read_bytes()
    except OSError:  # a process that ended while we looked
        return b""


def test_wrapper_serves_its_command_and_stops_the_server(tmp_path):
    probe = ("import os, sys; p = os.environ['CHIPPRUNE_STAGE_SERVER']; "
             "print(p); sys.exit(5 if os.path.exists(p) else 6)")
    p = subprocess.run([sys.executable, "-m", "pipelines.stage_server", "--", sys.executable,
                        "-c", probe], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert p.returncode == 5, p.stderr  # the command's own status
    socket_path = Path(p.stdout.strip())
    assert not socket_path.exists() and not socket_path.parent.exists()
    servers = [p for p in Path("/proc").glob("[0-9]*/cmdline")
               if str(socket_path).encode() in _read(p)]
    assert servers == []
    bad = subprocess.run([sys.executable, "-m", "pipelines.stage_server"], cwd=REPO,
                         capture_output=True, text=True, timeout=60)
    assert bad.returncode == 2 and "give the command to run after --" in bad.stderr


def test_serving_a_copy_uses_its_code_and_ends_with_a_killed_caller(tmp_path):
    """`serving(root)` (what the Prefect flows open) starts a server in `root`, so a sweep's
    workspace copy is served its own code; when the process that opened it is SIGKILLed (a
    worker machine's flow run), the server goes too instead of waiting on its socket."""
    copy = tmp_path / "copy"
    for name in ("chipprune", "stages", "pipelines", "nets"):
        shutil.copytree(REPO / name, copy / name, ignore=shutil.ignore_patterns("__pycache__"))
    opener = textwrap.dedent("""
        import sys, time
        from pathlib import Path
        from pipelines.stage_server import serving
        with serving(Path(sys.argv[1])) as env:
            print(env["CHIPPRUNE_STAGE_SERVER"], env["CHIPPRUNE_STAGE_SERVER_ROOT"], flush=True)
            time.sleep(120)
    """)
    proc = subprocess.Popen([sys.executable, "-c", opener, str(copy)], cwd=REPO,
                            stdout=subprocess.PIPE, text=True)
    try:
        socket_path, root = proc.stdout.readline().split()
        assert Path(socket_path).exists() and root == str(copy.resolve())
        servers = [int(p.parent.name) for p in Path("/proc").glob("[0-9]*/cmdline")
                   if socket_path.encode() in _read(p)]
        assert len(servers) == 1
        assert Path(f"/proc/{servers[0]}/cwd").resolve() == copy.resolve()  # its code
    finally:
        proc.kill()
        proc.wait(timeout=10)
    deadline = time.monotonic() + 20
    while Path(f"/proc/{servers[0]}").exists() and time.monotonic() < deadline:
        status = Path(f"/proc/{servers[0]}/stat").read_text().rsplit(")", 1)[1].split()[0] \
            if Path(f"/proc/{servers[0]}/stat").exists() else "X"
        if status == "Z":  # exited; only its parent's reaping is left (init's, now)
            break
        time.sleep(0.1)
    assert not Path(f"/proc/{servers[0]}").exists() or status == "Z"
