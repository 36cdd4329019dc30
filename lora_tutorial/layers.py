"""The two LoRA layers of the book.

* :class:`LoRALayer` is chapter 1's deliberately naive rank-4 layer: both factors
  random, no scaling, bias left trainable. It is kept exactly that way so the
  chapter can measure what goes wrong.
* :class:`LoRALinear` is the layer the rest of the book uses: a frozen
  ``nn.Linear`` plus the trainable low-rank update of Hu et al. (2021),

  .. math:: h = W_0 x + b + \\frac{\\alpha}{r} B A\\, \\mathrm{dropout}(x),

  with ``B`` initialised to zero so that a fresh layer computes exactly what its
  base does, and the update mergeable into ``W_0`` for inference.

Shapes follow ``nn.Linear``: inputs are ``(..., in_features)``, outputs
``(..., out_features)``, and weights ``(out_features, in_features)``.
"""

from __future__ import annotations

import contextlib
import math
from typing import Iterator

import torch
import torch.nn.functional as F
from torch import nn

from ._checks import (
    check_choice,
    check_last_dim,
    check_positive_finite,
    check_positive_int,
    check_probability,
)

__all__ = ["INIT_MODES", "LoRALayer", "LoRALinear", "make_linear"]

#: The ways :class:`LoRALinear` can initialise ``lora_A`` (``lora_B`` always starts at zero).
INIT_MODES = ("normal", "kaiming", "gaussian")


