"""dvc.lock holds exactly the stages of dvc.yaml: DVC keeps the entries of stages removed
from the pipeline, and every stage run loads and rewrites the whole lock (round-trip YAML),
so stale entries cost every run (a 6,500-line lock took 3 s per stage) and every no-op
`dvc repro`."""

from __future__ import annotations

import yaml
from dvc.repo import Repo

from tests.conftest import REPO


def test_the_committed_lock_has_no_stage_that_dvc_yaml_lacks():
    locked = set(yaml.safe_load((REPO / "dvc.lock").read_text())["stages"])
    with Repo(str(REPO)) as repo:
        stages = {s.addressing for s in repo.index.stages}
    assert locked - stages == set()
    assert locked == stages  # and a from-scratch run of every stage is what it records
