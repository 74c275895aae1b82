"""The typed schema of a job: every YAML file under conf/ and jobs/ extends one of these dataclasses.

store.py registers them in Hydra's ConfigStore, so a misspelled key or a value of the wrong type fails
at composition with the key named. Rules that span several fields live in ``__post_init__`` and raise
``ValueError`` with a message that names the key and what is allowed. Nothing here reads the
environment or imports torch: checks that need the machine live in ``checks.py``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from enum import Enum
from typing import Any, ClassVar, Optional
from urllib.parse import parse_qsl, urlsplit

from omegaconf import MISSING


class Precision(str, Enum):
    fp32 = "fp32"
    bf16 = "bf16"
    fp16 = "fp16"


class Device(str, Enum):
    auto = "auto"
    cpu = "cpu"
    cuda = "cuda"


class OnNonFinite(str, Enum):
    error = "error"
    skip = "skip"


@dataclass(frozen=True)
class Resume:
    """``trainer.resume`` parsed once: ``auto`` (this run dir's newest valid checkpoint, if any), ``never``
    (a fresh start; a run dir holding checkpoints is refused), or ``path`` (a checkpoint, a
    ``checkpoints/`` dir or a run dir, which must hold a valid checkpoint)."""

    AUTO: ClassVar[str] = "auto"
    NEVER: ClassVar[str] = "never"

    value: str

    @property
    def auto(self) -> bool:
        return self.value == self.AUTO

    @property
    def never(self) -> bool:
        return self.value == self.NEVER

    @property
    def path(self) -> str | None:
        """The checkpoint path the run starts from; None for ``auto`` and ``never``."""
        return None if self.value in (self.AUTO, self.NEVER) else self.value


class OptimName(str, Enum):
    sgd = "sgd"
    adam = "adam"
    adamw = "adamw"


class ScheduleName(str, Enum):
    constant = "constant"
    cosine = "cosine"
    exponential = "exponential"
    onecycle = "onecycle"


class TokenizerKind(str, Enum):
    bpe = "bpe"  # a byte-level BPE of data.vocab_size tokens, trained on the corpus
    bytes = "bytes"  # the UTF-8 bytes, 256 ids
    pretrained = "pretrained"  # data.tokenizer_dir's tokenizer.json (model.pretrained's, under data=text)


class Offload(str, Enum):
    none = "none"
    cpu = "cpu"


class SampleKind(str, Enum):
    """What a dataset yields and a model consumes."""

    tokens = "tokens"
    images = "images"


def require(condition: bool, message: str) -> None:
    if not condition:
        raise ValueError(message)


def positive(prefix: str, **values: float) -> None:
    # inf passes `> 0` and nan fails every comparison with a misleading message: say finite.
    for key, value in values.items():
        require(math.isfinite(value) and value > 0, f"{prefix}.{key} must be > 0 and finite, got {value}")


def non_negative(prefix: str, *, note: str = "", **values: float) -> None:
    for key, value in values.items():
        require(math.isfinite(value) and value >= 0, f"{prefix}.{key} must be >= 0 and finite{note}, got {value}")


# ---------------------------------------------------------------------------------------------- models


@dataclass(kw_only=True)
class LoRAConfig:
    """Low-rank adapters (LoRA, through the peft library): ``rank`` 0 trains the whole model.

    With ``rank`` > 0, each target module's weight W stays frozen and the model learns
    W + (alpha / rank) * B @ A, with A (rank x in) and B (out x rank) the only parameters that get
    gradients and optimizer state. ``target_modules`` are module names or name suffixes (peft's rule:
    ``q_proj`` matches ``model.layers.0.self_attn.q_proj``); empty means every ``nn.Linear`` in the
    model's repeated blocks. ``base_dtype: bf16`` keeps the frozen weights in bf16 (needs
    ``trainer.precision=bf16``): half the base's memory, the adapters and their optimizer state stay fp32.
    """

    rank: int = 0
    alpha: float = 16.0
    dropout: float = 0.0
    target_modules: list[str] = field(default_factory=list)
    base_dtype: Precision = Precision.fp32

    def __post_init__(self) -> None:
        require(self.rank >= 0, f"model.lora.rank must be >= 0 (0 = no LoRA), got {self.rank}")
        positive("model.lora", alpha=self.alpha)
        require(0.0 <= self.dropout < 1.0, f"model.lora.dropout must be in [0, 1), got {self.dropout}")
        require(self.base_dtype is not Precision.fp16, "model.lora.base_dtype must be fp32 or bf16, got fp16")
        if self.rank == 0:
            require(
                not self.target_modules and self.base_dtype is Precision.fp32,
                "model.lora.target_modules and model.lora.base_dtype need model.lora.rank > 0",
            )

    @property
    def enabled(self) -> bool:
        return self.rank > 0


@dataclass(kw_only=True)
class ModelConfig:
    name: str = MISSING
    lora: LoRAConfig = field(default_factory=LoRAConfig)
    input_kind: ClassVar[SampleKind]


@dataclass(kw_only=True)
class GPTConfig(ModelConfig):
    """Decoder-only transformer. ``vocab_size`` and ``block_size`` default to the data's.

    ``pretrained`` is a local GPT-2 directory (what ``orchestrator export`` writes of a ``model=gpt`` run):
    the sizes come from its ``config.json`` (``model=gpt`` fills them in; a job may repeat them, not change
    them) and the weights from its safetensors files. ``bias`` stays the job's: GPT-2 files always hold
    biases, and ``bias=false`` loads them only if they are zero (an export of a GPT without biases).
    """

    name: str = "gpt"
    n_layer: int = 4
    n_head: int = 4
    n_embd: int = 256
    dropout: float = 0.0
    bias: bool = False
    vocab_size: Optional[int] = None
    block_size: Optional[int] = None
    pretrained: Optional[str] = None
    input_kind: ClassVar[SampleKind] = SampleKind.tokens

    def __post_init__(self) -> None:
        positive("model", n_layer=self.n_layer, n_head=self.n_head, n_embd=self.n_embd)
        require(
            self.n_embd % self.n_head == 0,
            f"model.n_embd={self.n_embd} must be divisible by model.n_head={self.n_head}",
        )
        require(0.0 <= self.dropout < 1.0, f"model.dropout must be in [0, 1), got {self.dropout}")
        if self.vocab_size is not None:
            positive("model", vocab_size=self.vocab_size)
        if self.block_size is not None:
            positive("model", block_size=self.block_size)


@dataclass(kw_only=True)
class MLPConfig(ModelConfig):
    """Fully connected classifier over flattened images or feature vectors."""

    name: str = "mlp"
    hidden_sizes: list[int] = field(default_factory=lambda: [256, 256])
    dropout: float = 0.0
    input_kind: ClassVar[SampleKind] = SampleKind.images

    def __post_init__(self) -> None:
        require(len(self.hidden_sizes) > 0, "model.hidden_sizes must list at least one layer width")
        for width in self.hidden_sizes:
            require(width > 0, f"model.hidden_sizes must be positive, got {self.hidden_sizes}")
        require(0.0 <= self.dropout < 1.0, f"model.dropout must be in [0, 1), got {self.dropout}")


@dataclass(kw_only=True)
class CNNConfig(ModelConfig):
    """Small ResNet: one stage of residual blocks per width, downsampling between stages."""

    name: str = "cnn"
    widths: list[int] = field(default_factory=lambda: [16, 32, 64])
    blocks_per_stage: int = 1
    input_kind: ClassVar[SampleKind] = SampleKind.images

    def __post_init__(self) -> None:
        require(len(self.widths) > 0, "model.widths must list at least one stage width")
        for width in self.widths:
            require(width > 0, f"model.widths must be positive, got {self.widths}")
        positive("model", blocks_per_stage=self.blocks_per_stage)


@dataclass(kw_only=True)
class LSTMConfig(ModelConfig):
    """LSTM language model (next-token prediction)."""

    name: str = "lstm"
    n_embd: int = 128
    hidden_size: int = 256
    n_layer: int = 2
    dropout: float = 0.0
    vocab_size: Optional[int] = None
    input_kind: ClassVar[SampleKind] = SampleKind.tokens

    def __post_init__(self) -> None:
        positive("model", n_embd=self.n_embd, hidden_size=self.hidden_size, n_layer=self.n_layer)
        require(0.0 <= self.dropout < 1.0, f"model.dropout must be in [0, 1), got {self.dropout}")


@dataclass(kw_only=True)
class HFConfig(ModelConfig):
    """Any transformers causal LM, built from a config dict (never downloads weights).

    ``config`` is what ``transformers.AutoConfig.for_model`` takes: ``model_type`` plus its fields.
    ``vocab_size`` and ``max_position_embeddings`` default to the data's when the dict leaves them out.
    ``pretrained`` is a local ``save_pretrained`` directory: the architecture comes from its
    ``config.json`` (``config`` may repeat its values, not change them) and the weights from its
    safetensors files.
    """

    name: str = "hf"
    config: dict[str, Any] = field(default_factory=dict)
    attn_implementation: str = "sdpa"
    pretrained: Optional[str] = None
    input_kind: ClassVar[SampleKind] = SampleKind.tokens

    def __post_init__(self) -> None:
        require(
            self.pretrained is not None or isinstance(self.config.get("model_type"), str),
            "model.config.model_type is required (e.g. llama, gpt2, qwen2, mistral), or model.pretrained=DIR",
        )
        require(
            self.attn_implementation in ("sdpa", "eager"),
            f"model.attn_implementation must be sdpa or eager, got {self.attn_implementation!r}",
        )


# ------------------------------------------------------------------------------------------------ data


@dataclass(kw_only=True)
class DataConfig:
    name: str = MISSING

    @property
    def output_kind(self) -> SampleKind:
        """What the data yields; each data config sets it (a class attribute, or a property of its fields)."""
        raise NotImplementedError(f"{type(self).__name__} does not say what it yields (output_kind)")

    @property
    def targets(self) -> TargetKind:
        """What the targets are: class ids (the next token, for token data) unless the data config says otherwise."""
        return TargetKind.classes

    @property
    def seq_len_or_none(self) -> Optional[int]:
        return None


@dataclass(kw_only=True)
class TextDataConfig(DataConfig):
    """A text corpus from local files or folders, tokenized once and cached as token files (uint16, uint32 past 65,536 ids).

    An empty ``paths`` means the Python standard library's own ``.py`` sources, found at run time.
    ``tokenizer=pretrained`` tokenizes with ``tokenizer_dir``'s ``tokenizer.json`` (a ``save_pretrained``
    directory); the vocabulary is then its ``config.json``'s ``vocab_size`` (the model's), or the tokenizer's
    own size where there is no ``config.json``, and ``vocab_size`` is not used.
    """

    name: str = "text"
    output_kind: ClassVar[SampleKind] = SampleKind.tokens
    paths: list[str] = field(default_factory=list)
    suffixes: list[str] = field(default_factory=lambda: [".py", ".txt", ".md", ".rst"])
    tokenizer: TokenizerKind = TokenizerKind.bpe
    tokenizer_dir: Optional[str] = None
    vocab_size: int = 4096
    seq_len: int = 256
    val_fraction: float = 0.05
    max_bytes: int = 0
    cache_dir: str = "~/.cache/orchestrator"

    def __post_init__(self) -> None:
        positive("data", seq_len=self.seq_len)
        require(0.0 < self.val_fraction < 0.5, f"data.val_fraction must be in (0, 0.5), got {self.val_fraction}")
        require(self.max_bytes >= 0, f"data.max_bytes must be >= 0 (0 = no limit), got {self.max_bytes}")
        require(
            self.tokenizer is not TokenizerKind.pretrained or bool(self.tokenizer_dir),
            "data.tokenizer=pretrained needs data.tokenizer_dir=DIR, a directory with a tokenizer.json "
            "(data=text sets it to model.pretrained)",
        )
        if self.tokenizer is TokenizerKind.bpe:
            require(
                512 <= self.vocab_size <= 262144,
                f"data.vocab_size must be in [512, 262144] for the bpe tokenizer, got {self.vocab_size}",
            )

    @property
    def seq_len_or_none(self) -> Optional[int]:
        return self.seq_len


@dataclass(kw_only=True)
class MemmapDataConfig(DataConfig):
    """nanoGPT-style token files: ``train.bin`` and ``val.bin`` and ``meta.json`` in ``path`` (uint16 ids, or the
    ``dtype`` meta.json names: uint32 for a vocabulary past 65,536 ids)."""

    name: str = "memmap"
    output_kind: ClassVar[SampleKind] = SampleKind.tokens
    path: str = MISSING
    seq_len: int = 256

    def __post_init__(self) -> None:
        positive("data", seq_len=self.seq_len)

    @property
    def seq_len_or_none(self) -> Optional[int]:
        return self.seq_len


class TargetKind(str, Enum):
    """What the targets of image or feature-vector data are, which decides the losses that fit (``LOSSES_FOR``)."""

    classes = "classes"  # one integer class id per sample
    values = "values"  # float targets, k per sample (regression)
    probabilities = "probabilities"  # float targets in [0, 1], one per label (binary or multi-label)


@dataclass(kw_only=True)
class AugmentConfig:
    """Random changes to each training sample, drawn anew each time the stream reaches it; eval never sees them.

    ``crop_padding``: shift the image by up to this many pixels each way, the uncovered border filled with
    its edge pixels (a random crop of the edge-padded image). ``flip``: mirror left-right half the time; off
    unless asked for, since digits and letters are not mirror-symmetric. ``rotate_degrees``: rotate by an
    angle drawn from [-d, d]. ``noise_std``: add Gaussian noise, in the units of the normalized inputs. The
    first three need images shaped (C, H, W); noise fits feature vectors too. Sample ``i`` in epoch ``e`` of
    a run with seed ``s`` is always changed the same way (its randomness comes from ``(s, e, i)``), so a
    resumed run sees exactly what an uninterrupted one saw, with no generator state to save.
    """

    crop_padding: int = 0
    flip: bool = False
    rotate_degrees: float = 0.0
    noise_std: float = 0.0

    def __post_init__(self) -> None:
        require(self.crop_padding >= 0, f"data.augment.crop_padding must be >= 0 (0 = off), got {self.crop_padding}")
        require(
            0.0 <= self.rotate_degrees <= 180.0,
            f"data.augment.rotate_degrees must be in [0, 180] (0 = off), got {self.rotate_degrees}",
        )
        non_negative("data.augment", note=" (0 = off)", noise_std=self.noise_std)

    @property
    def enabled(self) -> bool:
        return self.spatial or self.noise_std > 0

    @property
    def spatial(self) -> bool:
        """Whether it moves pixels (crop, flip, rotation), which needs images shaped (C, H, W)."""
        return self.crop_padding > 0 or self.flip or self.rotate_degrees > 0


@dataclass(kw_only=True)
class DigitsDataConfig(DataConfig):
    """scikit-learn's bundled 8x8 handwritten digits (1,797 images, 10 classes)."""

    name: str = "digits"
    output_kind: ClassVar[SampleKind] = SampleKind.images
    targets: ClassVar[TargetKind] = TargetKind.classes
    val_fraction: float = 0.2
    augment: AugmentConfig = field(default_factory=AugmentConfig)

    def __post_init__(self) -> None:
        require(0.0 < self.val_fraction < 0.5, f"data.val_fraction must be in (0, 0.5), got {self.val_fraction}")


