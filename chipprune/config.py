"""params.yaml schema: one typed, strict config object per stage. An unknown key, a wrong
type, a value out of range or an unknown name is one ConfigError naming the key and what
is allowed; stages turn it into exit code 2 before writing anything."""

from __future__ import annotations

import functools
import json
from pathlib import Path
from typing import Any, Literal, get_args

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from chipprune.budgets.rates import parse_rates, rates_to_widths

DATASET_SOURCES = ("digits", "cifar10", "cifar100", "svhn", "imagefolder", "imagenet",
                   "tiny_imagenet", "synthetic")
NEEDS_ROOT = ("cifar10", "cifar100", "svhn", "imagefolder", "imagenet", "tiny_imagenet")
FILE_SOURCES = ("imagefolder", "imagenet", "tiny_imagenet")  # encoded image files


class ConfigError(ValueError):
    """A params.yaml problem, already phrased for the user (key: what is wrong)."""


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class AugmentConfig(Strict):
    crop_padding: int = Field(4, ge=0, le=64)
    flip: bool = True


class SyntheticConfig(Strict):
    """Random images of a real dataset's shape (smoke runs of recipes: pipelines.smoke)."""

    channels: int = Field(ge=1, le=64)
    classes: int = Field(ge=2)
    train: int = Field(ge=2)  # images before val is carved from them
    test: int = Field(ge=1)


class DatasetConfig(Strict):
    source: Literal["digits", "cifar10", "cifar100", "svhn", "imagefolder", "imagenet",
                    "tiny_imagenet", "synthetic"]
    root: str | None = None
    download: bool = False
    classes: list[int] | None = None
    val_size: int | float = 0.1
    seed: int = 0
    image_size: int | None = Field(None, ge=4, le=1024)
    augment: AugmentConfig = AugmentConfig()
    synthetic: SyntheticConfig | None = None  # source synthetic only
    # memory: uint8 tensors held whole; shards: tar shards of encoded images streamed by
    # loader workers (ImageNet's augmentation); auto: shards where the decoded images would
    # exceed memory_limit_gb
    storage: Literal["memory", "shards", "auto"] = "auto"
    memory_limit_gb: float = Field(8.0, gt=0)
    shard_side: int | None = Field(None, ge=8)  # shards: re-encode where the short side is longer
    shard_size: int = Field(1000, ge=1)  # images per shard
    workers: int = Field(2, ge=1, le=256)  # processes that decode and encode while sharding
    skip_corrupt: bool = False  # leave unreadable images out (counted) instead of failing

    @field_validator("val_size")
    @classmethod
    def _val_size(cls, v: int | float) -> int | float:
        if isinstance(v, float) and not 0.0 < v < 1.0:
            raise ValueError(f"a fraction must be in (0, 1), got {v}")
        if isinstance(v, int) and v < 1:
            raise ValueError(f"a count must be at least 1, got {v}")
        return v

    @field_validator("classes")
    @classmethod
    def _classes(cls, v: list[int] | None) -> list[int] | None:
        if v is not None and (len(v) < 2 or len(set(v)) != len(v) or min(v) < 0):
            raise ValueError(f"need at least 2 distinct non-negative class indices, got {v}")
        return v

    @model_validator(mode="after")
    def _root(self) -> DatasetConfig:
        if self.source in NEEDS_ROOT:
            if self.root is None:
                raise ValueError(f"source {self.source!r} needs `root` (a local data folder)")
            if not self.download and not Path(self.root).expanduser().exists():
                raise ValueError(
                    f"root {self.root!r} does not exist; point it at the data or set download: true"
                )
        if self.source in (*FILE_SOURCES, "synthetic") and self.image_size is None:
            raise ValueError(f"source {self.source!r} needs `image_size`")
        if (self.source == "synthetic") != (self.synthetic is not None):
            raise ValueError("`synthetic` (channels, classes, train, test) goes with, and only "
                             "with, source 'synthetic'")
        return self


