"""Helpers shared by the built-in codecs: the shape/dtype header tensor and parameter checks."""

from __future__ import annotations

import math
from typing import Any

import torch

from lowbw.compress.payload import _CODE, _DTYPES
from lowbw.errors import ConfigError

#: Floating dtypes a codec accepts as input (the ones it can restore on decode).
FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)

_DTYPE_NAMES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def meta(x: torch.Tensor, *extra: int) -> torch.Tensor:
    """``int64 [dtype code, *extra, *shape]``: what decode needs to rebuild ``x`` (8 bytes a number)."""
    return torch.tensor([_CODE[x.dtype], *extra, *x.shape], dtype=torch.int64, device=x.device)


def write_meta(dst: torch.Tensor, x: torch.Tensor, *extra: int) -> None:
    """Write :func:`meta` of ``x`` into ``dst``, a payload's view shaped by :func:`meta_spec`."""
    vals = [_CODE[x.dtype], *extra, *x.shape]
    if dst.device.type == "cpu":  # numpy fills a few numbers in ~1 µs, torch.tensor + copy_ in ~10
        dst.numpy()[:] = vals
    else:
        dst.copy_(torch.tensor(vals, dtype=torch.int64))


def meta_spec(shape: tuple[int, ...], n_extra: int = 0) -> tuple[torch.dtype, tuple[int, ...]]:
    return (torch.int64, (1 + n_extra + len(shape),))


def read_meta(m: torch.Tensor, n_extra: int = 0) -> tuple[torch.dtype, list[int], tuple[int, ...]]:
    """Invert :func:`meta`: ``(dtype, extra, shape)``."""
    vals = m.tolist()
    return _DTYPES[vals[0]], vals[1 : 1 + n_extra], tuple(vals[1 + n_extra :])


def numel(shape: tuple[int, ...]) -> int:
    return math.prod(int(d) for d in shape)


def check_float(codec: str, x: torch.Tensor) -> None:
    if x.dtype not in FLOAT_DTYPES:
        raise TypeError(f"codec {codec!r} encodes floating tensors, got {x.dtype}")


# --- parameter checks: each raises ConfigError with one sentence naming the setting and the fix ---


def check_ratio(codec: str, ratio: Any) -> float:
    if isinstance(ratio, bool) or not isinstance(ratio, (int, float)) or not 0.0 < ratio <= 1.0:
        raise ConfigError(
            f"codec {codec!r}: ratio={ratio!r} must be a number in (0, 1] (the fraction of entries "
            f"sent), for example ratio: 0.05"
        )
    return float(ratio)


def check_choice(codec: str, setting: str, value: Any, choices: tuple) -> Any:
    if isinstance(value, bool) != isinstance(choices[0], bool) or value not in choices:
        raise ConfigError(
            f"codec {codec!r}: {setting}={value!r} is not supported; set {setting} to one of "
            f"{', '.join(map(str, choices))}"
        )
    return value


def check_int(codec: str, setting: str, value: Any, lo: int, meaning: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < lo:
        raise ConfigError(
            f"codec {codec!r}: {setting}={value!r} must be an integer >= {lo} ({meaning})"
        )
    return value


def check_bool(codec: str, setting: str, value: Any) -> bool:
    if not isinstance(value, bool):
        raise ConfigError(f"codec {codec!r}: {setting}={value!r} must be true or false")
    return value


def check_dtype(codec: str, setting: str, value: Any) -> torch.dtype:
    if value not in _DTYPE_NAMES:
        raise ConfigError(
            f"codec {codec!r}: {setting}={value!r} is not supported; set {setting} to one of "
            f"{', '.join(_DTYPE_NAMES)}"
        )
    return _DTYPE_NAMES[value]
