"""chipprune.data: digits for real, and tiny directories written in each real on-disk layout."""

from __future__ import annotations

import pickle
from pathlib import Path

import numpy as np
import pytest
import scipy.io
import torch
from PIL import Image
from sklearn.datasets import load_digits

import chipprune.data.cifar as cifar_source
import chipprune.data.svhn as svhn_source
from chipprune.data import (
    SOURCES,
    DataFileError,
    PreparedDataset,
    load_prepared,
    normalize_images,
    prepare_dataset,
    save_prepared,
)

CIFAR10_NAMES = "airplane automobile bird cat deer dog frog horse ship truck".split()


@pytest.fixture(scope="module")
def digits() -> PreparedDataset:
    return prepare_dataset("digits")


def all_images(ds: PreparedDataset) -> torch.Tensor:
    return torch.cat([ds.splits[s].images for s in ("train", "val", "test")])


# ---------------------------------------------------------------- digits


def test_digits_shapes_sizes_and_meta(digits):
    for split in digits.splits.values():
        assert split.images.dtype == torch.uint8 and split.labels.dtype == torch.int64
        assert split.images.shape[1:] == (1, 16, 16)
        assert split.labels.shape == (split.images.shape[0],)
    # 20% test per class (359 of 1797), then round(0.1 * 1438) = 144 val
    assert digits.meta["sizes"] == {"train": 1294, "val": 144, "test": 359}
    assert {s: len(v) for s, v in digits.splits.items()} == digits.meta["sizes"]
    assert digits.meta["num_classes"] == 10
    assert digits.meta["classes"] == [str(d) for d in range(10)]
    assert digits.meta["image_shape"] == [1, 16, 16]
    assert digits.meta["class_subset"] is None
    assert digits.meta["split_seed"] == 0 and digits.meta["val_size"] == 0.1
    assert len(digits.meta["source_sha256"]) == 64


def test_digits_test_split_is_stratified(digits):
    per_class = torch.bincount(torch.from_numpy(load_digits().target), minlength=10)
    test_counts = torch.bincount(digits.splits["test"].labels, minlength=10)
    assert ((test_counts - 0.2 * per_class).abs() <= 0.5).all()
    val_counts = torch.bincount(digits.splits["val"].labels, minlength=10)
    assert val_counts.min() >= 5  # not stratified, but no class goes missing at 144 images


def test_digits_native_size_is_the_source_scaled_to_255():
    ds = prepare_dataset("digits", image_size=8)
    expected = np.round(load_digits().images.astype(np.float64) * 255 / 16).astype(np.uint8)
    expected = torch.from_numpy(expected).reshape(-1, 64)
    got = all_images(ds).reshape(-1, 64)
    # the three splits together hold exactly the source images, each as often as in the source
    assert sorted(map(bytes, got.numpy())) == sorted(map(bytes, expected.numpy()))


def test_digits_upsampling_is_half_pixel_bilinear(digits):
    small = prepare_dataset("digits", image_size=8)  # same split indices, only the size differs
    src = (small.splits["train"].images.double() * 16 / 255).round() * 255 / 16  # (N, 1, 8, 8)
    big = digits.splits["train"].images.double()  # (N, 1, 16, 16)
    # output pixel i samples source (i + 0.5) / 2 - 0.5: 0 -> -0.25 (clamped), 1 -> 0.25, 5 -> 2.25
    assert torch.equal(big[..., 0, 0], src[..., 0, 0].round())
    assert torch.equal(big[..., 0, 1], (0.75 * src[..., 0, 0] + 0.25 * src[..., 0, 1]).round())
    assert torch.equal(big[..., 5, 0], (0.75 * src[..., 2, 0] + 0.25 * src[..., 3, 0]).round())


def test_digits_is_deterministic_and_seed_moves_only_val(digits):
    again = prepare_dataset("digits")
    for s in ("train", "val", "test"):
        assert torch.equal(digits.splits[s].images, again.splits[s].images)
        assert torch.equal(digits.splits[s].labels, again.splits[s].labels)
    assert digits.meta == again.meta
    other = prepare_dataset("digits", seed=1)
    assert torch.equal(other.splits["test"].images, digits.splits["test"].images)
    assert not torch.equal(other.splits["val"].images, digits.splits["val"].images)
    assert other.meta["split_seed"] == 1


