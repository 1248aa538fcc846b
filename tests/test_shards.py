"""Sharded datasets: the official layouts written as real JPEG files, sharded by the prepare
code, read back through the stream loader; ImageNet's transforms; bad input."""

from __future__ import annotations

import io
import json
import os
import random
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from chipprune.config import AugmentConfig
from chipprune.data import DataFileError
from chipprune.data.prepare import prepare_dataset, prepare_shards
from chipprune.data.shards import transforms
from chipprune.data.shards.layout import index_path
from chipprune.training import distributed
from chipprune.training.sources import open_split
from chipprune.training.stream import StreamData

REPO = Path(__file__).resolve().parents[1]
WNIDS = ["n01443537", "n01629819", "n01641577"]


def jpeg(path: Path, w: int, h: int, seed: int) -> bytes:
    """A real JPEG of smooth random colour (decodes to what PIL encodes, up to JPEG loss)."""
    rng = np.random.default_rng(seed)
    small = rng.integers(0, 256, (4, 4, 3), dtype=np.uint8)
    img = Image.fromarray(small).resize((w, h), Image.Resampling.BILINEAR)
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=90)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(buf.getvalue())
    return buf.getvalue()


def tiny_imagenet(root: Path, per_class: int = 4, val: int = 6) -> Path:
    """The official tiny-imagenet-200 layout (3 classes), 64x64 JPEGs."""
    d = root / "tiny-imagenet-200"
    d.mkdir(parents=True)
    (d / "wnids.txt").write_text("\n".join([WNIDS[2], WNIDS[0], WNIDS[1]]) + "\n")  # unsorted
    for c, w in enumerate(WNIDS):
        for k in range(per_class):
            jpeg(d / "train" / w / "images" / f"{w}_{k}.JPEG", 64, 64, 10 * c + k)
        (d / "train" / w / f"{w}_boxes.txt").write_text("")
    lines = []
    for k in range(val):
        jpeg(d / "val" / "images" / f"val_{k}.JPEG", 64, 64, 100 + k)
        lines.append(f"val_{k}.JPEG\t{WNIDS[k % 3]}\t0\t0\t63\t63")
    (d / "val" / "val_annotations.txt").write_text("\n".join(lines) + "\n")
    jpeg(d / "test" / "images" / "test_0.JPEG", 64, 64, 999)  # unlabelled: not read
    return d


def imagenet(root: Path, flat_val: bool) -> Path:
    """ImageNet's extracted layout: train/<wnid>/*.JPEG at ImageNet-like sizes; val/ either
    in class folders or flat with torchvision's meta.bin (as it parses the devkit)."""
    sizes = [(500, 375), (375, 500), (333, 500), (500, 333)]
    for c, w in enumerate(WNIDS):
        for k in range(3):
            jpeg(root / "train" / w / f"{w}_{k}.JPEG", *sizes[k % 4], seed=10 * c + k)
    val_wnids = [WNIDS[k % 3] for k in range(5)][::-1]
    for k, w in enumerate(val_wnids):
        name = f"ILSVRC2012_val_{k + 1:08d}.JPEG"
        jpeg(root / "val" / (name if flat_val else f"{w}/{name}"), *sizes[k % 4], seed=50 + k)
    if flat_val:
        torch.save(({w: (w,) for w in WNIDS}, val_wnids), root / "meta.bin")
    return root


# --- transforms ---------------------------------------------------------------------------


def test_random_resized_box_is_torchvisions_rule():
    """Area in [0.08, 1] of the image and aspect in [3/4, 4/3] (up to rounding), inside the
    image, the same for the same seed; a 1000x10 strip falls back to the widest 4:3 centre."""
    for seed in range(200):
        w, h = random.Random(seed).choice([(500, 375), (64, 64), (375, 500)])
        box = transforms.random_resized_box(w, h, random.Random(seed))
        left, top, right, bottom = box
        cw, ch = right - left, bottom - top
        assert 0 <= left < right <= w and 0 <= top < bottom <= h
        assert 0.08 * w * h * 0.9 <= cw * ch <= w * h
        assert 0.70 <= cw / ch <= 1.40
        assert box == transforms.random_resized_box(w, h, random.Random(seed))
    assert transforms.random_resized_box(1000, 10, random.Random(0)) == (493, 0, 506, 10)