class ModelConfig(Strict):
    # a registered model, `torchvision:<builder>` or `<module>:<callable>` (any CNN, traced)
    arch: str
    kwargs: dict[str, Any] = {}
    # a local state dict to start train_dense from (pretrained weights; never downloaded)
    weights: str | None = None

    @model_validator(mode="after")
    def _known(self) -> ModelConfig:
        from chipprune.models import list_models

        external = ":" in self.arch
        if not external and self.arch not in list_models():
            raise ValueError(
                f"unknown arch {self.arch!r}; known: {', '.join(list_models())}, or "
                "'torchvision:<builder>' / '<module>:<callable>' for any CNN"
            )
        reserved = sorted({"num_classes", "in_channels", "widths", "kept"} & set(self.kwargs))
        if reserved:
            raise ValueError(f"kwargs {reserved} come from the dataset or surgery; remove them")
        if self.weights is not None and not Path(self.weights).expanduser().is_file():
            raise ValueError(f"weights: {self.weights!r} is not a file")
        _check_builds(self.arch, json.dumps(self.kwargs, sort_keys=True))
        return self


@functools.lru_cache(maxsize=64)
def _check_builds(arch: str, kwargs_json: str) -> None:
    """Build the model once per process: every kwarg is checked against the real constructor
    (a few ms for the CIFAR nets, about a second to trace a torchvision network; the meta
    device would be slower: its dispatch mode costs ~1 s), and a factory that cannot be
    imported, returns no module or cannot be traced is a params error before any stage runs."""
    import torch

    from chipprune.models import create_model, weights_uninitialised
    from chipprune.models.traced import ArchError, TraceError

    kwargs = json.loads(kwargs_json)
    try:
        with torch.no_grad(), weights_uninitialised():  # built to be checked, not run
            create_model(arch, **kwargs)
    except (ArchError, TraceError) as e:
        raise ValueError(str(e)) from None
    except (TypeError, ValueError, KeyError) as e:
        raise ValueError(f"kwargs {kwargs} rejected by {arch}: {e}") from None


class OptimizerConfig(Strict):
    lr: float = Field(0.1, gt=0, le=10)
    momentum: float = Field(0.9, ge=0, lt=1)
    weight_decay: float = Field(5e-4, ge=0, le=1)
    # which parameters weight_decay applies to: conv/linear weights only (ours), or every
    # parameter, BN affine and biases included (both papers' authors: torch's plain SGD)
    weight_decay_scope: Literal["weights", "all"] = "weights"
    nesterov: bool = True


class ScheduleConfig(Strict):
    kind: Literal["cosine", "step", "multistep", "constant"] = "cosine"
    warmup_epochs: float = Field(0.0, ge=0)
    step_size: int = Field(30, ge=1)  # kind=step: lr x gamma every step_size epochs
    # kind=multistep: lr x gamma at each of these epochs (torch's MultiStepLR)
    milestones: list[int] = []
    gamma: float = Field(0.1, gt=0, le=1)

    @model_validator(mode="after")
    def _milestones(self) -> ScheduleConfig:
        if self.kind == "multistep" and not self.milestones:
            raise ValueError("kind multistep needs `milestones` (epochs, e.g. [80, 120])")
        if self.milestones and (self.kind != "multistep" or self.milestones[0] < 1 or any(
                b <= a for a, b in zip(self.milestones, self.milestones[1:], strict=False))):
            raise ValueError(f"milestones {self.milestones}: only for kind multistep, "
                             "increasing epochs >= 1")
        return self


class DistributedConfig(Strict):
    """Data-parallel training (DDP): `nproc` local processes, each a shard of every global
    batch (`batch_size` stays the global batch). nproc > 1 re-launches the stage as that
    many ranks; gloo on CPU, nccl on CUDA (one GPU per rank)."""

    nproc: int = Field(1, ge=1, le=1024)
    # BatchNorm statistics over the global batch (one all-reduce per BN layer, forward and
    # backward): training then matches one process to float rounding. Off: per-rank
    # statistics over batch_size / nproc images, the usual DDP behaviour.
    sync_bn: bool = False