@dataclass(kw_only=True)
class DiabetesDataConfig(DataConfig):
    """scikit-learn's bundled diabetes data: 442 patients, 10 features, one float target (disease progression a
    year on). Features and target are standardized with the train split's mean and std, so an MSE of 1 is what
    predicting the mean scores."""

    name: str = "diabetes"
    output_kind: ClassVar[SampleKind] = SampleKind.images
    targets: ClassVar[TargetKind] = TargetKind.values
    val_fraction: float = 0.2
    augment: AugmentConfig = field(default_factory=AugmentConfig)  # feature vectors: noise_std only

    def __post_init__(self) -> None:
        require(0.0 < self.val_fraction < 0.5, f"data.val_fraction must be in (0, 0.5), got {self.val_fraction}")


@dataclass(kw_only=True)
class NpzDataConfig(DataConfig):
    """Arrays from a ``.npz`` file: inputs ``x`` (N, ...) and targets ``y``.

    ``targets`` says what ``y`` holds: ``classes``, integer class ids (N,); ``values``, floats (N,) or (N, k)
    for regression; ``probabilities``, floats in [0, 1] (N,) or (N, k), one column per label, for ``bce``.
    """

    name: str = "npz"
    output_kind: ClassVar[SampleKind] = SampleKind.images
    path: str = MISSING
    x_key: str = "x"
    y_key: str = "y"
    targets: TargetKind = TargetKind.classes
    val_fraction: float = 0.1
    augment: AugmentConfig = field(default_factory=AugmentConfig)

    def __post_init__(self) -> None:
        require(0.0 < self.val_fraction < 0.5, f"data.val_fraction must be in (0, 0.5), got {self.val_fraction}")


