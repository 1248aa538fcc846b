"""Resume state for long runs: one file per stage instance, outside DVC's outputs (DVC
deletes a stage's outputs before running it). A fingerprint of the stage's config and
inputs guards it, so a run with other params never continues from a stale state."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

from chipprune import atomic
from chipprune.training.checkpoint import load_file


def fingerprint(*parts: Any) -> str:
    """sha256 of the JSON form of `parts` (configs, input checksums)."""
    blob = json.dumps(parts, sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()


class ResumeStore:
    def __init__(self, path: str | Path, fingerprint: str):
        self.path = Path(path)
        self.fingerprint = fingerprint

    def load(self, *, clear_stale: bool = True, quiet: bool = False) -> dict[str, Any] | None:
        """The saved state if it belongs to this exact run, else None (and a stale file is
        removed unless `clear_stale` is false: a non-zero rank only reads)."""
        if not self.path.exists():
            return None
        state = load_file(self.path)
        if not isinstance(state, dict) or state.get("fingerprint") != self.fingerprint:
            if clear_stale:
                self.clear()
            return None
        if not quiet:
            print(f"resuming from {self.path} (epoch {state['state']['epoch']})", flush=True)
        return state["state"]

    def save(self, state: dict[str, Any]) -> None:
        atomic.torch_save({"fingerprint": self.fingerprint, "state": state}, self.path)

    def clear(self) -> None:
        self.path.unlink(missing_ok=True)