def _check_divisible(batch_size: int, d: DistributedConfig) -> None:
    if batch_size % d.nproc:
        raise ValueError(
            f"batch_size {batch_size} (the global batch) must be divisible by "
            f"distributed.nproc {d.nproc}"
        )


class TrainConfig(Strict):
    epochs: int = Field(30, ge=1, le=10_000)
    batch_size: int = Field(128, ge=1, le=65_536)
    eval_batch_size: int = Field(1024, ge=1)
    optimizer: OptimizerConfig = OptimizerConfig()
    schedule: ScheduleConfig = ScheduleConfig()
    label_smoothing: float = Field(0.0, ge=0, lt=1)
    # the weights the stage writes: the last epoch's, or those of the epoch with the best
    # validation top-1 (the first of equals; what the ChipNet authors keep)
    keep: Literal["last", "best_val"] = "last"
    seed: int = 0
    device: Literal["auto", "cpu", "cuda"] = "auto"
    channels_last: bool = True  # CUDA only
    bf16: bool = True  # CUDA only: autocast to bfloat16
    distributed: DistributedConfig = DistributedConfig()

    @model_validator(mode="after")
    def _global_batch(self) -> TrainConfig:
        _check_divisible(self.batch_size, self.distributed)
        return self


class LatencyConfig(Strict):
    """Measured in both memory formats (NCHW and channels_last), each batch size."""

    batch_sizes: list[int] = [1, 256]
    warmup: int = Field(5, ge=0)
    repeats: int = Field(20, ge=1)
    # the fastest of this many interleaved rounds of each median: load on a shared machine
    # only adds time (one noisy round moved a ResNet-20's time by 50% here)
    rounds: int = Field(3, ge=1)
    # a pruned model: also time its dense architecture in the same process -> speedup_bs<N>
    dense_reference: bool = True


class EvaluateConfig(Strict):
    batch_size: int = Field(1024, ge=1)
    device: Literal["auto", "cpu", "cuda"] = "auto"
    latency: LatencyConfig = LatencyConfig()

    @field_validator("latency")
    @classmethod
    def _positive(cls, v: LatencyConfig) -> LatencyConfig:
        if not v.batch_sizes or min(v.batch_sizes) < 1:
            raise ValueError("latency.batch_sizes must be a non-empty list of positive ints")
        return v


class ExportConfig(Strict):
    """The export stage: every evaluated model as ONNX, checked against PyTorch on the first
    `parity_images` test images, timed in ONNX Runtime at evaluate.latency's batch sizes."""

    parity_images: int = Field(256, ge=1)
    # the stage fails when max |logit difference| > tolerance * max(1, max |logit|)
    tolerance: float = Field(1e-4, gt=0, lt=1)
    device: Literal["cpu", "cuda"] = "cpu"  # ONNX Runtime's execution provider
    # torch's exporter: torch.export-based (its default), or TorchScript (deprecated by
    # PyTorch, 4-30x faster to export here; chipprune.deploy.onnx_export)
    exporter: Literal["dynamo", "torchscript"] = "dynamo"
    # processes the exports run in (forked, one thread each), before the timed part
    workers: int = Field(1, ge=1, le=256)