@dataclass(kw_only=True)
class SyntheticDataConfig(DataConfig):
    """Generated data for benchmarks: random tokens or random images with random labels."""

    name: str = "synthetic"
    kind: SampleKind = SampleKind.tokens
    num_samples: int = 4096
    seq_len: int = 256
    vocab_size: int = 50304
    image_shape: list[int] = field(default_factory=lambda: [3, 32, 32])
    num_classes: int = 10
    targets: ClassVar[TargetKind] = TargetKind.classes
    augment: AugmentConfig = field(default_factory=AugmentConfig)

    def __post_init__(self) -> None:
        positive(
            "data",
            num_samples=self.num_samples,
            seq_len=self.seq_len,
            vocab_size=self.vocab_size,
            num_classes=self.num_classes,
        )
        require(
            len(self.image_shape) == 3 and all(d > 0 for d in self.image_shape),
            f"data.image_shape must be [channels, height, width], got {self.image_shape}",
        )
        require(
            self.kind is SampleKind.images or not self.augment.enabled,
            "data.augment applies to images and feature vectors; data.kind=tokens yields token ids",
        )

    @property
    def output_kind(self) -> SampleKind:
        return self.kind

    @property
    def seq_len_or_none(self) -> Optional[int]:
        return self.seq_len if self.kind is SampleKind.tokens else None


