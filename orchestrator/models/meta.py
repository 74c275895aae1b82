"""Building models on the meta device: shapes and sizes, nothing allocated, in milliseconds."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch.overrides import TorchFunctionMode

# In-place random fills, as torch.nn.init functions and as Tensor methods. On a meta tensor each is a no-op,
# but torch runs normal_ there through a Python decomposition that imports torch._dynamo (~1.4 s).
_RANDOM_FILLS = frozenset(
    {
        "normal_",
        "uniform_",
        "trunc_normal_",
        "kaiming_normal_",
        "kaiming_uniform_",
        "xavier_normal_",
        "xavier_uniform_",
        "orthogonal_",
        "sparse_",
        "bernoulli_",
        "exponential_",
        "log_normal_",
        "cauchy_",
        "geometric_",
        "random_",
    }
)
# Every in-place initialization a model's ``init_weights`` may make (the random fills and the constant ones).
INIT_FILLS = _RANDOM_FILLS | {"ones_", "zeros_", "constant_", "fill_", "zero_", "eye_", "dirac_", "copy_"}


class _SkipMetaInit(TorchFunctionMode):
    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if getattr(func, "__name__", None) in _RANDOM_FILLS:
            tensor = args[0] if args else kwargs.get("tensor")
            if isinstance(tensor, torch.Tensor) and tensor.is_meta:
                return tensor
        return func(*args, **kwargs)


@contextmanager
def meta_device() -> Iterator[None]:
    """``torch.device("meta")`` without random initialization: shapes and sizes only, nothing allocated.

    Weights built here are placeholders (``model.to_empty(...)``, then ``model.init_weights()``, gives
    them values); skipping the fills keeps a driver's or worker's meta build at milliseconds.
    """
    with torch.device("meta"), _SkipMetaInit():
        yield
