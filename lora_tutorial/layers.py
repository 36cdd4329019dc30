"""The two LoRA layers of the book.

* :class:`LoRALayer` is chapter 1's deliberately naive rank-4 layer: both
  factors random, no scaling, bias left trainable. It is kept exactly that way
  so the chapter can measure what goes wrong.
* :class:`LoRALinear` is the layer the rest of the book uses: a frozen linear
  layer plus the trainable low-rank update of Hu et al. (2021),

  .. math:: h = W_0 x + b + \\frac{\\alpha}{r} B A\\, \\mathrm{dropout}(x),

  with ``B`` initialised to zero so that a fresh layer computes exactly what its
  base does, and the update mergeable into ``W_0`` for inference.

Shapes follow ``nn.Linear``: inputs are ``(..., in_features)``, outputs
``(..., out_features)``, and weights ``(out_features, in_features)``.
"""

from __future__ import annotations

import contextlib
import math
from typing import Any, Iterator

import torch
import torch.nn.functional as F
from torch import nn

from ._checks import (
    as_generator,
    check_bool,
    check_choice,
    check_last_dim,
    check_positive_finite,
    check_positive_int,
    check_probability,
)
from ._checks import conv1d_type as _conv1d_type
from .quant import NF4Linear

__all__ = ["INIT_MODES", "LoRALayer", "LoRALinear", "make_linear", "mirror_init_"]

#: How :class:`LoRALinear` can start ``lora_A`` (``lora_B`` starts at zero).
INIT_MODES = ("normal", "kaiming", "gaussian")


def make_linear(
    in_features: int,
    out_features: int,
    bias: bool = True,
    *,
    seed: int | torch.Generator = 0,
) -> nn.Linear:
    """An ``nn.Linear`` with PyTorch's default initialisation, from ``seed``.

    The same distributions as ``nn.Linear`` (Kaiming-uniform weight, uniform
    bias) in the same order, so ``seed=s`` gives the very weights
    ``torch.manual_seed(s); nn.Linear(...)`` would, without touching the
    global RNG. ``seed`` is an ``int`` or a ``torch.Generator`` (drawn from).

    Returns:
        A layer with ``weight`` of shape ``(out_features, in_features)`` and
        ``bias`` of shape ``(out_features,)`` (or no bias).
    """
    in_features = check_positive_int("in_features", in_features)
    out_features = check_positive_int("out_features", out_features)
    bias = check_bool("bias", bias)
    gen = as_generator(seed)
    linear = nn.utils.skip_init(nn.Linear, in_features, out_features, bias=bias)
    with torch.no_grad():
        nn.init.kaiming_uniform_(linear.weight, a=math.sqrt(5), generator=gen)
        if linear.bias is not None:
            bound = 1.0 / math.sqrt(in_features)
            nn.init.uniform_(linear.bias, -bound, bound, generator=gen)
    return linear