# ------------------------------------------------------------------------------------------ strategies


@dataclass(kw_only=True)
class StrategyConfig:
    """Options every strategy takes: activation checkpointing and ``torch.compile`` per repeated block,
    applied in that order before the strategy wraps or shards the model. Each strategy's own options
    are a subclass in its package (``orchestrator/strategies/<package>/__init__.py``)."""

    name: str = MISSING
    activation_checkpointing: bool = False
    compile: bool = False
    max_world_size: ClassVar[Optional[int]] = None


# ------------------------------------------------------------------------------ optimizer and schedule


@dataclass(kw_only=True)
class OptimConfig:
    """The optimizer. SGD with momentum is ``name=sgd`` with ``momentum > 0``."""

    name: OptimName = OptimName.adamw
    lr: float = 3e-4
    weight_decay: float = 0.0
    betas: list[float] = field(default_factory=lambda: [0.9, 0.95])
    eps: float = 1e-8
    momentum: float = 0.0
    nesterov: bool = False

    def __post_init__(self) -> None:
        positive("optim", lr=self.lr, eps=self.eps)
        non_negative("optim", weight_decay=self.weight_decay)
        require(
            len(self.betas) == 2 and all(0.0 <= b < 1.0 for b in self.betas),
            f"optim.betas must be two numbers in [0, 1), got {self.betas}",
        )
        require(0.0 <= self.momentum < 1.0, f"optim.momentum must be in [0, 1), got {self.momentum}")
        if self.name is not OptimName.sgd:
            require(
                self.momentum == 0.0 and not self.nesterov,
                f"optim.momentum and optim.nesterov apply to optim.name=sgd only, not {self.name.value}",
            )
        require(not self.nesterov or self.momentum > 0, "optim.nesterov needs optim.momentum > 0")


@dataclass(kw_only=True)
class SchedulerConfig:
    """Learning-rate schedule as a pure function of the step (so resume needs no scheduler state).

    constant: lr after ``warmup_steps`` of linear warmup. cosine: warmup, then cosine decay to
    ``min_lr_ratio * lr`` at the last step. exponential: warmup, then ``lr * gamma**(step - warmup)``.
    onecycle: cosine rise from ``lr / div_factor`` to ``lr`` over ``pct_start`` of the run, then cosine
    fall to ``lr / div_factor / final_div_factor`` (torch's OneCycleLR, learning rate only).
    """

    name: ScheduleName = ScheduleName.cosine
    warmup_steps: int = 0
    min_lr_ratio: float = 0.1
    gamma: float = 0.999
    pct_start: float = 0.3
    div_factor: float = 25.0
    final_div_factor: float = 1e4

    def __post_init__(self) -> None:
        require(self.warmup_steps >= 0, f"scheduler.warmup_steps must be >= 0, got {self.warmup_steps}")
        require(0.0 <= self.min_lr_ratio <= 1.0, f"scheduler.min_lr_ratio must be in [0, 1], got {self.min_lr_ratio}")
        require(0.0 < self.gamma <= 1.0, f"scheduler.gamma must be in (0, 1], got {self.gamma}")
        require(0.0 < self.pct_start < 1.0, f"scheduler.pct_start must be in (0, 1), got {self.pct_start}")
        positive("scheduler", div_factor=self.div_factor, final_div_factor=self.final_div_factor)
        if self.name is ScheduleName.onecycle:
            require(
                self.warmup_steps == 0,
                "scheduler.warmup_steps does not apply to onecycle: its rise is scheduler.pct_start",
            )


