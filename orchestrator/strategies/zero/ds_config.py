"""The DeepSpeed JSON a ZeRO strategy runs with, generated from the job's own settings.

Batch sizes, accumulation, clipping and precision come from the same schema fields every strategy
reads, so ``strategy=zero2`` trains the same job as ``strategy=ddp``. The optimizer and the learning
rate are not DeepSpeed's either: the strategy hands DeepSpeed the same torch optimizer every strategy
builds and sets the schedule's learning rate each step. ``strategy.deepspeed_overrides`` is merged in
and may add settings but not contradict the generated ones; unknown keys are an error.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from orchestrator.config.schema import Offload, Precision
from orchestrator.errors import UserError

if TYPE_CHECKING:
    from orchestrator.strategies.spec import TrainingSettings
    from orchestrator.strategies.zero import ZeroConfig

# Generated DeepSpeed keys and the orchestrator setting that decides each one.
_OWNED = {
    "train_batch_size": "trainer.global_batch_size",
    "train_micro_batch_size_per_gpu": "trainer.micro_batch_size",
    "gradient_accumulation_steps": "trainer.global_batch_size and trainer.micro_batch_size",
    "gradient_clipping": "trainer.grad_clip",
    "bf16.enabled": "trainer.precision",
    "fp16.enabled": "trainer.precision",
    "zero_optimization.stage": "strategy=zero0|zero1|zero2|zero3",
    "zero_optimization.offload_optimizer.device": "strategy.offload_optimizer",
    "zero_optimization.offload_param.device": "strategy.offload_params",
    "optimizer": "optim.* (the same torch optimizer every strategy uses)",
    "scheduler": "scheduler.* (the learning rate is set every step)",
}


def deepspeed_config(strategy: ZeroConfig, settings: TrainingSettings, *, on_gpu: bool) -> dict[str, Any]:
    """The DeepSpeed config of a job with a ZeRO strategy, overrides merged and checked.

    Args:
        strategy: the job's ``strategy`` node.
        settings: the job's batch sizes, accumulation, clipping and precision.
        on_gpu: whether workers run on CUDA devices (pinned host memory for offloaded tensors).

    Raises:
        UserError: an override contradicts a generated value, naming the setting to change instead.
    """
    zero: dict[str, Any] = {"stage": strategy.stage}
    if strategy.offload_optimizer is Offload.cpu:
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": on_gpu}
    if strategy.offload_params is Offload.cpu:
        zero["offload_param"] = {"device": "cpu", "pin_memory": on_gpu}
    generated: dict[str, Any] = {
        "train_batch_size": settings.global_batch_size,
        "train_micro_batch_size_per_gpu": settings.micro_batch_size,
        "gradient_accumulation_steps": settings.grad_accum_steps,
        "gradient_clipping": settings.grad_clip,
        "zero_optimization": zero,
        "zero_allow_untested_optimizer": True,  # the client optimizer is a plain torch optimizer
        # DeepSpeed's CPU Adam is faster than torch's on a GPU host; on a CPU-only run torch's is used.
        "zero_force_ds_cpu_optimizer": False,
        "steps_per_print": 2**31 - 1,  # orchestrator logs progress itself
        "wall_clock_breakdown": False,
    }
    if settings.precision is Precision.bf16:
        # bf16 compute, fp32 master weights (ZeRO's optimizer copy), fp32 gradient accumulation and reduction.
        generated["bf16"] = {"enabled": True}
        generated["data_types"] = {"grad_accum_dtype": "fp32"}
        generated["communication_data_type"] = "fp32"
    elif settings.precision is Precision.fp16:
        generated["fp16"] = {"enabled": True, "loss_scale": 0, "initial_scale_power": 16}
        generated["communication_data_type"] = "fp32"
    return merge_overrides(generated, strategy.deepspeed_overrides)


def merge_overrides(generated: dict[str, Any], overrides: dict[str, Any]) -> dict[str, Any]:
    """``generated`` with ``overrides`` merged in; UserError when an override changes an owned value."""
    merged = _deep_copy(generated)
    for path, value in _leaves(overrides):
        owner = next((key for key in _OWNED if path == key or path.startswith(key + ".")), None)
        current = _get(generated, path)
        if owner is not None and current != value:
            job = "leaves it unset" if current is None else f"sets {current!r}"
            raise UserError(
                f"strategy.deepspeed_overrides.{path}={value!r} contradicts the job (which {job}); "
                f"set {_OWNED[owner]} instead"
            )
        _set(merged, path, value)
    return merged


def unknown_keys(config: dict[str, Any]) -> list[str]:
    """Top-level keys DeepSpeed does not read, found by letting DeepSpeed parse the config.

    DeepSpeed ignores unknown top-level keys silently; its nested sections (``zero_optimization``,
    ``bf16``, ...) are pydantic models that refuse unknown fields, which this raises as UserError too.
    Imports DeepSpeed (about 2 s).
    """
    from deepspeed.runtime.config import DeepSpeedConfig

    probe = {k: v for k, v in config.items() if k != "train_batch_size"}  # its world-size check needs workers
    recorder = _ReadRecorder(probe)
    try:
        DeepSpeedConfig(recorder)
    except Exception as exc:  # pydantic's ValidationError and DeepSpeed's own asserts
        raise UserError(_refusal(exc, config)) from None
    return sorted(key for key in probe if key not in recorder.read)


class _ReadRecorder(dict):
    """A dict that remembers which keys were looked up."""

    def __init__(self, *args: Any) -> None:
        super().__init__(*args)
        self.read: set[object] = set()

    def get(self, key: Any, default: Any = None) -> Any:
        self.read.add(key)
        return super().get(key, default)

    def __getitem__(self, key: Any) -> Any:
        self.read.add(key)
        return super().__getitem__(key)

    def __contains__(self, key: object) -> bool:
        self.read.add(key)
        return super().__contains__(key)

    def keys(self) -> Any:  # DeepSpeed also asks `KEY in config.keys()`
        return _RecordingKeys(self)


class _RecordingKeys:
    def __init__(self, owner: _ReadRecorder) -> None:
        self.owner = owner

    def __contains__(self, key: object) -> bool:
        return key in self.owner

    def __iter__(self) -> Any:
        return iter(dict.keys(self.owner))

    def __len__(self) -> int:
        return len(self.owner)


def _leaves(tree: dict[str, Any], prefix: str = "") -> list[tuple[str, Any]]:
    out = []
    for key, value in tree.items():
        path = f"{prefix}{key}"
        if isinstance(value, dict) and value and path not in ("optimizer", "scheduler"):
            out.extend(_leaves(value, path + "."))
        else:
            out.append((path, value))
    return out


def _get(tree: dict[str, Any], path: str) -> Any:
    node: Any = tree
    for part in path.split("."):
        if not isinstance(node, dict) or part not in node:
            return None
        node = node[part]
    return node


def _set(tree: dict[str, Any], path: str, value: Any) -> None:
    *parents, last = path.split(".")
    node = tree
    for part in parents:
        node = node.setdefault(part, {})
    node[last] = value


def _deep_copy(tree: dict[str, Any]) -> dict[str, Any]:
    return {k: _deep_copy(v) if isinstance(v, dict) else v for k, v in tree.items()}


def _refusal(exc: Exception, config: dict[str, Any]) -> str:
    """One line from DeepSpeed's refusal, naming the key: pydantic's first error, located in ``config``."""
    errors = getattr(exc, "errors", None)
    if not callable(errors):  # one of DeepSpeed's own asserts
        return f"strategy.deepspeed_overrides: DeepSpeed rejects the config: {' '.join(str(exc).split())[:300]}"
    first = errors()[0]
    where = ".".join(str(part) for part in first.get("loc", ()))
    path = next((p for p, _ in _leaves(config) if p == where or p.endswith("." + where)), where)
    return f"strategy.deepspeed_overrides.{path}: DeepSpeed says: {first.get('msg', exc)}"