class LatencyBudgetConfig(Strict):
    """The `latency` budget's table (stage profile_latency): every prunable conv timed as
    conv + BN (+ residual add) + ReLU on the target device at the target batch size, on a
    grid of in/out widths (1, multiples of `step`, dense); chipprune.budgets.latency_table."""

    device: Literal["cpu", "cuda"] = "cpu"  # the target device (not where training runs)
    # the runtime the model ships in: eager PyTorch, or ONNX Runtime (the export stage's)
    runtime: Literal["torch", "onnxruntime"] = "torch"
    batch_size: int = Field(256, ge=1, le=65_536)
    step: int = Field(8, ge=1, le=1024)  # grid spacing; prune.round_to = step keeps widths on it
    # torch only; auto: the format the dense model runs faster in on the device (measured)
    memory_format: Literal["auto", "nchw", "channels_last"] = "auto"
    warmup: int = Field(3, ge=1)  # untimed forwards of each new module (its first is slow)
    repeats: int = Field(3, ge=1)  # forwards per timing (their median)
    # ... and both the warm-up and the timed forwards last at least this many ms (a layer at
    # batch 1 runs for microseconds: budgets.latency.MIN_MS; 0 in tests, where speed matters)
    min_ms: float = Field(10.0, ge=0)
    rounds: int = Field(5, ge=1)  # passes over every grid point; the fastest is kept
    # profile again (up to `attempts` in all) while the table's held-out check, a whole
    # model at half the widths, misses its measured time by more than this fraction
    max_check_error: float = Field(0.1, gt=0)
    attempts: int = Field(3, ge=1)
    # rest, scale and per-layer call fitted to whole models: the dense one, quarter and
    # three-quarter widths and this many random-width ones (0: no fit, rest closes the
    # dense model's gap)
    calibration: int = Field(4, ge=0)


class DenseGrid(Strict):
    datasets: list[str] = Field(min_length=1)
    models: list[str] = Field(min_length=1)


# latency: from the table of the profile_latency stage (`latency_budget`)
BudgetType = Literal["channel", "volume", "params", "flops", "latency"]


def parse_budget_label(label: str) -> tuple[str, float]:
    """'flops-0.125' -> ('flops', 0.125). A budget is named so in params.yaml, in stage names
    and in run folders: one string, so DVC can put it in a path as it is."""
    kind, sep, target = str(label).partition("-")
    allowed = ", ".join(get_args(BudgetType))
    if not sep or not target:
        raise ValueError(f"budget {label!r}: expected TYPE-TARGET, e.g. flops-0.125 (TYPE: {allowed})")
    if kind not in get_args(BudgetType):
        raise ValueError(f"budget {label!r}: type {kind!r} is not one of {allowed}")
    try:
        value = float(target)
    except ValueError:
        raise ValueError(f"budget {label!r}: target {target!r} is not a number") from None
    if not 0.0 < value <= 1.0:
        raise ValueError(f"budget {label!r}: target {value} must be in (0, 1]")
    return kind, value


# baseline_masks' methods: ours, Torch-Pruning's criteria (chipprune.methods.peers) and
# ModelOpt's FastNAS search (chipprune.methods.fastnas)
BaselineName = Literal["random", "l1", "uniform", "tp_magnitude", "tp_taylor", "tp_bn_scale",
                       "fastnas"]
MethodName = Literal["chipnet", "chip", "random", "l1", "uniform", "tp_magnitude", "tp_taylor",
                     "tp_bn_scale", "fastnas"]