# --------------------------------------------------------------------------------------------- trainer


@dataclass(kw_only=True)
class CheckpointConfig:
    every: int = 100
    keep: int = 2
    at_end: bool = True
    # Training waits only for a host copy of the state; the files are written in the background
    # (docs/checkpoints.md). ("async" itself is a Python keyword, so no dataclass field can have that name.)
    async_save: bool = True

    def __post_init__(self) -> None:
        require(self.every >= 0, f"trainer.checkpoint.every must be >= 0 (0 = only at the end), got {self.every}")
        require(
            self.keep >= 2,
            f"trainer.checkpoint.keep must be >= 2 (one to fall back on if the newest is damaged), got {self.keep}",
        )


@dataclass(kw_only=True)
class EarlyStoppingConfig:
    """Stop when eval loss has not improved by ``min_delta`` for ``patience`` evaluations (0 = off)."""

    patience: int = 0
    min_delta: float = 0.0

    def __post_init__(self) -> None:
        require(self.patience >= 0, f"trainer.early_stopping.patience must be >= 0, got {self.patience}")
        non_negative("trainer.early_stopping", min_delta=self.min_delta)


@dataclass(kw_only=True)
class ProfileConfig:
    """A ``torch.profiler`` trace of optimizer steps ``start_step + 1`` to ``start_step + steps`` on every rank,
    under ``RUN_DIR/profile/`` (``train/profile.py``); ``steps`` 0 = off."""

    start_step: int = 0
    steps: int = 0
    record_shapes: bool = False

    def __post_init__(self) -> None:
        require(self.start_step >= 0, f"trainer.profile.start_step must be >= 0, got {self.start_step}")
        require(self.steps >= 0, f"trainer.profile.steps must be >= 0 (0 = off), got {self.steps}")


class LossName(str, Enum):
    cross_entropy = "cross_entropy"
    mse = "mse"
    l1 = "l1"
    huber = "huber"
    bce = "bce"


# The losses that fit each kind of target; token data's targets are class ids (the next token).
LOSSES_FOR: dict[TargetKind, tuple[LossName, ...]] = {
    TargetKind.classes: (LossName.cross_entropy,),
    TargetKind.values: (LossName.mse, LossName.l1, LossName.huber),
    TargetKind.probabilities: (LossName.bce, LossName.mse, LossName.l1, LossName.huber),
}
_TARGET_WORDS = {
    TargetKind.classes: "class ids",
    TargetKind.values: "float targets",
    TargetKind.probabilities: "float targets in [0, 1]",
}


def loss_problem(loss: LossName, targets: TargetKind, *, data: str, tokens: bool) -> Optional[str]:
    """Why ``trainer.loss`` cannot score ``data``'s targets, in one line; None when it can.

    Args:
        loss: the configured loss.
        targets: what the data's targets are.
        data: the data's name, for the message.
        tokens: the data is token ids (a language model's next-token targets).
    """
    allowed = LOSSES_FOR[targets]
    if loss in allowed:
        return None
    what = "token ids" if tokens else _TARGET_WORDS[targets]
    hint = " (bce needs float targets in [0, 1], one column per label)" if loss is LossName.bce else ""
    return (
        f"trainer.loss={loss.value} does not fit data={data}, which yields {what}; allowed: "
        f"{', '.join(name.value for name in allowed)}{hint}"
    )