class LoRALayer(nn.Module):
    """Chapter 1's naive LoRA layer, kept naive on purpose.

    ``y = linear(x) + scaling * (x @ lora_A) @ lora_B`` with ``lora_A`` of shape
    ``(in_features, rank)`` and ``lora_B`` of shape ``(rank, out_features)``,
    **both** drawn from a standard normal, and ``scaling = 1.0``. The base
    layer's weight is frozen but, as in the source it reproduces, its bias is
    not: ``LoRALayer(64, 10, rank=4)`` has 306 trainable parameters of 946.
    Pass ``freeze_bias=True`` to freeze the bias too (296 trainable).

    Args:
        in_features: size of each input sample.
        out_features: size of each output sample.
        rank: inner dimension of the update ``lora_A @ lora_B``.
        freeze_bias: also freeze the base layer's bias (the fix for the
            forgotten bias; off by default to match the source).
        seed: an ``int`` or a ``torch.Generator`` every initial value is
            drawn from (the base layer first, then ``lora_A``, ``lora_B``).

    Shapes:
        input ``(..., in_features)`` → output ``(..., out_features)``.
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        rank: int = 4,
        freeze_bias: bool = False,
        *,
        seed: int | torch.Generator = 0,
    ) -> None:
        in_features = check_positive_int("in_features", in_features)
        out_features = check_positive_int("out_features", out_features)
        rank = check_positive_int("rank", rank)
        freeze_bias = check_bool("freeze_bias", freeze_bias)
        gen = as_generator(seed)
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.rank = rank
        self.linear = make_linear(in_features, out_features, seed=gen)
        self.linear.weight.requires_grad = False
        self.linear.bias.requires_grad = not freeze_bias
        self.lora_A = nn.Parameter(
            torch.randn(in_features, rank, generator=gen))
        self.lora_B = nn.Parameter(
            torch.randn(rank, out_features, generator=gen))
        self.scaling = 1.0

    def update(self, x: torch.Tensor) -> torch.Tensor:
        """The term ``scaling * (x @ A) @ B``: ``(..., in)`` → ``(..., out)``."""
        check_last_dim("x", x, self.in_features)
        return self.scaling * (x @ self.lora_A) @ self.lora_B

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``linear(x) + update(x)``: ``(..., in)`` → ``(..., out)``."""
        check_last_dim("x", x, self.in_features)
        return self.linear(x) + self.update(x)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, "
                f"out_features={self.out_features}, rank={self.rank}")


class _LoRABookkeeping(nn.Module):
    """What :class:`LoRALinear` keeps besides its maths.

    Validated settings (``alpha``, ``rslora``, ``dropout_p``, settable later;
    ``alpha`` and ``rslora`` fixed while merged), switching the adapter off,
    refusing what a merged layer cannot do, and the merged state in the state
    dict: a merged layer holds the update it merged, ``merged_lora_B`` (the
    scaled ``s B``) and ``merged_lora_A``, as buffers that a state dict
    carries only while merged (so an unmerged layer's state dict has exactly
    the keys ``lora_A``, ``lora_B``, ``base.weight`` and ``base.bias``).
    """

    merged_lora_A: torch.Tensor | None
    merged_lora_B: torch.Tensor | None

    @property
    def merged(self) -> bool:
        """Whether the base weight holds ``W0 + s B A``."""
        return self.merged_lora_A is not None

    @property
    def alpha(self) -> float:
        """The scale numerator (positive, finite; fixed while merged)."""
        return self._alpha

    @alpha.setter
    def alpha(self, value: float) -> None:
        self._refuse_while_merged("change alpha")
        self._alpha = check_positive_finite("alpha", value)

    @property
    def rslora(self) -> bool:
        """Whether ``scaling`` is ``alpha / sqrt(r)`` (fixed while merged)."""
        return self._rslora

    @rslora.setter
    def rslora(self, value: bool) -> None:
        self._refuse_while_merged("change rslora")
        self._rslora = check_bool("rslora", value)

    @property
    def dropout_p(self) -> float:
        """The dropout probability on the adapter's input, in [0, 1)."""
        return self.dropout.p if isinstance(self.dropout, nn.Dropout) else 0.0

    @dropout_p.setter
    def dropout_p(self, p: float) -> None:
        p = check_probability("dropout", p)
        dropout = nn.Dropout(p) if p > 0 else nn.Identity()
        self.dropout = dropout.train(self.training)

    @contextlib.contextmanager
    def disable_adapter(self) -> Iterator[Any]:
        """Within this context the layer computes only ``W0 x + b``."""
        self._refuse_while_merged("disable the adapter")
        previous, self._adapter_enabled = self._adapter_enabled, False
        try:
            yield self
        finally:
            self._adapter_enabled = previous

    def _refuse_while_merged(self, action: str) -> None:
        if self.merged:
            raise RuntimeError(f"cannot {action} of a merged LoRALinear: "
                               "call unmerge_weights_() first")

    def _refuse_training_while_merged(self) -> None:
        trainable = self.lora_A.requires_grad or self.lora_B.requires_grad
        if self.training and torch.is_grad_enabled() and trainable:
            raise RuntimeError(
                "forward pass in training mode on a merged LoRALinear: the "
                "adapter (lora_A, lora_B) would silently get no gradient. Call "
                "unmerge_weights_() before training, or model.eval() / "
                "torch.no_grad() for inference.")

    def _load_from_state_dict(self, state_dict: dict[str, Any], prefix: str,
                              *args: Any) -> None:
        # A state dict with the base weight says whether it is merged: by
        # holding merged_lora_A and merged_lora_B, or not.
        if prefix + "base.weight" in state_dict:
            keys = ("merged_lora_A", "merged_lora_B")
            merged = all(prefix + key in state_dict for key in keys)
            a, b = torch.zeros_like(self.lora_A), torch.zeros_like(self.lora_B)
            self.merged_lora_A = a if merged else None  # filled in by super()
            self.merged_lora_B = b if merged else None
        super()._load_from_state_dict(state_dict, prefix, *args)

    def extra_repr(self) -> str:
        rule = "alpha/sqrt(r)" if self.rslora else "alpha/r"
        return (f"in_features={self.in_features}, "
                f"out_features={self.out_features}, r={self.r}, "
                f"alpha={self.alpha:g}, scaling={self.scaling:g} ({rule}), "
                f"init={self.init!r}, merged={self.merged}")