def test_eval_view_is_resize_then_centre_crop():
    """At a short side of 256 the eval view of 224 is the plain centre crop [16:240]
    (resize 256 -> 256 is the identity), of the decoded pixels, bit for bit."""
    rng = np.random.default_rng(0)
    img = Image.fromarray(rng.integers(0, 256, (256, 320, 3), dtype=np.uint8))
    out = transforms.eval_view(img, 224)
    want = torch.from_numpy(np.asarray(img)[16:240, 48:272].copy()).permute(2, 0, 1)
    assert torch.equal(out, want)
    assert transforms.center_box(320, 256, 224) == (48.0, 16.0, 272.0, 240.0)


# --- layouts and the shard files --------------------------------------------------------


def test_tiny_imagenet_official_layout(tmp_path):
    root = tiny_imagenet(tmp_path)
    ds = prepare_dataset("tiny_imagenet", root=tmp_path, image_size=64, val_size=3)
    assert ds.meta["classes"] == WNIDS  # sorted, as an ImageFolder over train/
    assert ds.meta["sizes"] == {"train": 9, "val": 3, "test": 6}
    assert ds.splits["test"].labels.tolist() == [k % 3 for k in range(6)]  # val_annotations
    # the same files, sharded: every stored image is the file's bytes, in a WebDataset tar
    out = tmp_path / "shards"
    meta = prepare_shards("tiny_imagenet", out, root=root, image_size=64, val_size=3,
                          shard_size=4)
    assert meta["sizes"] == ds.meta["sizes"] and meta["classes"] == WNIDS
    assert [s["count"] for s in meta["shards"]["train"]] == [4, 4, 1]
    with tarfile.open(out / meta["shards"]["test"][0]["file"]) as tar:
        names = tar.getnames()
        assert names[:4] == ["00000000.jpeg", "00000000.cls", "00000001.jpeg", "00000001.cls"]
        assert tar.extractfile("00000001.cls").read() == b"1"
        first = tar.extractfile("00000000.jpeg").read()
    assert first == (root / "val" / "images" / "val_0.JPEG").read_bytes()
    index = torch.load(index_path(out, "test"), weights_only=True)
    assert index["label"].tolist() == [k % 3 for k in range(6)]
    # mean/std over the same decoded pixels as the in-memory form (64x64, no resize)
    assert np.allclose(meta["mean"], ds.meta["mean"], atol=1e-9)
    assert np.allclose(meta["std"], ds.meta["std"], atol=1e-9)
    # written twice: byte-identical shards and index
    again = tmp_path / "again"
    assert prepare_shards("tiny_imagenet", again, root=root, image_size=64, val_size=3,
                          shard_size=4) == meta
    for f in sorted(p.relative_to(out) for p in out.rglob("*") if p.is_file()):
        assert (again / f).read_bytes() == (out / f).read_bytes(), f


@pytest.mark.parametrize("flat_val", [False, True])
def test_imagenet_layouts(tmp_path, flat_val):
    root = imagenet(tmp_path / "in1k", flat_val)
    out = tmp_path / "out"
    meta = prepare_shards("imagenet", out, root=root, image_size=32, val_size=2, shard_side=64,
                          workers=2)
    assert meta["classes"] == WNIDS and meta["sizes"] == {"train": 7, "val": 2, "test": 5}
    assert meta["image_shape"] == [3, 32, 32]
    # val labels: the class folders (listed class by class), or the devkit's ground truth
    # in file-name order
    labels = torch.load(index_path(out, "test"), weights_only=True)["label"].tolist()
    assert labels == ([1, 0, 2, 1, 0] if flat_val else [0, 0, 1, 1, 2])
    # stored with the short side at 64 (re-encoded JPEG)
    with tarfile.open(out / meta["shards"]["train"][0]["file"]) as tar:
        img = Image.open(io.BytesIO(tar.extractfile("00000000.jpg").read()))
        assert min(img.size) == 64 and max(img.size) in (85, 96)