def test_mean_std_match_a_direct_computation(digits):
    x = digits.splits["train"].images.double() / 255  # (N, 1, 16, 16)
    assert digits.meta["mean"] == pytest.approx([x.mean().item()], abs=1e-12)
    assert digits.meta["std"] == pytest.approx([x.std(correction=0).item()], abs=1e-9)
    assert 0.2 < digits.meta["mean"][0] < 0.4 and 0.2 < digits.meta["std"][0] < 0.45


def test_normalize_images_gives_zero_mean_unit_std_on_train(digits):
    z = normalize_images(digits.splits["train"].images, digits.meta["mean"], digits.meta["std"])
    assert z.dtype == torch.float32 and z.shape == digits.splits["train"].images.shape
    assert z.double().mean().item() == pytest.approx(0.0, abs=1e-5)
    assert z.double().std(correction=0).item() == pytest.approx(1.0, abs=1e-5)
    x = torch.tensor([[[[0, 255]], [[51, 102]]]], dtype=torch.uint8)  # (1, 2, 1, 2)
    z = normalize_images(x, [0.5, 0.2], [0.5, 0.1])
    assert torch.allclose(z, torch.tensor([[[[-1.0, 1.0]], [[0.0, 2.0]]]]), atol=1e-6)
    with pytest.raises(ValueError, match="uint8"):
        normalize_images(x.float(), [0.5, 0.2], [0.5, 0.1])
    with pytest.raises(ValueError, match="2 values"):
        normalize_images(x, [0.5], [0.5])


# ---------------------------------------------------------------- class subset, val size


def test_class_subset_relabels_in_the_given_order(digits):
    sub = prepare_dataset("digits", classes=[7, 3])
    assert sub.meta["classes"] == ["7", "3"] and sub.meta["num_classes"] == 2
    assert sub.meta["class_subset"] == [7, 3]
    # the subset test split is exactly the full test split's 7s (-> 0) and 3s (-> 1), in order
    full = digits.splits["test"]
    keep = (full.labels == 7) | (full.labels == 3)
    assert torch.equal(sub.splits["test"].images, full.images[keep])
    assert torch.equal(sub.splits["test"].labels, (full.labels[keep] == 3).long())
    target = load_digits().target
    assert sum(len(s) for s in sub.splits.values()) == int(((target == 7) | (target == 3)).sum())


@pytest.mark.parametrize(
    "classes, match",
    [
        ([1], "at least 2"),
        ([1, 1], "unique"),
        ([2, 10], "out of range"),
        ([-1, 2], "out of range"),
        ([True, 2], "ints"),
    ],
)
def test_bad_class_subsets_are_rejected(classes, match):
    with pytest.raises(ValueError, match=match):
        prepare_dataset("digits", classes=classes)


def test_val_size_as_count_and_fraction():
    assert prepare_dataset("digits", val_size=100).meta["sizes"] == {
        "train": 1338,
        "val": 100,
        "test": 359,
    }
    assert prepare_dataset("digits", val_size=0.25).meta["sizes"]["val"] == 360  # round(359.5)
    assert prepare_dataset("digits", val_size=0).meta["sizes"]["val"] == 0
    for bad in (1.0, 1438, -1, "10", True):
        with pytest.raises(ValueError, match="val_size"):
            prepare_dataset("digits", val_size=bad)


def test_unknown_source_and_missing_root():
    with pytest.raises(ValueError, match="unknown source"):
        prepare_dataset("mnist")
    with pytest.raises(ValueError, match="root"):
        prepare_dataset("cifar10")
    assert SOURCES == ("digits", "cifar10", "cifar100", "svhn", "imagefolder", "imagenet",
                       "tiny_imagenet", "synthetic")


# ---------------------------------------------------------------- CIFAR, real pickle layout


def write_py2_pickle(path: Path, obj: dict) -> None:
    path.write_bytes(pickle.dumps(obj, protocol=2))  # the real files are Python 2 pickles


