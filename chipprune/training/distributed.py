"""Data-parallel training across local processes (DDP): gloo on CPU, nccl on CUDA.

A rank is described by torchrun's environment (RANK, LOCAL_RANK, WORLD_SIZE,
LOCAL_WORLD_SIZE, MASTER_ADDR, MASTER_PORT). `relaunch` starts a stage as N such ranks when
its params ask for more than one process, so `dvc repro` needs nothing new, and
`torchrun --nproc-per-node N -m stages.<name> ...` by hand is the same thing.

Every rank draws the same global permutation from the same seed and takes its slice of
each global batch (`batch_part`), so N processes at global batch B see, step by step,
exactly the images one process sees at batch B. Rank 0 alone writes files and MLflow runs.
With no process group (one process) every helper here is a no-op.
"""

from __future__ import annotations

import inspect
import os
import signal
import socket
import subprocess
import sys
import time
import warnings

import torch
import torch.distributed as dist
from torch import nn

from chipprune.config import ConfigError

_LAUNCHER_PID = "CHIPPRUNE_LAUNCHER_PID"


# --- who am I ---------------------------------------------------------------------------


def under_launcher() -> bool:
    """True in a process that torchrun (or `launch`) started as one rank of a group."""
    return "RANK" in os.environ and "WORLD_SIZE" in os.environ


def env_world() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def initialized() -> bool:
    return dist.is_available() and dist.is_initialized()


def world() -> int:
    return dist.get_world_size() if initialized() else 1


def rank() -> int:
    return dist.get_rank() if initialized() else 0


def is_main() -> bool:
    """Rank 0 (or the only process): the one that writes outputs, checkpoints and MLflow."""
    return rank() == 0


# --- set-up and teardown ----------------------------------------------------------------


def setup(device: torch.device) -> torch.device:
    """Join the process group the environment describes (a no-op for one process) and
    return this rank's device: cuda:LOCAL_RANK on CUDA (nccl), the CPU otherwise (gloo)."""
    if env_world() <= 1:
        return device
    local = int(os.environ.get("LOCAL_RANK", "0"))
    if device.type == "cuda":
        if local >= torch.cuda.device_count():
            raise ConfigError(
                f"distributed: local rank {local} has no GPU ({torch.cuda.device_count()} "
                "visible); use at most one process per GPU"
            )
        device = torch.device("cuda", local)
        torch.cuda.set_device(device)
    if not initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return device


def teardown() -> None:
    if initialized():
        dist.destroy_process_group()


def barrier() -> None:
    if world() > 1:
        dist.barrier()


def all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    """Sum `t` over ranks in place (every rank gets the same bits); returns `t`."""
    if world() > 1:
        dist.all_reduce(t)
    return t


# --- sharding ---------------------------------------------------------------------------


def batch_part(global_batch: int) -> slice:
    """This rank's rows of a global batch: rank r of N takes rows [r*b, (r+1)*b), b = B/N."""
    n, r = world(), rank()
    if global_batch % n:
        raise ConfigError(
            f"batch_size {global_batch} (the global batch) is not divisible by the {n} processes"
        )
    b = global_batch // n
    return slice(r * b, (r + 1) * b)


def shard_indices(perm: torch.Tensor, step: int, global_batch: int) -> torch.Tensor:
    """This rank's indices of global batch `step` of a permutation every rank drew alike."""
    return perm[step * global_batch : (step + 1) * global_batch][batch_part(global_batch)]


# --- the model under DDP ----------------------------------------------------------------


class _Joint(nn.Module):
    """The model plus trainable tensors that live outside it (ChipNet's gates act through
    forward hooks): DDP then averages every gradient the optimiser steps on, in one reducer."""

    def __init__(self, model: nn.Module, extras: list[nn.Parameter]):
        super().__init__()
        self.model = model
        self.extras = nn.ParameterList(extras)  # the same Parameter objects, not copies

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x)