def make_linear(
    in_features: int,
    out_features: int,
    bias: bool = True,
    generator: torch.Generator | None = None,
) -> nn.Linear:
    """An ``nn.Linear`` with PyTorch's default initialisation, drawn from ``generator``.

    With ``generator=None`` this is plain ``nn.Linear(in_features, out_features, bias)``
    (which draws from PyTorch's global RNG, as every ``nn.Module`` does). With a
    generator, the same distributions (Kaiming-uniform weight, uniform bias) are
    drawn from it in the same order, so a generator seeded with ``s`` gives the
    very weights ``torch.manual_seed(s); nn.Linear(...)`` would, without touching
    the global RNG.

    Returns:
        A layer with ``weight`` of shape ``(out_features, in_features)`` and
        ``bias`` of shape ``(out_features,)`` (or no bias).
    """
    in_features = check_positive_int("in_features", in_features)
    out_features = check_positive_int("out_features", out_features)
    if generator is None:
        return nn.Linear(in_features, out_features, bias=bias)
    linear = nn.utils.skip_init(nn.Linear, in_features, out_features, bias=bias)
    with torch.no_grad():
        nn.init.kaiming_uniform_(linear.weight, a=math.sqrt(5), generator=generator)
        if linear.bias is not None:
            bound = 1.0 / math.sqrt(in_features)
            nn.init.uniform_(linear.bias, -bound, bound, generator=generator)
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
        generator: draw every initial value from this generator instead of
            PyTorch's global RNG.

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
        generator: torch.Generator | None = None,
    ) -> None:
        in_features = check_positive_int("in_features", in_features)
        out_features = check_positive_int("out_features", out_features)
        rank = check_positive_int("rank", rank)
        super().__init__()
        self.in_features, self.out_features, self.rank = in_features, out_features, rank
        self.linear = make_linear(in_features, out_features, generator=generator)
        self.linear.weight.requires_grad = False
        self.linear.bias.requires_grad = not freeze_bias
        self.lora_A = nn.Parameter(torch.randn(in_features, rank, generator=generator))
        self.lora_B = nn.Parameter(torch.randn(rank, out_features, generator=generator))
        self.scaling = 1.0

    def update(self, x: torch.Tensor) -> torch.Tensor:
        """The low-rank term ``scaling * (x @ A) @ B``: ``(..., in)`` → ``(..., out)``."""
        check_last_dim("x", x, self.in_features)
        return self.scaling * (x @ self.lora_A) @ self.lora_B

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``linear(x) + scaling * (x @ A) @ B``: ``(..., in)`` → ``(..., out)``."""
        check_last_dim("x", x, self.in_features)
        return self.linear(x) + self.update(x)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, rank={self.rank}"


class LoRALinear(nn.Module):
    """A frozen ``nn.Linear`` plus a trainable, scaled, zero-initialised low-rank update.

    .. math:: h = W_0 x + b + s\\, B A\\, \\mathrm{dropout}(x), \\qquad
              s = \\alpha / r \\;\\text{(or } \\alpha/\\sqrt{r} \\text{ with rsLoRA)}

    ``lora_A`` has shape ``(r, in_features)`` and ``lora_B`` shape
    ``(out_features, r)``, so ``B @ A`` has the shape of ``base.weight``.
    ``lora_B`` starts at zero, so a fresh layer computes exactly what its base
    does; ``lora_A`` starts random (``init``) so that gradients reach ``B``.

    Args:
        in_features: size of each input sample.
        out_features: size of each output sample.
        r: rank of the update (a positive int).
        alpha: scale numerator (a positive finite number).
        dropout: dropout probability on the adapter's input, in [0, 1).
        bias: whether the frozen base layer has a bias.
        init: how ``lora_A`` starts: ``"normal"`` (N(0, init_scale²), as the
            source does), ``"kaiming"`` (Kaiming-uniform with a = √5, as loralib
            and PEFT do) or ``"gaussian"`` (N(0, 1/r²), PEFT's "gaussian").
        init_scale: standard deviation of ``lora_A`` for ``init="normal"``.
        rslora: use ``alpha / sqrt(r)`` (rank-stabilised LoRA) instead of ``alpha / r``.
        generator: draw every initial value from this generator instead of
            PyTorch's global RNG.

    Shapes:
        input ``(..., in_features)`` → output ``(..., out_features)``.
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        r: int = 8,
        alpha: float = 16.0,
        dropout: float = 0.1,
        bias: bool = True,
        init: str = "normal",
        init_scale: float = 1e-4,
        rslora: bool = False,
        *,
        generator: torch.Generator | None = None,
    ) -> None:
        # Validate everything before building anything.
        check_positive_int("in_features", in_features)
        check_positive_int("out_features", out_features)
        hparams = _check_hparams(r, alpha, dropout, init, init_scale)
        super().__init__()
        base = make_linear(in_features, out_features, bias=bias, generator=generator)
        self._attach(base, *hparams, rslora=rslora, generator=generator)

    @classmethod
    def from_linear(
        cls,
        linear: nn.Linear,
        r: int = 8,
        alpha: float = 16.0,
        dropout: float = 0.0,
        init: str = "kaiming",
        init_scale: float = 1e-4,
        rslora: bool = False,
        *,
        generator: torch.Generator | None = None,
    ) -> "LoRALinear":
        """Wrap an existing, already trained ``nn.Linear``.

        The layer itself becomes ``base``: its weights are kept (not copied) and
        frozen, and a fresh adapter is attached, so at initialisation the result
        computes exactly what ``linear`` did. Defaults follow PEFT
        (``init="kaiming"``, no dropout).
        """
        if isinstance(linear, LoRALinear) or not isinstance(linear, nn.Linear):
            raise TypeError(f"linear must be a torch.nn.Linear, got {type(linear).__name__}")
        hparams = _check_hparams(r, alpha, dropout, init, init_scale)
        layer = cls.__new__(cls)
        nn.Module.__init__(layer)
        layer._attach(linear, *hparams, rslora=rslora, generator=generator)
        return layer

    def _attach(
        self,
        base: nn.Linear,
        r: int,
        alpha: float,
        dropout: float,
        init: str,
        init_scale: float,
        *,
        rslora: bool,
        generator: torch.Generator | None,
    ) -> None:
        self.base = base
        self.base.requires_grad_(False)
        self.in_features, self.out_features = base.in_features, base.out_features
        self.r, self.alpha, self.init, self.init_scale = r, alpha, init, init_scale
        self.rslora = bool(rslora)
        factory = {"device": base.weight.device, "dtype": base.weight.dtype}
        self.lora_A = nn.Parameter(torch.empty(r, self.in_features, **factory))
        self.lora_B = nn.Parameter(torch.zeros(self.out_features, r, **factory))
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.merged = False
        self._adapter_enabled = True
        self.reset_lora_parameters(generator=generator)

    # ------------------------------------------------------------------ maths
    @property
    def scaling(self) -> float:
        """The factor ``s`` multiplying ``B @ A``: ``alpha / r``, or ``alpha / sqrt(r)`` with rsLoRA."""
        return self.alpha / math.sqrt(self.r) if self.rslora else self.alpha / self.r

    @torch.no_grad()
    def reset_lora_parameters(self, generator: torch.Generator | None = None) -> None:
        """Draw ``lora_A`` afresh (by ``self.init``) and set ``lora_B`` to zero."""
        if self.merged:
            raise RuntimeError("cannot reset the adapter of a merged layer: call unmerge_weights_() first")
        gen = generator
        if gen is not None and self.lora_A.device.type != "cpu":
            sample = torch.empty(self.lora_A.shape, dtype=self.lora_A.dtype)
        else:
            sample = self.lora_A
        if self.init == "normal":
            nn.init.normal_(sample, mean=0.0, std=self.init_scale, generator=gen)
        elif self.init == "kaiming":
            nn.init.kaiming_uniform_(sample, a=math.sqrt(5), generator=gen)
        else:  # "gaussian"
            nn.init.normal_(sample, mean=0.0, std=1.0 / self.r, generator=gen)
        if sample is not self.lora_A:
            self.lora_A.copy_(sample)
        self.lora_B.zero_()

    def delta_weight(self) -> torch.Tensor:
        """The update ``s * B @ A`` this adapter adds to ``base.weight``: ``(out, in)``."""
        return self.scaling * (self.lora_B @ self.lora_A)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``W0 x + b + s * B A dropout(x)``: ``(..., in_features)`` → ``(..., out_features)``."""
        check_last_dim("x", x, self.in_features)
        if self.merged:
            self._refuse_training_while_merged()
            return self.base(x)  # base.weight already holds W0 + s*B@A
        out = self.base(x)  # W0 x + b
        if self._adapter_enabled:
            update = F.linear(F.linear(self.dropout(x), self.lora_A), self.lora_B)  # B A dropout(x)
            out = torch.add(out, update, alpha=self.scaling)  # one fused pass: out + s * update
        return out

    def _refuse_training_while_merged(self) -> None:
        adapter_trainable = self.lora_A.requires_grad or self.lora_B.requires_grad
        if self.training and torch.is_grad_enabled() and adapter_trainable:
            raise RuntimeError(
                "forward pass in training mode on a merged LoRALinear: the adapter "
                "(lora_A, lora_B) would silently get no gradient. Call "
                "unmerge_weights_() before training, or model.eval() / torch.no_grad() for inference."
            )

    # ---------------------------------------------------------- merge/unmerge
    @torch.no_grad()
    def merge_weights_(self) -> None:
        """Add ``delta_weight()`` into ``base.weight`` for inference at no extra cost.

        Merging a merged layer does nothing. A non-finite update raises
        :class:`ValueError` and leaves every weight untouched.
        """
        if self.merged:
            return
        delta = self.delta_weight()
        bad = int((~torch.isfinite(delta)).sum())
        if bad:
            raise ValueError(
                f"refusing to merge: delta_weight() has {bad} non-finite value(s) (NaN or inf) "
                f"out of {delta.numel()}; the weights are left untouched"
            )
        self.base.weight += delta
        self.merged = True

    @torch.no_grad()
    def unmerge_weights_(self) -> None:
        """Subtract ``delta_weight()`` back out of ``base.weight``.

        Unmerging a layer that is not merged does nothing.
        """
        if not self.merged:
            return
        self.base.weight -= self.delta_weight()
        self.merged = False

    @contextlib.contextmanager
    def disable_adapter(self) -> Iterator["LoRALinear"]:
        """Within this context the layer computes only its base: ``W0 x + b``.

        Useful when the base is being (pre)trained and the adapter is not part
        of the model yet. The layer must not be merged.
        """
        if self.merged:
            raise RuntimeError("cannot disable the adapter of a merged layer: call unmerge_weights_() first")
        previous = self._adapter_enabled
        self._adapter_enabled = False
        try:
            yield self
        finally:
            self._adapter_enabled = previous

    def extra_repr(self) -> str:
        scaling = "alpha/sqrt(r)" if self.rslora else "alpha/r"
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, r={self.r}, "
            f"alpha={self.alpha:g}, scaling={self.scaling:g} ({scaling}), init={self.init!r}, "
            f"merged={self.merged}"
        )


def _check_hparams(
    r: object, alpha: object, dropout: object, init: object, init_scale: object
) -> tuple[int, float, float, str, float]:
    return (
        check_positive_int("r", r),
        check_positive_finite("alpha", alpha),
        check_probability("dropout", dropout),
        check_choice("init", init, INIT_MODES),
        check_positive_finite("init_scale", init_scale),
    )
