"""The training engine: exact augmentation, schedule values, determinism and resume."""

from __future__ import annotations

import math

import pytest
import torch

from chipprune.config import AugmentConfig, ScheduleConfig, TrainConfig
from chipprune.models import create_model
from chipprune.training.loop import evaluate, fit, lr_multiplier
from chipprune.training.resume import ResumeStore
from chipprune.training.sources import DeviceData, random_crop_flip


@pytest.fixture(autouse=True)
def one_thread():
    """The same float sums whatever the machine or the worker count: a fit's numbers (which
    epoch has the best validation score) depend on how many threads split the reductions,
    and `make test`'s workers run with one each."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def test_random_crop_flip_matches_explicit_slicing():
    x = torch.randint(0, 256, (6, 3, 5, 7), dtype=torch.uint8)
    pad = 2
    out = random_crop_flip(x, pad, True, torch.Generator().manual_seed(3))
    # Replay the same draws to build the expected result one image at a time.
    g = torch.Generator().manual_seed(3)
    oy = torch.randint(0, 2 * pad + 1, (6,), generator=g)
    ox = torch.randint(0, 2 * pad + 1, (6,), generator=g)
    coin = torch.rand(6, generator=g) < 0.5
    xp = torch.nn.functional.pad(x, (pad,) * 4)
    for i in range(6):
        crop = xp[i, :, oy[i] : oy[i] + 5, ox[i] : ox[i] + 7]
        expected = crop.flip(2) if coin[i] else crop
        assert torch.equal(out[i], expected)
    assert out.dtype == torch.uint8


def test_no_augmentation_is_identity():
    x = torch.randint(0, 256, (4, 1, 8, 8), dtype=torch.uint8)
    assert torch.equal(random_crop_flip(x, 0, False, torch.Generator()), x)


@pytest.mark.parametrize(
    ("step", "kind", "warmup", "expected"),
    [
        (0, "cosine", 0, 1.0),
        (50, "cosine", 0, 0.5),
        (100, "cosine", 0, 0.0),
        (0, "cosine", 1, 0.1),  # warmup over 10 steps: (0+1)/10
        (9, "cosine", 1, 1.0),
        (10, "cosine", 1, 1.0),
        (55, "cosine", 1, 0.5),
        (29, "step", 0, 1.0),
        (30, "step", 0, 0.5),
        (95, "step", 0, 0.125),
        (77, "constant", 0, 1.0),
    ],
)
def test_lr_multiplier(step, kind, warmup, expected):
    # 10 steps per epoch, 10 epochs; step schedule halves every 3 epochs.
    sched = ScheduleConfig(kind=kind, warmup_epochs=warmup, step_size=3, gamma=0.5)
    assert math.isclose(lr_multiplier(step, 10, 10, sched), expected, abs_tol=1e-12)


def _data(n=96, seed=0):
    g = torch.Generator().manual_seed(seed)
    labels = torch.arange(n) % 4
    # Class-dependent brightness makes the task learnable in a few steps.
    images = (torch.rand(n, 1, 8, 8, generator=g) * 60 + labels[:, None, None, None] * 60)
    meta = {"mean": [0.4], "std": [0.25]}

    class Split:
        pass

    s = Split()
    s.images, s.labels = images.to(torch.uint8), labels
    return DeviceData.from_split(s, meta, torch.device("cpu"))


CFG = TrainConfig(epochs=3, batch_size=16, seed=0, schedule=ScheduleConfig(warmup_epochs=1))
AUG = AugmentConfig(crop_padding=1, flip=True)


def _model():
    torch.manual_seed(0)
    return create_model("resnet20", num_classes=4, in_channels=1)


def test_fit_is_deterministic_and_learns():
    data = _data()
    a, b = _model(), _model()
    ha = fit(a, data, data, CFG, AUG).history
    hb = fit(b, data, data, CFG, AUG).history
    for pa, pb in zip(a.state_dict().values(), b.state_dict().values(), strict=True):
        assert torch.equal(pa, pb)
    assert [r["train_loss"] for r in ha] == [r["train_loss"] for r in hb]
    assert len(ha) == 3 and ha[-1]["epoch"] == 3
    assert ha[-1]["train_loss"] < ha[0]["train_loss"]


def test_resume_after_interruption_matches_uninterrupted(tmp_path):
    data = _data()
    ref = _model()
    ref_hist = fit(ref, data, data, CFG, AUG).history

    store = ResumeStore(tmp_path / "state.pt", "fp")

    def crash_after_two(row):
        if row["epoch"] == 2:
            raise KeyboardInterrupt  # stands in for a kill after the epoch-2 checkpoint

    with pytest.raises(KeyboardInterrupt):
        fit(_model(), data, data, CFG, AUG, resume=store, log=crash_after_two)
    assert store.path.exists()

    resumed = _model()
    result = fit(resumed, data, data, CFG, AUG, resume=store)
    assert result.resumed_from_epoch == 2
    for pa, pb in zip(ref.state_dict().values(), resumed.state_dict().values(), strict=True):
        assert torch.equal(pa, pb)
    assert [r["val_top1"] for r in result.history] == [r["val_top1"] for r in ref_hist]


def test_the_last_epoch_saves_no_resume_state(tmp_path):
    """The caller writes the checkpoint and clears the state right after the last epoch: a
    save there would be a whole model-and-optimizer write for nothing. The file holds the
    epoch before, and resuming from it repeats the last epoch to the same model."""
    data = _data()
    ref = _model()
    fit(ref, data, data, CFG, AUG)
    store = ResumeStore(tmp_path / "state.pt", "fp")
    fit(_model(), data, data, CFG, AUG, resume=store)
    assert store.load(quiet=True)["epoch"] == CFG.epochs - 1
    again = _model()
    assert fit(again, data, data, CFG, AUG, resume=store).resumed_from_epoch == CFG.epochs - 1
    for pa, pb in zip(ref.state_dict().values(), again.state_dict().values(), strict=True):
        assert torch.equal(pa, pb)


def test_resume_ignores_state_of_another_config(tmp_path):
    store = ResumeStore(tmp_path / "state.pt", "config-a")
    store.save({"epoch": 1})
    assert ResumeStore(tmp_path / "state.pt", "config-b").load() is None
    assert not (tmp_path / "state.pt").exists()


def test_evaluate_counts_top1_and_top5_exactly():
    class Fixed(torch.nn.Module):
        def forward(self, x):
            # Scores rank class 0 > 1 > ... > 5 for every image.
            return torch.arange(6, 0, -1, dtype=torch.float32).expand(x.shape[0], 6)

    class Split:
        images = torch.zeros(6, 1, 2, 2, dtype=torch.uint8)
        labels = torch.tensor([0, 1, 2, 3, 4, 5])

    data = DeviceData.from_split(Split, {"mean": [0.0], "std": [1.0]}, torch.device("cpu"))
    out = evaluate(Fixed(), data, batch_size=4)
    assert out["top1"] == pytest.approx(1 / 6)
    assert out["top5"] == pytest.approx(5 / 6)


def test_multistep_schedule_is_torchs_multisteplr():
    """PreResNet's "x0.1 at 50% and 75%" of 160 epochs: lr x0.1 at epoch 80 and at 120,
    the same factors torch's MultiStepLR gives epoch by epoch."""
    sched = ScheduleConfig(kind="multistep", milestones=[80, 120], gamma=0.1)
    opt = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=1.0)
    ref = torch.optim.lr_scheduler.MultiStepLR(opt, milestones=[80, 120], gamma=0.1)
    for epoch in range(160):
        for step in (epoch * 7, epoch * 7 + 6):  # first and last step of the epoch
            assert lr_multiplier(step, 7, 160, sched) == pytest.approx(
                opt.param_groups[0]["lr"], rel=1e-12), epoch
        opt.step()
        ref.step()
    assert lr_multiplier(119 * 7, 7, 160, sched) == pytest.approx(0.1)
    assert lr_multiplier(120 * 7, 7, 160, sched) == pytest.approx(0.01)