class PruneGrid(Strict):
    """The pruning grid dvc.yaml expands: methods x budgets x datasets x models."""

    # Every method fine-tuned and evaluated; `baselines` are those made by baseline_masks.
    methods: list[MethodName] = Field(min_length=1)
    baselines: list[BaselineName] = []
    datasets: list[str] = Field(min_length=1)
    models: list[str] = Field(min_length=1)
    # TYPE-TARGET each, e.g. [flops-0.5, flops-0.125, latency-0.5]: a list, not types x
    # targets, because the types reach different floors (a latency table rarely goes below
    # a fifth of the dense time, FLOPs go to a hundredth)
    budgets: list[str] = Field(min_length=1)
    # Hardware-friendly widths: every method's thresholding keeps multiples of this many
    # channels per coupling group (or the dense width); 1 = any width.
    round_to: int = Field(1, ge=1, le=1024)

    @field_validator("budgets")
    @classmethod
    def _budgets(cls, v: list[str]) -> list[str]:
        for label in v:
            parse_budget_label(label)
        repeated = sorted({b for b in v if v.count(b) > 1})
        if repeated:
            raise ValueError(f"budgets listed twice: {repeated}")
        return v

    @model_validator(mode="after")
    def _baselines_are_methods(self) -> PruneGrid:
        missing = sorted(set(self.baselines) - set(self.methods))
        if missing:
            raise ValueError(f"baselines {missing} must also be listed in prune.methods")
        if "fastnas" in self.baselines:
            from chipprune.methods.fastnas import SUPPORTED_BUDGETS, modelopt_missing

            other = [b for b in self.budgets if parse_budget_label(b)[0] not in SUPPORTED_BUDGETS]
            if other:
                raise ValueError(
                    f"fastnas searches under a {' or '.join(SUPPORTED_BUDGETS)} constraint; "
                    f"budgets {other} are neither (list fastnas in a grid of those budgets)")
            why = modelopt_missing()
            if why:
                raise ValueError(why)
        return self


class ChipConfig(Strict):
    """CHIP scoring: the authors score 5 batches x 128 augmented training images."""

    batches: int = Field(5, ge=1)
    batch_size: int = Field(128, ge=1)
    augment: bool = True  # training augmentation on the scoring images, as the authors do
    # how a residual stream's block outputs combine into one score per channel
    # (chipprune.methods.chip.group_scores); sum: never worse in a seeded comparison
    # (docs/methods.md, residual-stream selection)
    combine: Literal["sum", "normalised"] = "sum"
    seed: int = 0
    device: Literal["auto", "cpu", "cuda"] = "auto"


class BaselinesConfig(Strict):
    seed: int = 0  # of the random baseline, and of tp_taylor's and fastnas's training images
    # tp_taylor: |w * dL/dw| with the gradients summed over this many batches of training
    # images (no augmentation, eval-mode BN)
    taylor_batches: int = Field(4, ge=1)
    taylor_batch_size: int = Field(64, ge=1)
    # fastnas: the score its search maximises is top-1 on the first `fastnas_score_images`
    # validation images; before each score it re-estimates BN statistics on
    # `fastnas_calibration_batches` seeded batches of `fastnas_batch_size` training images
    fastnas_score_images: int = Field(1024, ge=1)
    fastnas_calibration_batches: int = Field(4, ge=1)
    fastnas_batch_size: int = Field(64, ge=1)


class LearnMasksConfig(Strict):
    """ChipNet mask learning; defaults are the authors' (DESIGN.md section 4)."""

    epochs: int = Field(20, ge=1, le=10_000)
    batch_size: int = Field(32, ge=2)
    eval_batch_size: int = Field(1024, ge=1)
    lr: float = Field(1e-3, gt=0, le=1)
    # Adam moves zeta by about lr per step, and beta/gamma change per epoch: on a dataset
    # with far fewer steps per epoch than CIFAR (1,400 at batch 32), raise the gates' lr
    # so they travel as far per epoch. None = lr (the authors' setting).
    gate_lr: float | None = Field(None, gt=0, le=10)
    weight_decay: float = Field(1e-3, ge=0, le=1)  # on weights; zeta gets none
    w_budget: float = Field(30.0, ge=0)
    w_crisp: float = Field(10.0, ge=0)
    # Before each epoch's hard validation, re-estimate the binarised model's BN statistics
    # on this many training batches: until the gates are crisp, the soft model's statistics
    # include half-open channels the hard model no longer has. 0 = the authors' behaviour.
    bn_recalibration_batches: int = Field(0, ge=0)
    # The weights fine-tuning starts from: the ones learned with the gates (the authors') or
    # the dense model's, sliced by the learned masks. On a short schedule (the digits
    # default: 600 steps where CIFAR has 28,000) the gates are far from crisp and the
    # learned weights' binarised model is near chance; the masks themselves are good.
    finetune_from: Literal["learned", "dense"] = "learned"
    # The budget loss's channel count: the authors' sigmoid(steep (z - 0.5)) ("soft"), or
    # the hard count with the gradient of sum z ("straight_through", ours), whose gradient
    # does not vanish with the steepness (see ChannelGates.soft_count_vector).
    budget_count: Literal["soft", "straight_through"] = "soft"
    seed: int = 0
    device: Literal["auto", "cpu", "cuda"] = "auto"
    channels_last: bool = True
    bf16: bool = True
    distributed: DistributedConfig = DistributedConfig()

    @model_validator(mode="after")
    def _global_batch(self) -> LearnMasksConfig:
        _check_divisible(self.batch_size, self.distributed)
        return self