class LoRALinear(_LoRABookkeeping):
    """A frozen linear layer plus a trainable, scaled, zero-initialised update.

    ``h = W0 x + b + s B A dropout(x)``, ``s = alpha / r`` (``alpha / sqrt(r)``
    with rsLoRA). ``lora_A`` ``(r, in_features)`` starts random (``init``),
    ``lora_B`` ``(out_features, r)`` at zero: a fresh layer computes what its
    base does. ``merge_weights_`` adds the update into the base weight and
    records it; ``unmerge_weights_`` subtracts that record, so ``W0`` comes
    back (up to the rounding of one addition and one subtraction) whatever
    happened to the factors in between.

    Args:
        in_features: size of each input.
        out_features: size of each output.
        r: rank of the update ``B A``.
        alpha: the scale's numerator: ``alpha / r``.
        rslora: scale by ``alpha / sqrt(r)`` instead (rank-stabilised LoRA).
        dropout: dropout probability on the adapter's input (``dropout_p``).
        bias: whether the new base layer has a bias.
        init: how ``lora_A`` is drawn: from N(0, init_scale²) (``"normal"``,
            the source's), Kaiming-uniform (``"kaiming"``, PEFT's) or
            N(0, 1/r²) (``"gaussian"``).
        init_scale: the standard deviation of ``init="normal"``.
        seed: an int or a ``torch.Generator`` for every initial value.
        base: adapt this existing layer instead (see :meth:`from_linear`).
    """

    def __init__(self, in_features: int, out_features: int, r: int = 8,
                 alpha: float = 16.0, dropout: float = 0.1, bias: bool = True,
                 init: str = "normal", init_scale: float = 1e-4,
                 rslora: bool = False, *, seed: int | torch.Generator = 0,
                 base: nn.Module | None = None) -> None:
        super().__init__()  # every argument is checked before any drawing
        self.in_features = check_positive_int("in_features", in_features)
        self.out_features = check_positive_int("out_features", out_features)
        self.r = check_positive_int("r", r)
        self.init = check_choice("init", init, INIT_MODES)
        self.init_scale = check_positive_finite("init_scale", init_scale)
        self.register_buffer("merged_lora_A", None)  # the merged update
        self.register_buffer("merged_lora_B", None)  # (None: not merged)
        self.alpha, self.rslora, self.dropout_p = alpha, rslora, dropout
        gen = as_generator(seed)
        if base is None:
            base = make_linear(in_features, out_features, bias, seed=gen)
        self.fan_in_fan_out = _check_base(base, in_features, out_features)
        self.base = base.requires_grad_(False)
        like = ({"device": base.packed.device, "dtype": base.weight_dtype}
                if isinstance(base, NF4Linear)
                else {"device": base.weight.device, "dtype": base.weight.dtype})
        self.lora_A = nn.Parameter(torch.empty(r, in_features, **like))
        self.lora_B = nn.Parameter(torch.zeros(out_features, r, **like))
        self._adapter_enabled = True
        self.reset_lora_parameters(seed=gen)

    @classmethod
    def from_linear(cls, linear: nn.Module, r: int = 8, alpha: float = 16.0,
                    dropout: float = 0.0, init: str = "kaiming",
                    init_scale: float = 1e-4, rslora: bool = False, *,
                    seed: int | torch.Generator = 0) -> "LoRALinear":
        """Adapt a trained ``nn.Linear`` (or subclass) or GPT-2 ``Conv1D``.

        ``linear`` becomes ``base`` (kept, not copied, and frozen), so the
        result computes what ``linear`` did. The defaults are PEFT's. An
        :class:`~lora_tutorial.quant.NF4Linear` gives a QLoRA layer: the
        factors take its original dtype, and it cannot be merged into.
        """
        (in_features, out_features), _ = _features(linear)
        return cls(in_features, out_features, r, alpha, dropout,
                   linear.bias is not None, init, init_scale, rslora,
                   seed=seed, base=linear)

    @torch.no_grad()
    def reset_lora_parameters(self, seed: int | torch.Generator = 0) -> None:
        """Draw ``lora_A`` afresh (by ``self.init``), set ``lora_B`` to zero."""
        self._refuse_while_merged("reset the adapter")
        gen = as_generator(seed)
        a = torch.empty(self.lora_A.shape, dtype=self.lora_A.dtype)  # CPU
        if self.init == "normal":
            nn.init.normal_(a, mean=0.0, std=self.init_scale, generator=gen)
        elif self.init == "kaiming":
            nn.init.kaiming_uniform_(a, a=math.sqrt(5), generator=gen)
        else:  # "gaussian"
            nn.init.normal_(a, mean=0.0, std=1.0 / self.r, generator=gen)
        self.lora_A.copy_(a)
        self.lora_B.zero_()

    @property
    def scaling(self) -> float:
        """``alpha / r``, or ``alpha / sqrt(r)`` with rsLoRA."""
        return self.alpha / (math.sqrt(self.r) if self.rslora else self.r)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``W0 x + b + s B A dropout(x)``: ``(..., in)`` → ``(..., out)``."""
        check_last_dim("x", x, self.in_features)
        if self.merged:
            self._refuse_training_while_merged()
            return self.base(x)  # base.weight already holds W0 + s B A
        out = self.base(x)  # W0 x + b
        if self._adapter_enabled:
            a_x = F.linear(self.dropout(x), self.lora_A)  # A dropout(x)
            out = torch.add(out, F.linear(a_x, self.lora_B), alpha=self.scaling)
        return out

    def delta_weight(self) -> torch.Tensor:
        """The update ``s B A`` for the base weight: ``(out, in)``."""
        return (self.scaling * self.lora_B) @ self.lora_A

    @torch.no_grad()
    def merge_weights_(self) -> None:
        """Add ``delta_weight()`` into the base weight, once.

        A merged weight that would not be finite (NaN, or an overflow in
        fp16/bf16) raises :class:`ValueError`; nothing is changed. An
        :class:`~lora_tutorial.quant.NF4Linear` base raises :class:`TypeError`
        (merging would mean quantising again; merge into a dequantised copy).
        """
        if self.merged:
            return
        _refuse_quantized_merge(self.base)
        scaled_b, a = self.scaling * self.lora_B, self.lora_A.clone()
        delta = self._as_stored(scaled_b @ a)  # delta_weight(), as stored
        bad = int((~torch.isfinite(self.base.weight + delta)).sum())
        if bad:
            raise ValueError(
                f"refusing to merge: the merged weight would have {bad} "
                f"non-finite value(s) (NaN, inf or an overflow of "
                f"{delta.dtype}); the weights are left untouched")
        self.base.weight += delta
        self.merged_lora_A, self.merged_lora_B = a, scaled_b  # the record

    @torch.no_grad()
    def unmerge_weights_(self) -> None:
        """Subtract the update merged (the record, not today's factors)."""
        if not self.merged:
            return
        delta = self.merged_lora_B @ self.merged_lora_A
        self.base.weight -= self._as_stored(delta)
        self.merged_lora_A = self.merged_lora_B = None

    def _as_stored(self, delta: torch.Tensor) -> torch.Tensor:
        """``delta`` laid out as the base weight (``Conv1D``: transposed)."""
        return delta.T if self.fan_in_fan_out else delta


def _refuse_quantized_merge(base: nn.Module, name: str = "") -> None:
    """Refuse to merge into a 4-bit base, saying what to do instead."""
    if isinstance(base, NF4Linear):
        where = f" of {name!r}" if name else ""
        raise TypeError(
            f"cannot merge into the NF4Linear base{where}: its weight is 4-bit codes, and "
            "a merged weight would have to be quantised again, adding quantisation error "
            "that unmerging cannot take back. Merge into a dequantised copy instead: "
            "dequantize_model(model) then unload_lora(model) (and quantize_model the "
            "result if it must be 4-bit)")


def _features(layer: object) -> tuple[tuple[int, int], bool]:
    """``((in_features, out_features), fan_in_fan_out)`` of a layer to adapt.

    ``nn.Linear`` (and subclasses) store their weight as ``(out, in)``;
    GPT-2's ``Conv1D`` stores it as ``(in, out)`` and computes ``x @ W + b``
    (PEFT's ``fan_in_fan_out``). An :class:`~lora_tutorial.quant.NF4Linear`
    (QLoRA's 4-bit base) computes as an ``nn.Linear``.
    """
    if isinstance(layer, NF4Linear):
        return (layer.in_features, layer.out_features), False
    conv1d = _conv1d_type()
    if conv1d is not None and isinstance(layer, conv1d):
        n_in, n_out = layer.weight.shape
        return (int(n_in), int(n_out)), True
    if isinstance(layer, nn.Linear):
        return (layer.in_features, layer.out_features), False
    raise TypeError(
        "linear must be a torch.nn.Linear (or a subclass), a transformers Conv1D "
        f"or an NF4Linear, got {type(layer).__name__}")


def _check_base(base: object, in_features: int, out_features: int) -> bool:
    """Check that ``base`` is a linear layer of these sizes.

    Returns:
        Its ``fan_in_fan_out``.
    """
    sizes, fan_in_fan_out = _features(base)
    if sizes != (in_features, out_features):
        raise ValueError(
            f"base maps {sizes[0]} to {sizes[1]} features, but in_features="
            f"{in_features} and out_features={out_features}")
    return fan_in_fan_out


def _check_hparams(
    r: object, alpha: object, dropout: object, init: object, init_scale: object
) -> tuple[int, float, float, str, float]:
    """Check a LoRALinear's settings before anything draws or builds."""
    return (
        check_positive_int("r", r),
        check_positive_finite("alpha", alpha),
        check_probability("dropout", dropout),
        check_choice("init", init, INIT_MODES),
        check_positive_finite("init_scale", init_scale),
    )


@torch.no_grad()
def mirror_init_(layer: LoRALinear, seed: int | torch.Generator = 0) -> None:
    """Start ``layer`` from the mirror image of the usual start: ``A = 0``, ``B`` random.

    ``B`` (shape ``(out_features, r)``) is drawn as PyTorch draws the weight of a
    layer with ``r`` inputs, Kaiming-uniform with bound ``1/sqrt(r)``, just as the
    ``"kaiming"`` start draws ``A`` as a layer with ``in_features`` inputs. This is
    Hayou et al.'s Init[B] (2024), whose variance for ``B`` scales like ``1/r``.
    The update ``B @ A`` is zero either way. Chapters 2 and 5 compare the two.
    """
    if not isinstance(layer, LoRALinear):
        raise TypeError(f"layer must be a LoRALinear, got {type(layer).__name__}")
    gen = as_generator(seed)
    layer._refuse_while_merged("re-initialise the adapter")
    b = torch.empty(layer.lora_B.shape, dtype=layer.lora_B.dtype)  # drawn on the CPU
    nn.init.kaiming_uniform_(b, a=math.sqrt(5), generator=gen)
    layer.lora_A.zero_()
    layer.lora_B.copy_(b)