@dataclass(kw_only=True)
class TrainerConfig:
    """The training loop. ``global_batch_size`` = ``micro_batch_size`` x accumulation x world size.

    ``loss`` scores the model's outputs against the data's targets: ``cross_entropy`` for class ids and tokens,
    ``mse``, ``l1`` or ``huber`` (quadratic within ``huber_delta``, linear beyond) for float targets, ``bce``
    (sigmoid per output) for float targets in [0, 1]; ``LOSSES_FOR`` says which fits which.
    """

    max_steps: int = 200
    global_batch_size: int = 32
    micro_batch_size: int = 8
    loss: LossName = LossName.cross_entropy
    huber_delta: float = 1.0
    grad_clip: float = 1.0
    precision: Precision = Precision.fp32
    device: Device = Device.auto
    eval_every: int = 50
    eval_batches: int = 8
    eval_at_start: bool = True
    log_every: int = 1
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    early_stopping: EarlyStoppingConfig = field(default_factory=EarlyStoppingConfig)
    profile: ProfileConfig = field(default_factory=ProfileConfig)
    resume: str = Resume.AUTO  # read it as ``resume_from``
    # trainer.resume=PATH into a run dir holding newer checkpoints deletes them only when this says so.
    discard_newer_checkpoints: bool = False
    init_from: Optional[str] = None
    freeze: list[str] = field(default_factory=list)
    on_nonfinite: OnNonFinite = OnNonFinite.error
    max_consecutive_skips: int = 10  # on_nonfinite=skip: one more non-finite step in a row fails the run
    max_restarts: int = 0
    threads_per_worker: int = 0
    peak_tflops: Optional[float] = None
    storage: Optional[str] = None  # a URI the run is mirrored to and resumed from (train/storage.py)
    storage_timeout_s: float = 600.0  # how long the end of a run waits for its last copies to trainer.storage

    @property
    def resume_from(self) -> Resume:
        return Resume(self.resume)

    def __post_init__(self) -> None:
        positive(
            "trainer",
            max_steps=self.max_steps,
            global_batch_size=self.global_batch_size,
            micro_batch_size=self.micro_batch_size,
            log_every=self.log_every,
            huber_delta=self.huber_delta,
        )
        non_negative("trainer", grad_clip=self.grad_clip, note=" (0 = off)")
        require(self.eval_every >= 0, f"trainer.eval_every must be >= 0 (0 = never), got {self.eval_every}")
        positive("trainer", eval_batches=self.eval_batches)
        require(self.max_restarts >= 0, f"trainer.max_restarts must be >= 0, got {self.max_restarts}")
        positive("trainer", max_consecutive_skips=self.max_consecutive_skips, storage_timeout_s=self.storage_timeout_s)
        require(
            self.threads_per_worker >= 0,
            f"trainer.threads_per_worker must be >= 0 (0 = cores / workers), got {self.threads_per_worker}",
        )
        require(self.resume.strip() != "", "trainer.resume must be auto, never, or a checkpoint or run dir path")
        if self.peak_tflops is not None:
            positive("trainer", peak_tflops=self.peak_tflops)
        if self.freeze:
            require(
                self.init_from is not None,
                "trainer.freeze needs trainer.init_from (freezing untrained modules is almost surely a mistake)",
            )
        if self.early_stopping.patience:
            require(self.eval_every > 0, "trainer.early_stopping.patience needs trainer.eval_every > 0")
        if self.profile.steps:
            end = self.profile.start_step + self.profile.steps
            require(
                end <= self.max_steps,
                f"trainer.profile.start_step={self.profile.start_step} + trainer.profile."
                f"steps={self.profile.steps} exceeds trainer.max_steps={self.max_steps}",
            )
        if self.storage is not None:
            require(
                "://" in self.storage,
                f"trainer.storage must be a URI (s3://bucket/path, gs://..., file:///path), got {self.storage!r}",
            )
            # Not echoed: the message must not carry the secret into logs.
            require(
                not _has_credentials(self.storage),
                "trainer.storage must not hold credentials (user:password@, or a key, secret or token in its "
                "query): config.yaml and the logs would keep them. Give them the store's usual way: environment "
                "variables (AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, ...) or its config files "
                "(~/.aws/credentials, Google's application default credentials, ...)",
            )


# Query parameters of a filesystem URI that carry a secret: pyarrow's access_key, secret_key, session_token,
# Azure's account_key and SAS token fields (sig), and any password.
_SECRET_QUERY_WORDS = ("key", "secret", "token", "password", "credential", "sig")


def _has_credentials(uri: str) -> bool:
    """Whether ``uri`` carries a secret: a userinfo password, an S3 access key as user name, a secret query field."""
    parts = urlsplit(uri)
    if parts.password is not None or (parts.username and parts.scheme.lower() in ("s3", "s3a", "s3n")):
        return True
    return any(
        word in name.lower()
        for name, _ in parse_qsl(parts.query, keep_blank_values=True)
        for word in _SECRET_QUERY_WORDS
    )


# ------------------------------------------------------------------------------------ launcher, logger


@dataclass(kw_only=True)
class LauncherConfig:
    name: str = MISSING
    num_workers: int = 1

    def __post_init__(self) -> None:
        positive("launcher", num_workers=self.num_workers)


class WandbMode(str, Enum):
    auto = "auto"  # online with a configured W&B key, else offline
    online = "online"
    offline = "offline"
    disabled = "disabled"


@dataclass(kw_only=True)
class WandbConfig:
    """The W&B run of ``logger=wandb`` (``tracking/wandb_run.py``); ``WANDB_MODE`` overrides ``mode``."""

    project: str = "orchestrator"
    entity: Optional[str] = None
    mode: WandbMode = WandbMode.auto
    tags: list[str] = field(default_factory=list)
    init_timeout_s: float = 30.0

    def __post_init__(self) -> None:
        positive("logger.wandb", init_timeout_s=self.init_timeout_s)


@dataclass(kw_only=True)
class LoggerConfig:
    """What rank 0 records. ``metrics.jsonl``, ``resources.jsonl`` and ``summary.json`` are always written;
    ``name=wandb`` adds a W&B run."""

    name: str = "jsonl"
    progress: bool = True
    resources_every: int = 10
    group: Optional[str] = None  # runs of one sweep or experiment share it (set by `orchestrator submit -m`)
    job_type: str = "train"  # W&B's job_type: train, sweep, scale
    wandb: WandbConfig = field(default_factory=WandbConfig)

    def __post_init__(self) -> None:
        positive("logger", resources_every=self.resources_every)
        require(self.name in ("jsonl", "wandb"), f"logger.name must be jsonl or wandb, got {self.name!r}")


# ---------------------------------------------------------------------------------------- experiments