class TransferPair(Strict):
    """Masks a method learned on `teacher` applied to the same architecture on `student`."""

    method: MethodName
    budget: str  # TYPE-TARGET, one of prune.budgets: the teacher's masks come from the grid

    @field_validator("budget")
    @classmethod
    def _budget(cls, v: str) -> str:
        parse_budget_label(v)
        return v
    teacher: str
    student: str
    model: str
    # scratch: the pruned architecture trained from a fresh init (the ChipNet authors);
    # dense: the student's dense weights, sliced by the teacher's masks, fine-tuned.
    protocol: Literal["scratch", "dense"] = "scratch"


class RateConfig(Strict):
    """CHIP at given per-layer rates (the authors' published configurations), not a budget."""

    dataset: str
    model: str
    rates: str | list[float]  # a list, or the authors' form "[0.]+[0.15]*2+[0.4]*27"

    @field_validator("rates")
    @classmethod
    def _rates_parse(cls, v: str | list[float]) -> str | list[float]:
        parse_rates(v)  # the length is checked against the model by select_channels
        return v


class TransferConfig(Strict):
    recipe: TrainConfig = TrainConfig()
    pairs: dict[str, TransferPair] = {}


class Params(Strict):
    datasets: dict[str, DatasetConfig]
    models: dict[str, ModelConfig]
    dense: DenseGrid
    train_dense: TrainConfig = TrainConfig()
    evaluate: EvaluateConfig = EvaluateConfig()
    export: ExportConfig = ExportConfig()
    prune: PruneGrid | None = None
    latency_budget: LatencyBudgetConfig = LatencyBudgetConfig()
    learn_masks: LearnMasksConfig = LearnMasksConfig()
    baselines: BaselinesConfig = BaselinesConfig()
    chip: ChipConfig = ChipConfig()
    transfer: TransferConfig = TransferConfig()
    # CHIP at per-layer rates, one DVC stage chain per named configuration
    chip_rates: dict[str, RateConfig] = {}
    # Fine-tuning recipe per pruning method (chipnet, chip, ...): a TrainConfig each.
    finetune: dict[str, TrainConfig] = {}

    @model_validator(mode="after")
    def _grid_names(self) -> Params:
        for key, names, known in (
            ("dense.datasets", self.dense.datasets, self.datasets),
            ("dense.models", self.dense.models, self.models),
        ) + tuple(
            (f"transfer.pairs.{name}.{role}", [getattr(pair, role)], known)
            for name, pair in self.transfer.pairs.items()
            for role, known in (("teacher", self.datasets), ("student", self.datasets),
                                ("model", self.models))
        ) + (
            (("finetune", self.prune.methods, self.finetune),
             ("prune.datasets", self.prune.datasets, self.datasets),
             ("prune.models", self.prune.models, self.models)) if self.prune else ()
        ):
            for name in names:
                if name not in known:
                    raise ValueError(f"{key}: {name!r} is not defined; defined: {sorted(known)}")
        for name, rc in self.chip_rates.items():
            # the scores come from score_channels, which runs over the prune grid
            p = self.prune
            methods = p.methods if p else []
            for what, value, known in (("dataset", rc.dataset, p.datasets if p else []),
                                       ("model", rc.model, p.models if p else [])):
                if value not in known or "chip" not in methods:
                    raise ValueError(
                        f"chip_rates.{name}.{what}: {value!r} has no CHIP scores; add it to "
                        f"prune.{what}s (now {list(known)}) with chip in prune.methods"
                    )
            if "." in name:
                raise ValueError(f"chip_rates.{name}: a name may not contain '.' "
                                 "(DVC reads it as a key path)")
            _check_rates_fit(name, rc, self.models[rc.model])
        for name, pair in self.transfer.pairs.items():
            if "." in name:
                raise ValueError(f"transfer.pairs.{name}: a pair name may not contain '.' "
                                 "(DVC reads it as a key path)")
            if pair.teacher == pair.student:
                raise ValueError(f"transfer.pairs.{name}: teacher and student are the same dataset")
            p = self.prune
            if p is None or pair.method not in p.methods or pair.budget not in p.budgets or (
                    pair.teacher not in p.datasets or pair.model not in p.models):
                raise ValueError(
                    f"transfer.pairs.{name}: the teacher's masks come from the pruning grid: "
                    f"{pair.method!r}, {pair.budget!r}, {pair.teacher!r} and {pair.model!r} must "
                    "be in prune.methods, prune.budgets, prune.datasets and prune.models")
            if pair.student not in self.dense.datasets or pair.model not in self.dense.models:
                raise ValueError(f"transfer.pairs.{name}: the student needs a dense model: add "
                                 f"{pair.student!r} to dense.datasets and {pair.model!r} to dense.models")
        return self