@pytest.mark.parametrize(("schedule", "message"), [
    ({"kind": "multistep"}, "kind multistep needs `milestones`"),
    ({"kind": "cosine", "milestones": [10]}, "only for kind multistep"),
    ({"kind": "multistep", "milestones": [10, 10]}, "increasing epochs"),
    ({"kind": "multistep", "milestones": [0, 10]}, "increasing epochs >= 1"),
])
def test_bad_milestones_are_refused(schedule, message):
    with pytest.raises(ValueError, match=message):
        ScheduleConfig(**schedule)


def test_weight_decay_scope():
    from chipprune.training.loop import sgd

    model = create_model("resnet20", num_classes=4, in_channels=1)
    n_all = sum(1 for _ in model.parameters())
    n_weights = sum(1 for p in model.parameters() if p.ndim > 1)  # convs and the fc weight
    for scope, decayed in (("weights", n_weights), ("all", n_all)):
        cfg = TrainConfig(optimizer={"weight_decay": 1e-3, "weight_decay_scope": scope})
        groups = sgd(model, cfg).param_groups
        assert [len(g["params"]) for g in groups] == [decayed, n_all - decayed]
        assert [g["weight_decay"] for g in groups] == [1e-3, 0.0]
    with pytest.raises(ValueError, match="weight_decay_scope"):
        TrainConfig(optimizer={"weight_decay_scope": "bn"})


def test_keep_best_val_ends_on_the_best_epochs_weights_and_resumes(tmp_path):
    train, val = _data(), _data(n=48, seed=1)
    cfg = TrainConfig(epochs=6, batch_size=16, seed=0, keep="best_val",
                      optimizer={"lr": 0.5}, schedule=ScheduleConfig(kind="constant"))
    model = _model()
    result = fit(model, train, val, cfg, AUG)
    tops = [r["val_top1"] for r in result.history]
    assert result.kept_epoch == tops.index(max(tops)) + 1 < len(tops)  # not the last here
    assert evaluate(model, val, 1024)["top1"] == max(tops) == result.kept["val_top1"]
    last = _model()
    fit(last, train, val, cfg.model_copy(update={"keep": "last"}), AUG)
    assert evaluate(last, val, 1024)["top1"] == tops[-1]  # same run, its last weights

    store = ResumeStore(tmp_path / "state.pt", "fp")

    def crash(row):
        if row["epoch"] == len(tops) - 1:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        fit(_model(), train, val, cfg, AUG, resume=store, log=crash)
    resumed = _model()
    again = fit(resumed, train, val, cfg, AUG, resume=store)
    assert again.kept_epoch == result.kept_epoch  # the best survived the kill
    for a, b in zip(model.state_dict().values(), resumed.state_dict().values(), strict=True):
        assert torch.equal(a, b)