def wrap(model: nn.Module, optimizer: torch.optim.Optimizer) -> nn.Module:
    """DistributedDataParallel over `model` and the optimiser's other parameters. BN buffers
    are not broadcast per step (see `average_buffers`). Every parameter must receive a
    gradient each step (no find_unused_parameters)."""
    from torch.nn.parallel import DistributedDataParallel as DDP

    own = {id(p) for p in model.parameters()}
    extras = [p for g in optimizer.param_groups for p in g["params"] if id(p) not in own]
    device = next(model.parameters()).device
    ids = [device.index] if device.type == "cuda" else None
    # A conv with one input channel has an arbitrary stride on that dim; DDP warns once
    # that its gradient's strides differ from the bucket's (a copy, not an error).
    warnings.filterwarnings("ignore", message="Grad strides do not match bucket view strides")
    no_sync = (
        {"forward_sync_buffers": False}  # torch >= 2.15 renamed broadcast_buffers
        if "forward_sync_buffers" in inspect.signature(DDP.__init__).parameters
        else {"broadcast_buffers": False}
    )
    return DDP(_Joint(model, extras), device_ids=ids, **no_sync)


@torch.no_grad()
def average_buffers(model: nn.Module) -> None:
    """Mean of the floating-point buffers (BN running statistics) over ranks, so every rank,
    and the checkpoint rank 0 saves, evaluates with the same statistics. For the running
    mean this is exactly the moving average of the global batch means (it is linear)."""
    n = world()
    if n == 1:
        return
    by_dtype: dict[torch.dtype, list[torch.Tensor]] = {}
    for b in model.buffers():
        if b.is_floating_point():
            by_dtype.setdefault(b.dtype, []).append(b)
    for bufs in by_dtype.values():  # one all-reduce per dtype, in a fixed order
        flat = torch.cat([b.reshape(-1) for b in bufs])
        dist.all_reduce(flat)
        flat /= n
        i = 0
        for b in bufs:
            b.copy_(flat[i : i + b.numel()].view_as(b))
            i += b.numel()


class _AllGather(torch.autograd.Function):
    """Differentiable all-gather: (..) on every rank -> (world, ..). The gradient of rank r's
    row is the sum over ranks of the gradient each put on that row."""

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:
        x = x.contiguous()
        rows = [torch.empty_like(x) for _ in range(world())]
        dist.all_gather(rows, x)
        return torch.stack(rows)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        grad = grad.contiguous().clone()
        dist.all_reduce(grad)
        return grad[rank()]


def _sync_bn_forward(bn: nn.modules.batchnorm._BatchNorm, x: torch.Tensor) -> torch.Tensor:
    """BatchNorm over the global batch, for any device and backend (torch's SyncBatchNorm is
    GPU-only); the module's parameters, hooks and state_dict stay what they are.

    Each rank's per-channel mean and (biased) variance are two-pass values; one all-gather
    brings every rank's, and the law of total variance combines them (ranks hold equal
    shares), with no E[x^2] - mean^2 cancellation where a channel's variance is small
    against its mean. Backward: one all-reduce."""
    if not bn.training or world() == 1:
        return bn._unsynced_class.forward(bn, x)
    c = x.shape[1]
    dims = [0, *range(2, x.dim())]
    xf = x.to(torch.promote_types(x.dtype, torch.float32))  # bf16 under autocast: fp32 stats
    var_r, mean_r = torch.var_mean(xf, dim=dims, correction=0)
    rows = _AllGather.apply(torch.cat([mean_r, var_r]))  # (world, 2C)
    means, variances = rows[:, :c], rows[:, c:]
    mean = means.mean(0)
    var = variances.mean(0) + (means - mean).pow(2).mean(0)
    count = x.numel() // c * world()
    if bn.track_running_stats and bn.running_mean is not None:
        with torch.no_grad():
            bn.num_batches_tracked.add_(1)
            f = 1.0 / float(bn.num_batches_tracked) if bn.momentum is None else bn.momentum
            bn.running_mean.mul_(1 - f).add_(mean.detach(), alpha=f)
            unbiased = var.detach() * (count / max(1, count - 1))
            bn.running_var.mul_(1 - f).add_(unbiased, alpha=f)
    shape = (1, c) + (1,) * (x.dim() - 2)
    y = (xf - mean.view(shape)) * torch.rsqrt(var.view(shape) + bn.eps)
    if bn.affine:
        y = y * bn.weight.view(shape) + bn.bias.view(shape)
    return y.to(x.dtype)


_SYNCED: dict[type, type] = {}


