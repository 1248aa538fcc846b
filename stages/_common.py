"""What every stage shell shares: argv parsing helpers and the error contract (a bad input
is one line on stderr naming the file or key, exit code 2, nothing written)."""

from __future__ import annotations

import os
import shutil
import sys
import tempfile
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch

from chipprune import distributed, tracking
from chipprune.checkpoint import CheckpointError
from chipprune.config import ConfigError, DistributedConfig
from chipprune.data import DataFileError
from chipprune.masks import MaskError
from chipprune.tracking import TrackingUnreachable


def parse_budget(kind: str, target: str) -> float:
    """Budget type and target from argv (DVC matrix values), as a ConfigError if bad."""
    from chipprune.budgets import BUDGET_TYPES

    if kind not in BUDGET_TYPES:
        raise ConfigError(f"budget type {kind!r}: allowed {', '.join(BUDGET_TYPES)}")
    try:
        value = float(target)
    except ValueError:
        raise ConfigError(f"budget target {target!r} is not a number") from None
    if not 0.0 < value <= 1.0:
        raise ConfigError(f"budget target {value} must be in (0, 1]")
    return value


USER_ERRORS = (
    ConfigError, CheckpointError, DataFileError, MaskError, TrackingUnreachable, FileNotFoundError,
)
RESUME_DIR = Path(".chipprune") / "resume"


def run_main(main: Callable[[list[str] | None], None], argv: list[str] | None = None) -> int:
    """Run a stage's main; user errors become one clear message and exit code 2."""
    try:
        main(argv)
    except USER_ERRORS as e:
        who = f" (rank {distributed.rank()})" if not distributed.is_main() else ""
        print(f"error{who}: {e}", file=sys.stderr)
        return 2
    finally:
        distributed.teardown()
    return 0


def start_ranks(
    module: str, argv: list[str] | None, cfg: DistributedConfig, device: torch.device
) -> torch.device:
    """Multi-process training: when `cfg.nproc` > 1 and this is not yet one rank of a group,
    re-run the stage as that many ranks and exit with their status; in a rank (started so,
    or by torchrun by hand) join the group. Returns this rank's device."""
    distributed.relaunch(module, sys.argv[1:] if argv is None else list(argv), cfg.nproc, device)
    return distributed.setup(device)


@contextmanager
def main_rank_run(
    stage: str,
    config: Mapping[str, Any],
    run_id_path: str | Path,
    inputs: Mapping[str, str | Path] = (),
) -> Iterator[Any]:
    """`tracking.stage_run` on rank 0; nothing (None) on the other ranks, which write nothing.
    The run is tagged with the number of processes that trained (torchrun by hand may differ
    from `distributed.nproc`)."""
    if distributed.is_main():
        tags = {"chipprune.world_size": str(distributed.world())}
        with tracking.stage_run(stage, config, run_id_path, inputs=inputs, tags=tags) as run:
            yield run
    else:
        yield None


@contextmanager
def atomic_dir(path: str | Path) -> Iterator[Path]:
    """Build a directory output in a temp sibling; it replaces `path` only when complete."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", dir=path.parent))
    try:
        yield tmp
        if path.exists():
            shutil.rmtree(path)
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)