def test_imagenet_needs_folders_or_archives(tmp_path):
    with pytest.raises(FileNotFoundError, match="ILSVRC2012_img_train.tar"):
        prepare_shards("imagenet", tmp_path / "o", root=tmp_path, image_size=32)
    (tmp_path / "train" / WNIDS[0]).mkdir(parents=True)
    jpeg(tmp_path / "train" / WNIDS[0] / "a.JPEG", 40, 30, 0)
    jpeg(tmp_path / "val" / "ILSVRC2012_val_00000001.JPEG", 40, 30, 1)
    with pytest.raises(FileNotFoundError, match="devkit"):
        prepare_shards("imagenet", tmp_path / "o", root=tmp_path, image_size=32)


# --- the stream loader ------------------------------------------------------------------


@pytest.fixture(scope="module")
def sharded(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("sharded")
    root = imagenet(tmp / "in1k", flat_val=False)
    out = tmp / "prepared"
    meta = prepare_shards("imagenet", out, root=root, image_size=32, val_size=2, shard_size=3)
    (out / "meta.json").write_text(json.dumps(meta))
    return out, meta


def test_stream_epoch_is_the_seeds_not_the_workers(sharded):
    """One seed, the same batches with 0 and 2 worker processes; another seed, other ones.
    Each batch is the decoded, randomly cropped images, uint8, at the model's size."""
    out, meta = sharded

    def epoch(workers, seed):
        data = StreamData(out, "train", meta, torch.device("cpu"), workers=workers)
        return list(data.train_epoch(torch.Generator().manual_seed(seed), 3, 2, AugmentConfig()))

    a, b, c = epoch(0, 1), epoch(2, 1), epoch(2, 2)
    assert len(a) == 2 and a[0][0].shape == (3, 3, 32, 32) and a[0][0].dtype == torch.uint8
    assert all(torch.equal(x, y) and torch.equal(s, t) for (x, s), (y, t) in zip(a, b, strict=True))
    assert not all(torch.equal(x, y) for (x, _), (y, _) in zip(a, c, strict=True))
    labels = torch.load(index_path(out, "train"), weights_only=True)["label"]
    perm = torch.randperm(7, generator=torch.Generator().manual_seed(1))
    assert torch.equal(torch.cat([s for _, s in a]), labels[perm[:6]])


def test_stream_ranks_take_their_rows(sharded, monkeypatch):
    """Two data-parallel ranks: each gets its half of every global batch, and together they
    see exactly the images (and crops) one process sees."""
    out, meta = sharded
    whole = list(StreamData(out, "train", meta, "cpu", workers=0).train_epoch(
        torch.Generator().manual_seed(5), 6, 1, AugmentConfig()))
    parts = []
    for r in range(2):
        monkeypatch.setattr(distributed, "world", lambda: 2)
        monkeypatch.setattr(distributed, "rank", lambda r=r: r)
        part = distributed.batch_part(6)
        parts.append(list(StreamData(out, "train", meta, "cpu", workers=0).train_epoch(
            torch.Generator().manual_seed(5), 6, 1, AugmentConfig(), part)))
    assert torch.equal(torch.cat([parts[0][0][0], parts[1][0][0]]), whole[0][0])
    assert torch.equal(torch.cat([parts[0][0][1], parts[1][0][1]]), whole[0][1])


def test_stream_eval_batches_are_the_eval_views(sharded):
    from chipprune.data import load_prepared

    out, meta = sharded
    with pytest.raises(DataFileError, match=r"storage: shards"):
        load_prepared(out, splits=("test",))
    assert load_prepared(out, splits=()).meta["storage"] == "shards"
    data = open_split(out, "test", "cpu")
    assert isinstance(data, StreamData) and len(data) == 5
    got = list(data.eval_batches(2, lambda j: j != 1))
    assert [j for j, _, _ in got] == [0, 2]
    x, y = data.take(torch.tensor([4]))
    assert torch.equal(got[1][1], x) and torch.equal(got[1][2], y)


def test_batched_tensor_decoding_matches_the_workers(sharded):
    """decode="tensor" (what CUDA uses: torchvision.io.decode_jpeg on a whole batch, then
    crop and resize on the device), run here on the CPU: the same images, crops and flips
    as the PIL workers, up to the two libraries' resampling."""
    out, meta = sharded
    assert meta["formats"] == {"train": ["jpeg"], "val": ["jpeg"], "test": ["jpeg"]}
    pil = StreamData(out, "train", meta, "cpu", workers=0, decode="pil")
    tensor = StreamData(out, "train", meta, "cpu", workers=2, decode="tensor")
    assert StreamData(out, "train", meta, "cpu").decode == "pil"  # CPU: the workers decode

    def epoch(data):
        return list(data.train_epoch(torch.Generator().manual_seed(1), 3, 2, AugmentConfig()))

    for (x, y), (u, v) in zip(epoch(pil), epoch(tensor), strict=True):
        diff = (x.float() - u.float()).abs()
        assert u.dtype == torch.uint8 and torch.equal(y, v)
        assert diff.max() <= 3 and diff.mean() < 0.5
    test_pil = StreamData(out, "test", meta, "cpu", workers=0, decode="pil")
    test_tensor = StreamData(out, "test", meta, "cpu", workers=0, decode="tensor")
    for (_, x, _), (_, u, _) in zip(test_pil.eval_batches(5), test_tensor.eval_batches(5),
                                    strict=True):
        assert (x.float() - u.float()).abs().max() <= 3
    assert (test_tensor.take(torch.tensor([1]))[0].float()
            - test_pil.take(torch.tensor([1]))[0].float()).abs().max() <= 3


def test_fit_and_evaluate_run_on_a_stream(sharded):
    """The training loop and evaluation take a stream as they take device tensors."""
    from chipprune.config import TrainConfig
    from chipprune.models import create_model
    from chipprune.training.loop import evaluate, fit

    out, meta = sharded
    train = open_split(out, "train", "cpu", meta)
    val = open_split(out, "val", "cpu", meta)
    model = create_model("resnet20", num_classes=3)
    cfg = TrainConfig(epochs=2, batch_size=3, eval_batch_size=2)
    result = fit(model, train, val, cfg, AugmentConfig())
    assert [r["epoch"] for r in result.history] == [1, 2]
    assert result.history[-1]["val_top1"] == evaluate(model, val, 2)["top1"]


def test_stream_from_the_dvc_remote(sharded, tmp_path):
    """The prepared folder tracked by DVC and pushed to a (local-directory) remote, then gone
    from the workspace and the cache: the loader reads it from the remote with ranged reads,
    in worker processes, and gives the batches the local copy gives."""
    import shutil

    out, meta = sharded
    repo = tmp_path / "repo"
    shutil.copytree(out, repo / "data" / "prepared" / "in1k")

    def dvc(*args):
        subprocess.run([sys.executable, "-m", "dvc", *args], cwd=repo, check=True,
                       capture_output=True, timeout=120)

    dvc("init", "--no-scm", "-q")
    dvc("add", "-q", "data/prepared/in1k")
    dvc("remote", "add", "-d", "store", str(tmp_path / "remote"))
    dvc("push", "-q")
    shutil.rmtree(repo / "data" / "prepared" / "in1k")
    shutil.rmtree(repo / ".dvc" / "cache")

    def epoch(data):
        return list(data.train_epoch(torch.Generator().manual_seed(3), 3, 2, AugmentConfig()))

    remote = StreamData("dvc://data/prepared/in1k", "train", None, "cpu", workers=2,
                        url=str(repo))
    local = StreamData(out, "train", meta, "cpu", workers=0)
    assert not remote.split.local and len(remote) == len(local) == 7
    for (x, y), (u, v) in zip(epoch(remote), epoch(local), strict=True):
        assert torch.equal(x, u) and torch.equal(y, v)
    assert not (repo / "data" / "prepared" / "in1k").exists()  # nothing was pulled


# --- bad input ------------------------------------------------------------------------------


def test_corrupt_jpeg_is_named_or_skipped(tmp_path):
    root = tiny_imagenet(tmp_path / "t")
    bad = root / "train" / WNIDS[1] / "images" / f"{WNIDS[1]}_2.JPEG"
    bad.write_bytes(bad.read_bytes()[:200])  # truncated
    with pytest.raises(DataFileError, match=f"{bad}.*not a readable image"):
        prepare_shards("tiny_imagenet", tmp_path / "o", root=root, image_size=64, val_size=1)
    meta = prepare_shards("tiny_imagenet", tmp_path / "o2", root=root, image_size=64,
                          val_size=1, skip_corrupt=True)
    skipped = [n for names in meta["skipped"].values() for n in names]
    assert skipped == [f"train/{WNIDS[1]}/images/{WNIDS[1]}_2.JPEG"]
    assert meta["sizes"]["train"] + meta["sizes"]["val"] == 11


def test_bad_worker_count_is_a_config_error(sharded, monkeypatch):
    from chipprune.config import ConfigError

    out, meta = sharded
    monkeypatch.setenv("CHIPPRUNE_DATA_WORKERS", "two")
    with pytest.raises(ConfigError, match="CHIPPRUNE_DATA_WORKERS must be a whole number"):
        StreamData(out, "train", meta, "cpu")


def test_unknown_wnid_in_annotations(tmp_path):
    root = tiny_imagenet(tmp_path)
    ann = root / "val" / "val_annotations.txt"
    ann.write_text(ann.read_text().replace(WNIDS[0], "n99999999", 1))
    with pytest.raises(DataFileError, match=r"line 1: wnid 'n99999999' is not in wnids.txt"):
        prepare_shards("tiny_imagenet", tmp_path / "o", root=root, image_size=64)


def test_missing_or_extra_shard_is_named(sharded, tmp_path):
    import shutil

    out, meta = sharded
    copy = tmp_path / "copy"
    shutil.copytree(out, copy)
    gone = copy / meta["shards"]["train"][1]["file"]
    gone.rename(copy / "shards" / "spare.bin")
    with pytest.raises(DataFileError, match=f"{gone}: missing"):
        open_split(copy, "train", "cpu")
    (copy / "shards" / "spare.bin").rename(gone)
    (copy / "shards" / "train-00099.tar").write_bytes(b"")
    with pytest.raises(DataFileError, match=r"not in the index of 'train': \['train-00099.tar'\]"):
        open_split(copy, "train", "cpu")


def test_prepare_stage_exit_2_and_no_output(tmp_path):
    """A corrupt image through the real stage: exit 2, the file named, nothing written."""
    root = tiny_imagenet(tmp_path / "t")
    bad = root / "val" / "images" / "val_3.JPEG"
    bad.write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    params = tmp_path / "params.yaml"
    import yaml

    raw = yaml.safe_load((REPO / "params.yaml").read_text())
    raw["datasets"]["tiny"] = {"source": "tiny_imagenet", "root": str(tmp_path / "t"),
                               "image_size": 64, "storage": "shards", "val_size": 2}
    params.write_text(yaml.safe_dump(raw))
    out = tmp_path / "data" / "prepared" / "tiny"
    proc = subprocess.run(
        [sys.executable, "-m", "stages.prepare", "tiny", str(out), str(tmp_path / "run.json"),
         "--params", str(params)], cwd=REPO, capture_output=True, text=True, timeout=120,
        env={**os.environ, "MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path / 'm.db'}"})
    assert proc.returncode == 2, proc.stderr
    assert f"{bad}: not a readable image" in proc.stderr
    assert not out.exists() and list(out.parent.iterdir()) == []


def test_imagenet_official_archives(tmp_path, monkeypatch):
    """The three ILSVRC2012 archives as ImageNet ships them (a train tar of per-class tars,
    a flat val tar, the devkit with meta.mat and the val ground truth), parsed and extracted
    by torchvision's ImageNet dataset. Only its md5 check of the archives is switched off:
    fakes cannot have the real archives' checksums."""
    import scipy.io
    import torchvision.datasets.imagenet as tv_imagenet

    monkeypatch.setattr(tv_imagenet, "_verify_archive", lambda *a, **k: None)
    root, work = tmp_path / "in1k", tmp_path / "work"
    root.mkdir()
    for c, w in enumerate(WNIDS):  # train: one tar per class inside the train tar
        for k in range(2):
            jpeg(work / "train" / w / f"{w}_{k}.JPEG", 60, 40, 10 * c + k)
        with tarfile.open(work / f"{w}.tar", "w") as t:
            for f in sorted((work / "train" / w).iterdir()):
                t.add(f, arcname=f.name)
    with tarfile.open(root / "ILSVRC2012_img_train.tar", "w") as t:
        for w in WNIDS:
            t.add(work / f"{w}.tar", arcname=f"{w}.tar")
    truth = [3, 1, 2, 3]  # ILSVRC2012_ID of each val image, 1-based, in file order
    with tarfile.open(root / "ILSVRC2012_img_val.tar", "w") as t:
        for k in range(len(truth)):
            name = f"ILSVRC2012_val_{k + 1:08d}.JPEG"
            jpeg(work / "val" / name, 40, 60, 70 + k)
            t.add(work / "val" / name, arcname=name)
    devkit = work / "ILSVRC2012_devkit_t12" / "data"
    devkit.mkdir(parents=True)
    fields = ["ILSVRC2012_ID", "WNID", "words", "gloss", "num_children", "children",
              "wordnet_height", "num_train_images"]
    synsets = np.zeros((len(WNIDS) + 1,), dtype=[(f, object) for f in fields])
    for i, w in enumerate([*WNIDS, "n00000001"]):  # the last: an inner node, not a class
        leaf = i < len(WNIDS)
        synsets[i] = (i + 1, w, f"class {i}", "", 0 if leaf else 3, np.array([]), 0, 2)
    scipy.io.savemat(devkit / "meta.mat", {"synsets": synsets})
    (devkit / "ILSVRC2012_validation_ground_truth.txt").write_text(
        "\n".join(map(str, truth)) + "\n")
    with tarfile.open(root / "ILSVRC2012_devkit_t12.tar.gz", "w:gz") as t:
        t.add(work / "ILSVRC2012_devkit_t12", arcname="ILSVRC2012_devkit_t12")

    meta = prepare_shards("imagenet", tmp_path / "out", root=root, image_size=32, val_size=1)
    assert meta["classes"] == WNIDS and meta["sizes"] == {"train": 5, "val": 1, "test": 4}
    labels = torch.load(index_path(tmp_path / "out", "test"), weights_only=True)["label"]
    assert labels.tolist() == [0, 1, 2, 2]  # IDs 3, 1, 2, 3, now listed by class folder
    assert sorted(p.name for p in (root / "val").iterdir()) == WNIDS  # as torchvision sorts