@dataclass(kw_only=True)
class VerifyConfig:
    """``orchestrator verify``: the same job under several strategies, step by step side by side."""

    strategies: list[str] = field(default_factory=lambda: ["ddp", "fsdp2", "zero1", "zero2", "zero3"])
    steps: int = 20
    tolerance: float = 1e-5
    output_dir: Optional[str] = None

    def __post_init__(self) -> None:
        require(len(self.strategies) >= 2, f"verify.strategies needs at least two strategies, got {self.strategies}")
        require(
            len(set(self.strategies)) == len(self.strategies),
            f"verify.strategies lists a strategy twice: {self.strategies}",
        )
        positive("verify", steps=self.steps, tolerance=self.tolerance)


class ScaleMode(str, Enum):
    weak = "weak"  # the per-worker batch is kept: the global batch grows with the workers
    strong = "strong"  # the global batch is kept: gradient accumulation shrinks as workers are added


@dataclass(kw_only=True)
class ScaleConfig:
    """``orchestrator scale``: one short run per (strategy, worker count), throughput and efficiency compared."""

    workers: list[int] = field(default_factory=lambda: [1, 2])
    strategies: list[str] = field(default_factory=lambda: ["ddp"])
    mode: ScaleMode = ScaleMode.weak
    steps: int = 20
    warmup_steps: int = 5  # steps left out of the step-time median (compilation, allocator, first buckets)
    output_dir: Optional[str] = None  # default outputs/scale/<job>-<mode>

    def __post_init__(self) -> None:
        require(
            len(self.workers) > 0 and all(n > 0 for n in self.workers),
            f"scale.workers must be positive worker counts, got {self.workers}",
        )
        require(len(set(self.workers)) == len(self.workers), f"scale.workers lists a count twice: {self.workers}")
        require(len(self.strategies) > 0, "scale.strategies needs at least one strategy")
        require(
            len(set(self.strategies)) == len(self.strategies),
            f"scale.strategies lists a strategy twice: {self.strategies}",
        )
        positive("scale", steps=self.steps)
        require(
            0 <= self.warmup_steps < self.steps,
            f"scale.warmup_steps={self.warmup_steps} must be >= 0 and below scale.steps={self.steps}",
        )


class SearchAlgorithm(str, Enum):
    optuna = "optuna"  # Optuna's TPE sampler, through Ray Tune's OptunaSearch
    random = "random"  # independent random samples
    grid = "grid"  # every combination of the choices and int ranges, once


class SearchScheduler(str, Enum):
    asha = "asha"  # asynchronous successive halving: stops the worse trials at each rung
    median = "median"  # stops a trial whose eval is worse than the median of the others' at that step
    none = "none"  # every trial runs to trainer.max_steps


class SearchMode(str, Enum):
    min = "min"
    max = "max"


# What the training loop reports at each eval (eval_accuracy for classifiers only).
SEARCH_METRICS = ("eval_loss", "eval_accuracy")


@dataclass(kw_only=True)
class SearchConfig:
    """``orchestrator search``: trials of the job over ``space``, run concurrently on Ray, worse ones stopped early.

    ``space`` maps a key (``optim.lr``) or a group (``optim``) to a Hydra sweep expression: ``choice(a,b)``,
    ``range(lo,hi[,step])`` (integers), ``interval(lo,hi)`` (uniform), ``tag(log,interval(lo,hi))``
    (log-uniform); the command line adds dimensions in the same syntax. ``num_samples`` unset runs the
    whole grid under ``algorithm=grid`` and is required otherwise; ``max_concurrent`` 0 runs as many
    trials at once as the cluster fits. ``grace_steps`` (0: ``trainer.eval_every``) is how far every
    trial gets before the scheduler may stop it; ASHA keeps 1 / ``reduction_factor`` at each rung.
    """

    space: dict[str, str] = field(default_factory=dict)
    num_samples: Optional[int] = None
    max_concurrent: int = 0
    metric: str = "eval_loss"
    mode: SearchMode = SearchMode.min
    algorithm: SearchAlgorithm = SearchAlgorithm.optuna
    scheduler: SearchScheduler = SearchScheduler.asha
    grace_steps: int = 0
    reduction_factor: int = 2
    output_dir: Optional[str] = None  # default outputs/search/<job>

    def __post_init__(self) -> None:
        if self.num_samples is not None:
            require(self.num_samples >= 1, f"search.num_samples must be >= 1, got {self.num_samples}")
        require(
            self.max_concurrent >= 0,
            f"search.max_concurrent must be >= 0 (0 = as many as the cluster fits), got {self.max_concurrent}",
        )
        require(
            self.metric in SEARCH_METRICS,
            f"search.metric={self.metric}: the training loop reports "
            f"{' and '.join(SEARCH_METRICS)} at each eval; choose one",
        )
        require(
            self.grace_steps >= 0, f"search.grace_steps must be >= 0 (0 = trainer.eval_every), got {self.grace_steps}"
        )
        require(self.reduction_factor >= 2, f"search.reduction_factor must be >= 2, got {self.reduction_factor}")