def _check_rates_fit(name: str, rc: RateConfig, model: ModelConfig) -> None:
    """The rates must match the model's layout (its number of prunable layers)."""
    from chipprune.models import create_model, weights_uninitialised  # they load torch

    with weights_uninitialised():  # only its description is read
        spec = create_model(model.arch, **model.kwargs).describe()
    try:
        rates_to_widths(spec, rc.rates, model.arch)
    except ValueError as e:
        raise ValueError(f"chip_rates.{name}.rates: {e}") from None


def _format(err: ValidationError, source: str) -> str:
    """One line per problem: `params.yaml: a.b.c: message (got X)`."""
    lines = []
    for e in err.errors():
        key = ".".join(str(p) for p in e["loc"])
        msg = e["msg"].removeprefix("Value error, ")
        if e["type"] == "extra_forbidden":
            msg = "unknown key"
        elif e["type"] == "missing":
            msg = "required key is missing"
        got = "" if e["type"] in ("extra_forbidden", "missing") or "got " in msg else f" (got {e['input']!r})"
        if len(got) > 80:
            got = ""
        # Cross-section checks raise at the top level and name their keys themselves.
        lines.append(f"{source}: {msg}" if not e["loc"] else f"{source}: {key}: {msg}{got}")
    return "\n".join(lines)


def has_key(params: Any, dotted: str) -> bool:
    """Whether the raw params dict holds the dotted key ("a.b.c"), whatever its value."""
    node: Any = params
    for part in dotted.split("."):
        if not isinstance(node, dict) or part not in node:
            return False
        node = node[part]
    return True


def parse_params(raw: Any, source: str = "params.yaml") -> Params:
    if not isinstance(raw, dict):
        raise ConfigError(f"{source}: expected a mapping at the top level")
    try:
        return Params.model_validate(raw)
    except ValidationError as e:
        raise ConfigError(_format(e, source)) from None


def load_params(path: str | Path = "params.yaml") -> Params:
    path = Path(path)
    try:
        raw = yaml.safe_load(path.read_text())
    except FileNotFoundError:
        raise ConfigError(f"{path}: no such file") from None
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML: {str(e).splitlines()[0]}") from None
    return parse_params(raw, str(path))