def _synced_class(cls: type) -> type:
    """A subclass of a BatchNorm class whose forward is `_sync_bn_forward`. Swapping the
    class (not setting an instance `forward`) composes with whatever wraps the module's
    forward or hooks it: ChipNet's gates call `type(bn).forward` with a scaled affine."""
    if cls not in _SYNCED:
        _SYNCED[cls] = type(
            f"Synced{cls.__name__}",
            (cls,),
            {"forward": _sync_bn_forward, "_unsynced_class": cls, "__module__": __name__},
        )
    return _SYNCED[cls]


def sync_batchnorm(model: nn.Module) -> list[nn.Module]:
    """Make every BatchNorm of `model` normalise over the global batch in training mode
    (eval mode is unchanged); returns the modules to give to `unsync_batchnorm`."""
    patched = []
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm) and not hasattr(m, "_unsynced_class"):
            m.__class__ = _synced_class(type(m))
            patched.append(m)
    return patched


def unsync_batchnorm(patched: list[nn.Module]) -> None:
    for m in patched:
        m.__class__ = m._unsynced_class


# --- launching --------------------------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _die_with_launcher() -> None:
    """In a rank `launch` started: be killed when the launcher dies (kill -9 included)."""
    pid = os.environ.get(_LAUNCHER_PID)
    if not pid or not sys.platform.startswith("linux"):
        return
    import ctypes

    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        return
    if os.getppid() != int(pid):  # the launcher died before prctl took effect
        os._exit(1)


def launch(module: str, argv: list[str], nproc: int, env: dict[str, str] | None = None) -> int:
    """Run `python -m module argv` as `nproc` local ranks with torchrun's environment; wait
    for all. The first rank that fails ends the others; its exit status is returned (so a
    stage's exit code 2 for a user error survives). CPU threads are split between ranks
    unless OMP_NUM_THREADS says otherwise. `env`: the ranks' environment (default: ours)."""
    env = dict(os.environ if env is None else env)
    port = _free_port()
    try:
        cpus = len(os.sched_getaffinity(0))
    except AttributeError:
        cpus = os.cpu_count() or 1
    threads = env.get("OMP_NUM_THREADS") or str(max(1, cpus // nproc))
    base = {
        **env,
        "WORLD_SIZE": str(nproc),
        "LOCAL_WORLD_SIZE": str(nproc),
        "GROUP_RANK": "0",
        "MASTER_ADDR": "127.0.0.1",
        "MASTER_PORT": str(port),
        "OMP_NUM_THREADS": threads,
        _LAUNCHER_PID: str(os.getpid()),
    }
    procs = [
        subprocess.Popen(
            [sys.executable, "-m", module, *argv],
            env={**base, "RANK": str(r), "LOCAL_RANK": str(r)},
        )
        for r in range(nproc)
    ]

    def forward(signum, _frame):
        for p in procs:
            if p.poll() is None:
                p.send_signal(signum)

    try:  # pass a stop on to the ranks (only the main thread may set handlers)
        old = {s: signal.signal(s, forward) for s in (signal.SIGTERM, signal.SIGINT)}
    except ValueError:
        old = {}
    try:
        failed = 0
        while any(p.poll() is None for p in procs):
            bad = [p.returncode for p in procs if p.returncode not in (None, 0)]
            if bad and not failed:
                failed = bad[0]
                for p in procs:
                    if p.poll() is None:
                        p.terminate()
            time.sleep(0.05)
        codes = [p.returncode for p in procs]
    finally:
        for s, h in old.items():
            signal.signal(s, h)
    if not failed:
        failed = next((c for c in codes if c != 0), 0)
    return 128 - failed if failed < 0 else failed  # killed by signal s: 128 + s


def relaunch(module: str, argv: list[str], nproc: int, device: torch.device) -> None:
    """In a stage asked for `nproc` > 1 processes and not already one rank of a group:
    run the stage as `nproc` ranks and exit with their status. Else return (and, in a
    rank `launch` started, arrange to die with the launcher)."""
    if under_launcher():
        _die_with_launcher()
        return
    if nproc <= 1:
        return
    if device.type == "cuda" and nproc > torch.cuda.device_count():
        raise ConfigError(
            f"distributed.nproc {nproc}: only {torch.cuda.device_count()} GPU(s) visible; "
            "use at most one process per GPU"
        )
    raise SystemExit(launch(module, argv, nproc))