@dataclass(kw_only=True)
class EstimateConfig:
    """``orchestrator estimate``: per-rank memory of the job under every strategy, before launch."""

    world_sizes: list[int] = field(default_factory=lambda: [1, 8, 64])
    device_memory_gb: float = 80.0
    host_memory_gb: Optional[float] = None  # host memory per rank for offloaded states; None: not checked

    def __post_init__(self) -> None:
        require(
            len(self.world_sizes) > 0 and all(n > 0 for n in self.world_sizes),
            f"estimate.world_sizes must be positive numbers of ranks, got {self.world_sizes}",
        )
        positive("estimate", device_memory_gb=self.device_memory_gb)
        if self.host_memory_gb is not None:
            positive("estimate", host_memory_gb=self.host_memory_gb)


# -------------------------------------------------------------------------------------- what runs


class JobKind(str, Enum):
    """What the workers run: the built-in training loop, or the user's own script."""

    train = "train"
    script = "script"


# What every script worker gets from its launcher (torchrun's contract), plus the run dir.
SCRIPT_ENV_VARS = (
    "RANK",
    "WORLD_SIZE",
    "LOCAL_RANK",
    "LOCAL_WORLD_SIZE",
    "MASTER_ADDR",
    "MASTER_PORT",
    "ORCHESTRATOR_RUN_DIR",
)


@dataclass(kw_only=True)
class JobConfig:
    """``kind=script`` runs ``python script args...`` on every worker instead of the training loop,
    with the torchrun variables set, so a torchrun or Accelerate script runs unchanged. ``env`` adds
    variables to the script's environment; it is saved in ``config.yaml``, so it is no place for secrets.
    """

    kind: JobKind = JobKind.train
    script: Optional[str] = None
    args: list[str] = field(default_factory=list)
    env: dict[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.kind is JobKind.train:
            require(
                self.script is None and not self.args and not self.env,
                "job.script, job.args and job.env apply to script jobs only: add job.kind=script",
            )
            return
        require(
            bool(self.script and self.script.strip()),
            "job.kind=script needs job.script=PATH, the Python file every worker runs",
        )
        assert self.script is not None  # required just above
        require(self.script.endswith(".py"), f"job.script={self.script} is not a Python file (.py)")
        for key in self.env:
            require(
                key not in SCRIPT_ENV_VARS,
                f"job.env.{key}: set by the launcher for each worker; it cannot be overridden",
            )


# -------------------------------------------------------------------------------------------- the job


@dataclass(kw_only=True)
class Config:
    model: ModelConfig = MISSING
    data: DataConfig = MISSING
    strategy: StrategyConfig = MISSING
    optim: OptimConfig = field(default_factory=OptimConfig)
    scheduler: SchedulerConfig = field(default_factory=SchedulerConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    launcher: LauncherConfig = MISSING
    logger: LoggerConfig = field(default_factory=LoggerConfig)
    verify: VerifyConfig = field(default_factory=VerifyConfig)
    estimate: EstimateConfig = field(default_factory=EstimateConfig)
    scale: ScaleConfig = field(default_factory=ScaleConfig)
    job: JobConfig = field(default_factory=JobConfig)
    search: SearchConfig = field(default_factory=SearchConfig)
    seed: int = 1337

    def __post_init__(self) -> None:
        if self.job.kind is JobKind.script:
            return  # the script brings its own model, data and batches: the rules below are the loop's
        model, data, trainer = self.model, self.data, self.trainer
        world = self.launcher.num_workers
        require(
            model.input_kind is data.output_kind,
            f"model={model.name} trains on {model.input_kind.value} but data={data.name} yields "
            f"{data.output_kind.value}",
        )
        tokens = data.output_kind is SampleKind.tokens
        problem = loss_problem(
            trainer.loss, TargetKind.classes if tokens else data.targets, data=data.name, tokens=tokens
        )
        if problem is not None:
            raise ValueError(problem)
        seq_len = data.seq_len_or_none
        block_size = getattr(model, "block_size", None)
        if seq_len is not None and block_size is not None:
            require(block_size >= seq_len, f"model.block_size={block_size} is shorter than data.seq_len={seq_len}")
        limit = self.strategy.max_world_size
        if limit is not None:
            require(
                world <= limit,
                f"strategy={self.strategy.name} runs at most {limit} worker(s); launcher.num_workers={world} "
                f"needs strategy=ddp",
            )
        require(
            trainer.global_batch_size % world == 0,
            f"trainer.global_batch_size={trainer.global_batch_size} is not divisible by launcher.num_workers={world}",
        )
        per_micro_step = trainer.micro_batch_size * world
        require(
            trainer.global_batch_size % per_micro_step == 0,
            f"trainer.global_batch_size={trainer.global_batch_size} must be a multiple of "
            f"trainer.micro_batch_size x launcher.num_workers = {trainer.micro_batch_size} x {world}",
        )
        if model.lora.enabled:
            require(
                model.lora.base_dtype is Precision.fp32 or trainer.precision is Precision.bf16,
                f"model.lora.base_dtype=bf16 needs trainer.precision=bf16 (got {trainer.precision.value}): "
                f"the frozen bf16 weights compute in bf16",
            )
            require(not trainer.freeze, "trainer.freeze and model.lora: with LoRA only the adapters train already")
        require(
            self.scheduler.warmup_steps <= trainer.max_steps,
            f"scheduler.warmup_steps={self.scheduler.warmup_steps} exceeds trainer.max_steps={trainer.max_steps}",
        )

    @property
    def grad_accum_steps(self) -> int:
        return self.trainer.global_batch_size // (self.trainer.micro_batch_size * self.launcher.num_workers)
