"""Argument checks shared by the library.

Every public function validates its input before it builds anything, so a bad
argument fails with a :class:`ValueError` (or :class:`TypeError` for a value of
the wrong kind) that names the argument, the value it got and what is allowed,
and nothing half-built is left behind.
"""

from __future__ import annotations

import math
import numbers
import sys
from typing import Iterable

import torch

__all__ = [
    "as_generator",
    "check_bool",
    "check_choice",
    "check_last_dim",
    "check_non_negative",
    "check_positive_finite",
    "check_positive_int",
    "check_probability",
    "conv1d_type",
]


def check_bool(name: str, value: object) -> bool:
    """Return ``value`` if it is a ``bool`` (so ``"no"`` is not read as true)."""
    if not isinstance(value, bool):
        raise TypeError(f"{name} must be True or False, got {value!r}")
    return value


def check_positive_int(name: str, value: object) -> int:
    """Return ``value`` as an ``int`` if it is a positive integer (``bool`` is not)."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value <= 0:
        raise ValueError(f"{name} must be a positive int, got {value!r}")
    return int(value)


def _as_real(name: str, value: object, allowed: str) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise ValueError(f"{name} must be {allowed}, got {value!r}")
    return float(value)


def check_positive_finite(name: str, value: object) -> float:
    """Return ``value`` as a ``float`` if it is a finite number greater than zero."""
    allowed = "a positive finite number"
    number = _as_real(name, value, allowed)
    if not math.isfinite(number) or number <= 0:
        raise ValueError(f"{name} must be {allowed}, got {value!r}")
    return number


def check_non_negative(name: str, value: object) -> float:
    """Return ``value`` as a ``float`` if it is a finite number >= 0."""
    allowed = "a finite number >= 0"
    number = _as_real(name, value, allowed)
    if not math.isfinite(number) or number < 0:
        raise ValueError(f"{name} must be {allowed}, got {value!r}")
    return number


def check_probability(name: str, value: object) -> float:
    """Return ``value`` as a ``float`` if it lies in the half-open interval [0, 1)."""
    allowed = "a number in [0, 1)"
    number = _as_real(name, value, allowed)
    if not (0.0 <= number < 1.0):  # also rejects NaN
        raise ValueError(f"{name} must be {allowed}, got {value!r}")
    return number


def check_choice(name: str, value: object, allowed: Iterable[str]) -> str:
    """Return ``value`` if it is one of the strings in ``allowed``."""
    options = tuple(allowed)
    if not isinstance(value, str) or value not in options:
        listed = ", ".join(repr(option) for option in options)
        raise ValueError(f"{name} must be one of {listed}, got {value!r}")
    return value


def check_last_dim(name: str, x: object, expected: int) -> torch.Tensor:
    """Check that ``x`` is a tensor whose last dimension is ``expected``."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if x.dim() == 0 or x.shape[-1] != expected:
        raise ValueError(
            f"{name} must have last dimension {expected} (in_features), "
            f"got shape {tuple(x.shape)}"
        )
    return x


def as_generator(seed: int | torch.Generator, name: str = "seed") -> torch.Generator:
    """Turn ``seed`` into a CPU :class:`torch.Generator` without touching the global RNG.

    An ``int`` gives a fresh generator seeded with it; a generator is returned as
    it is (and advances as it is used), so several draws can share one stream.
    """
    if isinstance(seed, torch.Generator):
        if seed.device.type != "cpu":
            raise ValueError(f"{name} must be a CPU torch.Generator, got one on {seed.device}")
        return seed
    if isinstance(seed, bool) or not isinstance(seed, numbers.Integral):
        raise TypeError(f"{name} must be an int or a torch.Generator, got {seed!r}")
    if seed < 0:
        raise ValueError(f"{name} must be a non-negative int or a torch.Generator, got {seed!r}")
    return torch.Generator().manual_seed(int(seed))


def conv1d_type() -> type | None:
    """GPT-2's ``transformers.pytorch_utils.Conv1D``, if transformers is loaded.

    A ``Conv1D`` can only exist once its module has been imported, so this
    never imports ``transformers`` (an optional dependency) itself.
    """
    module = sys.modules.get("transformers.pytorch_utils")
    return getattr(module, "Conv1D", None)