def cifar_batch(rng, n: int, label_key: bytes, num_classes: int) -> dict:
    return {
        b"batch_label": b"fake batch",
        label_key: [int(v) for v in rng.integers(0, num_classes, n)],
        b"data": rng.integers(0, 256, (n, 3072), dtype=np.uint8),
        b"filenames": [f"img_{i}.png".encode() for i in range(n)],
    }


def write_fake_cifar10(root: Path, seed: int = 0) -> dict[str, dict]:
    base = root / "cifar-10-batches-py"
    base.mkdir(parents=True)
    rng = np.random.default_rng(seed)
    batches = {f"data_batch_{i}": cifar_batch(rng, 3, b"labels", 10) for i in range(1, 6)}
    batches["test_batch"] = cifar_batch(rng, 4, b"labels", 10)
    batches["test_batch"][b"data"][1] = np.arange(3072) % 251  # a known image
    for name, batch in batches.items():
        write_py2_pickle(base / name, batch)
    names = [n.encode() for n in CIFAR10_NAMES]
    write_py2_pickle(
        base / "batches.meta",
        {b"num_cases_per_batch": 10000, b"label_names": names, b"num_vis": 3072},
    )
    return batches


def write_fake_cifar100(root: Path) -> dict[str, dict]:
    base = root / "cifar-100-python"
    base.mkdir(parents=True)
    rng = np.random.default_rng(1)
    files = {
        "train": cifar_batch(rng, 6, b"fine_labels", 100),
        "test": cifar_batch(rng, 3, b"fine_labels", 100),
    }
    for name, batch in files.items():
        batch[b"coarse_labels"] = [v // 5 for v in batch[b"fine_labels"]]
        write_py2_pickle(base / name, batch)
    write_py2_pickle(
        base / "meta",
        {b"fine_label_names": [f"fine{i:02d}".encode() for i in range(100)],
         b"coarse_label_names": [f"coarse{i:02d}".encode() for i in range(20)]},
    )  # fmt: skip
    return files


def test_cifar10_pickle_layout_round_trips(tmp_path):
    batches = write_fake_cifar10(tmp_path)
    ds = prepare_dataset("cifar10", root=tmp_path, val_size=0)
    assert ds.meta["classes"] == CIFAR10_NAMES and ds.meta["image_shape"] == [3, 32, 32]
    assert ds.meta["sizes"] == {"train": 15, "val": 0, "test": 4}
    # each row of b'data' is 1024 red, 1024 green, 1024 blue values, each row-major 32x32
    img = ds.splits["test"].images[1]
    assert img[0, 0, 0] == 0 and img[1, 2, 3] == (1024 + 2 * 32 + 3) % 251
    assert img[2, 31, 31] == 3071 % 251
    train_rows = np.concatenate([batches[f"data_batch_{i}"][b"data"] for i in range(1, 6)])
    assert torch.equal(
        ds.splits["train"].images, torch.from_numpy(train_rows).reshape(15, 3, 32, 32)
    )
    train_labels = sum((batches[f"data_batch_{i}"][b"labels"] for i in range(1, 6)), [])
    assert ds.splits["train"].labels.tolist() == train_labels
    assert ds.splits["test"].labels.tolist() == batches["test_batch"][b"labels"]


def test_cifar10_val_carving_and_checksum(tmp_path):
    write_fake_cifar10(tmp_path / "a")
    ds = prepare_dataset("cifar10", root=tmp_path / "a", val_size=5, seed=3)
    full = prepare_dataset("cifar10", root=tmp_path / "a", val_size=0)
    assert ds.meta["sizes"] == {"train": 10, "val": 5, "test": 4}
    both = torch.cat([ds.splits["train"].images, ds.splits["val"].images]).reshape(15, -1)
    assert sorted(map(bytes, both.numpy())) == sorted(
        map(bytes, full.splits["train"].images.reshape(15, -1).numpy())
    )
    # the checksum follows the file contents, not where the directory lives
    write_fake_cifar10(tmp_path / "b")
    write_fake_cifar10(tmp_path / "c", seed=9)
    assert (
        prepare_dataset("cifar10", root=tmp_path / "b").meta["source_sha256"]
        == ds.meta["source_sha256"]
    )
    assert (
        prepare_dataset("cifar10", root=tmp_path / "c").meta["source_sha256"]
        != ds.meta["source_sha256"]
    )


def test_cifar100_pickle_layout_uses_fine_labels(tmp_path):
    files = write_fake_cifar100(tmp_path)
    ds = prepare_dataset("cifar100", root=tmp_path, val_size=0, image_size=16)
    assert ds.meta["num_classes"] == 100 and ds.meta["classes"][7] == "fine07"
    assert ds.meta["image_shape"] == [3, 16, 16]
    assert ds.splits["train"].labels.tolist() == files["train"][b"fine_labels"]
    full = prepare_dataset("cifar100", root=tmp_path, val_size=0)
    assert torch.equal(
        full.splits["test"].images, torch.from_numpy(files["test"][b"data"]).reshape(3, 3, 32, 32)
    )


def test_cifar_pickle_with_a_foreign_global_is_refused(tmp_path, capsys):
    write_fake_cifar10(tmp_path)

    class Gadget:
        def __reduce__(self):
            return (print, ("pwned",))

    bad = tmp_path / "cifar-10-batches-py" / "data_batch_2"
    bad.write_bytes(pickle.dumps({b"data": Gadget(), b"labels": []}, protocol=2))
    with pytest.raises(DataFileError, match=r"data_batch_2: .*refusing global __builtin__\.print"):
        prepare_dataset("cifar10", root=tmp_path)
    assert "pwned" not in capsys.readouterr().out


def test_cifar_batch_with_wrong_data_shape_names_the_file(tmp_path):
    write_fake_cifar10(tmp_path)
    bad = tmp_path / "cifar-10-batches-py" / "test_batch"
    write_py2_pickle(bad, {b"data": np.zeros((2, 3000), np.uint8), b"labels": [0, 1]})
    with pytest.raises(DataFileError, match=r"test_batch.*\(N, 3072\) uint8"):
        prepare_dataset("cifar10", root=tmp_path)


def test_cifar10_download_fetches_the_official_archive_once(tmp_path, monkeypatch):
    calls = []

    def fake_download(url, download_root, filename=None, md5=None, **kw):
        calls.append((url, filename, md5))
        write_fake_cifar10(Path(download_root))

    monkeypatch.setattr(cifar_source, "download_and_extract_archive", fake_download)
    prepare_dataset("cifar10", root=tmp_path, download=True)
    prepare_dataset("cifar10", root=tmp_path, download=True)  # files present: no second fetch
    assert calls == [
        ("https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz", "cifar-10-python.tar.gz",
         "c58f30108f718f92721af3b95e74349a")
    ]  # fmt: skip


# ---------------------------------------------------------------- SVHN, real .mat layout


def write_fake_svhn(root: Path) -> dict[str, dict]:
    rng = np.random.default_rng(2)
    mats = {}
    for split, n in (("train", 7), ("test", 3)):
        x = rng.integers(0, 256, (32, 32, 3, n), dtype=np.uint8)  # (H, W, C, N) like the real files
        y = rng.integers(1, 11, (n, 1)).astype(np.uint8)
        y[0, 0] = 10  # digit 0
        mats[split] = {"X": x, "y": y}
        scipy.io.savemat(root / f"{split}_32x32.mat", mats[split])
    return mats


def test_svhn_mat_layout_round_trips(tmp_path):
    mats = write_fake_svhn(tmp_path)
    ds = prepare_dataset("svhn", root=tmp_path, val_size=0)
    assert ds.meta["classes"] == [str(d) for d in range(10)]
    assert ds.meta["sizes"] == {"train": 7, "val": 0, "test": 3}
    x, y = mats["test"]["X"], mats["test"]["y"]
    img = ds.splits["test"].images  # (N, 3, 32, 32)
    assert img[2, 1, 5, 9] == x[5, 9, 1, 2] and img[0, 2, 31, 0] == x[31, 0, 2, 0]
    assert torch.equal(img, torch.from_numpy(x).permute(3, 2, 0, 1))
    assert ds.splits["test"].labels.tolist() == [int(v) % 10 for v in y[:, 0]]
    assert ds.splits["test"].labels[0] == 0


def test_svhn_download_uses_torchvisions_urls(tmp_path, monkeypatch):
    calls = []

    def fake_download_url(url, root, filename=None, md5=None, **kw):
        calls.append((url, filename, md5))
        if len(calls) == 2:
            write_fake_svhn(Path(root))

    monkeypatch.setattr(svhn_source, "download_url", fake_download_url)
    prepare_dataset("svhn", root=tmp_path, download=True)
    assert calls == [
        (
            "http://ufldl.stanford.edu/housenumbers/train_32x32.mat",
            "train_32x32.mat",
            "e26dedcc434d2e4c54c9b2d4a06d8373",
        ),
        (
            "http://ufldl.stanford.edu/housenumbers/test_32x32.mat",
            "test_32x32.mat",
            "eb5a983be6a315427106f1b164d9cef3",
        ),
    ]


# ---------------------------------------------------------------- image folders


def write_png(path: Path, array: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path)


def test_imagefolder_layout(tmp_path):
    rng = np.random.default_rng(3)
    wide = rng.integers(0, 256, (4, 8, 3), dtype=np.uint8)  # (H, W, 3): crop keeps columns 2..5
    write_png(tmp_path / "train" / "zebra" / "a.png", wide)
    write_png(
        tmp_path / "train" / "ant" / "images" / "b.PNG",
        rng.integers(0, 256, (4, 4, 3), dtype=np.uint8),
    )
    write_png(
        tmp_path / "train" / "ant" / "images" / "c.png",
        rng.integers(0, 256, (4, 4, 3), dtype=np.uint8),
    )
    gray = rng.integers(0, 256, (4, 4), dtype=np.uint8)
    write_png(tmp_path / "val" / "zebra" / "d.png", gray)
    (tmp_path / "train" / "ant" / "notes.txt").write_text("not an image")

    ds = prepare_dataset("imagefolder", root=tmp_path, image_size=4, val_size=0)
    assert ds.meta["classes"] == ["ant", "zebra"] and ds.meta["image_shape"] == [3, 4, 4]
    assert ds.meta["sizes"] == {"train": 3, "val": 0, "test": 1}
    assert ds.splits["train"].labels.tolist() == [0, 0, 1]
    assert torch.equal(
        ds.splits["train"].images[2], torch.from_numpy(wide[:, 2:6]).permute(2, 0, 1)
    )
    # a grayscale image becomes RGB with three equal channels
    assert torch.equal(ds.splits["test"].images[0], torch.from_numpy(gray).expand(3, 4, 4))
    # shorter side to 2, then 2x2 centre crop: a flat-colour image stays that colour
    write_png(tmp_path / "train" / "ant" / "images" / "flat.png", np.full((6, 10, 3), 77, np.uint8))
    small = prepare_dataset("imagefolder", root=tmp_path, image_size=2, val_size=0)
    assert (small.splits["train"].images[2] == 77).all()

    with pytest.raises(ValueError, match="image_size"):
        prepare_dataset("imagefolder", root=tmp_path)
    write_png(tmp_path / "val" / "yak" / "e.png", gray)
    with pytest.raises(DataFileError, match=r"val.*not present in train: \['yak'\]"):
        prepare_dataset("imagefolder", root=tmp_path, image_size=4)


# ---------------------------------------------------------------- missing data


@pytest.mark.parametrize(
    "source, expected",
    [
        ("cifar10", "cifar-10-batches-py/batches.meta"),
        ("cifar100", "cifar-100-python/meta"),
        ("svhn", "train_32x32.mat"),
        ("imagefolder", "train"),
    ],
)
def test_missing_files_without_download_name_the_path(tmp_path, source, expected):
    with pytest.raises(FileNotFoundError) as err:
        prepare_dataset(source, root=tmp_path / "nowhere", image_size=8)
    assert str(tmp_path / "nowhere" / expected) in str(err.value)
    assert "point root at" in str(err.value)
    if source != "imagefolder":
        assert "download: true" in str(err.value)


# ---------------------------------------------------------------- the on-disk artifact


def test_save_load_round_trip_is_byte_identical(digits, tmp_path):
    save_prepared(digits, tmp_path / "a")
    save_prepared(digits, tmp_path / "b")
    names = sorted(p.name for p in (tmp_path / "a").iterdir())
    assert names == ["meta.json", "test.pt", "train.pt", "val.pt"]  # no temp files left behind
    for name in names:  # deterministic bytes, so DVC sees the same hash on a re-run
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes()
    loaded = load_prepared(tmp_path / "a")
    assert loaded.meta == digits.meta
    for s in ("train", "val", "test"):
        assert torch.equal(loaded.splits[s].images, digits.splits[s].images)
        assert torch.equal(loaded.splits[s].labels, digits.splits[s].labels)
        assert loaded.splits[s].images.dtype == torch.uint8
    only_test = load_prepared(tmp_path / "a", splits=("test",))
    assert list(only_test.splits) == ["test"]
    text = (tmp_path / "a" / "meta.json").read_text()
    assert text.startswith('{\n  "class_subset": null,')  # sorted keys, indent 2


def test_saving_a_view_writes_only_the_view(digits, tmp_path):
    sub = prepare_dataset("digits", classes=[0, 1])
    sub.splits["val"].images = digits.splits["train"].images[: len(sub.splits["val"])]  # a view
    save_prepared(sub, tmp_path)
    assert (tmp_path / "val.pt").stat().st_size < 20_000  # not the whole (1294, 1, 16, 16) base


@pytest.fixture
def saved(digits, tmp_path) -> Path:
    save_prepared(digits, tmp_path)
    return tmp_path


def test_truncated_split_file_names_the_file(saved):
    path = saved / "train.pt"
    path.write_bytes(path.read_bytes()[:1000])
    with pytest.raises(DataFileError, match=rf"{path}: torch.load failed"):
        load_prepared(saved)
    load_prepared(saved, splits=("val", "test"))  # the other files are still fine


def test_wrong_dtype_file_names_the_file(saved, digits):
    path = saved / "val.pt"
    split = digits.splits["val"]
    torch.save({"images": split.images, "labels": split.labels.int()}, path)
    with pytest.raises(DataFileError, match=rf"{path}: labels must be an int64"):
        load_prepared(saved)
    torch.save({"images": split.images.float(), "labels": split.labels}, path)
    with pytest.raises(DataFileError, match=rf"{path}: images must be a uint8"):
        load_prepared(saved)


def test_inconsistent_or_missing_files_name_the_file(saved, digits):
    split = digits.splits["test"]
    path = saved / "test.pt"
    torch.save({"images": split.images[:-1], "labels": split.labels[:-1]}, path)
    with pytest.raises(DataFileError, match=rf"{path}: 358 images, meta sizes\['test'\] says 359"):
        load_prepared(saved)
    torch.save({"images": split.images, "labels": split.labels + 5}, path)
    with pytest.raises(DataFileError, match=rf"{path}: labels span .* num_classes is 10"):
        load_prepared(saved)
    torch.save({"images": split.images, "labels": split.labels[:-1]}, path)
    with pytest.raises(DataFileError, match=rf"{path}: 359 images but 358 labels"):
        load_prepared(saved)
    path.unlink()
    with pytest.raises(DataFileError, match=rf"{path}: missing"):
        load_prepared(saved)
    (saved / "meta.json").write_text("{ not json")
    with pytest.raises(DataFileError, match="meta.json: not readable JSON"):
        load_prepared(saved, splits=("train",))
    with pytest.raises(DataFileError, match="meta.json: missing"):
        load_prepared(saved / "empty")
    with pytest.raises(ValueError, match="unknown splits"):
        load_prepared(saved, splits=("dev",))


def test_synthetic_source_has_the_requested_shape_and_is_reproducible():
    spec = {"channels": 3, "classes": 100, "train": 8, "test": 4}
    a = prepare_dataset("synthetic", image_size=32, val_size=4, synthetic=spec)
    b = prepare_dataset("synthetic", image_size=32, val_size=4, synthetic=spec)
    assert a.meta["image_shape"] == [3, 32, 32] and a.meta["num_classes"] == 100
    assert a.meta["sizes"] == {"train": 4, "val": 4, "test": 4}
    for split in ("train", "val", "test"):
        assert a.splits[split].images.dtype == torch.uint8
        assert torch.equal(a.splits[split].images, b.splits[split].images)
    assert sorted(a.splits["test"].labels.tolist()) == [0, 1, 2, 3]  # labels 0, 1, 2, ... in turn
