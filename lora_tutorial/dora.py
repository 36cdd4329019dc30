"""DoRA: weight-decomposed low-rank adaptation (Liu et al., 2024), as PEFT computes it.

DoRA splits each output unit's weight row into a length and a direction and
lets LoRA move the direction while a trainable vector sets the length:

.. math:: W' = m \\odot \\frac{W_0 + s B A}{\\lVert W_0 + s B A \\rVert},

where the norm is taken per output unit (row ``i`` of the ``(out, in)``
weight: PEFT's ``torch.linalg.norm(weight, dim=1)``, called the "column
norm" in the paper, whose weights are ``(in, out)``) and ``m``,
PEFT's ``lora_magnitude_vector`` of shape ``(out_features,)``, starts at
the norms of ``W_0``. With ``B = 0`` a fresh layer therefore computes what
its base does.

As in PEFT, and as the paper suggests (its section 4.3), the norm is
treated as a constant in the backward pass: it is recomputed from the
current factors at every forward pass, but detached, so gradients reach
``m``, ``A`` and ``B`` only through the numerator. That saves the memory of
differentiating through the norm; the gradients are not those of the exact
formula (the unit tests check they are PEFT's).

:class:`DoRALinear` is a :class:`~lora_tutorial.layers.LoRALinear` that adds
``m``: the same factors, scaling, dropout, merge record, weight ties and
checks. Its forward pass is PEFT's, term for term::

    out = base(x) + (f - 1) * (base(x) - b) + f * s * B A x,   f = m / ||W0 + s B A||

(with dropout in training, PEFT applies the base weight to the dropped-out
input in the two extra terms, and so does this layer). Merging writes
``f * (W0 + s B A)`` into the base weight and records ``f`` beside the
factors; unmerging divides by it and subtracts the update (exact up to
rounding). A QLoRA base (:class:`~lora_tutorial.quant.NF4Linear`) works as in
PEFT: the norm is taken of its dequantised weight; it cannot be merged into.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ._checks import as_generator, check_last_dim
from .layers import LoRALinear, _refuse_quantized_merge
from .quant import NF4Linear

__all__ = ["DoRALinear"]


class DoRALinear(LoRALinear):
    """A LoRA layer with DoRA's magnitude vector: ``W' = m (W0 + sBA) / ||W0 + sBA||``.

    Takes :class:`~lora_tutorial.layers.LoRALinear`'s arguments (and its
    :meth:`~lora_tutorial.layers.LoRALinear.from_linear`). ``lora_magnitude_vector``
    ``(out_features,)`` starts
    at the row norms of ``W0`` and trains with ``lora_A`` and ``lora_B``.
    """

    _FACTORS = ("lora_A", "lora_B", "lora_magnitude_vector")
    _RECORD = ("merged_lora_A", "merged_lora_B", "merged_lora_scale")
    merged_lora_scale: torch.Tensor | None

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.register_buffer("merged_lora_scale", None)  # f while merged
        norms = self.weight_norm().to(self.lora_A.dtype)
        self.lora_magnitude_vector = nn.Parameter(norms, requires_grad=self.lora_A.requires_grad)

    def _factor_shapes(self) -> dict[str, torch.Size]:
        shapes = super()._factor_shapes()
        out = torch.Size((self.out_features,))
        return {**shapes, "lora_magnitude_vector": out, "merged_lora_scale": out}

    def base_weight(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """``W0`` as ``(out, in)`` (a ``Conv1D``'s transposed, an NF4 base's dequantised)."""
        if isinstance(self.base, NF4Linear):
            return self.base.dequantize_weight(dtype)
        weight = self.base.weight.T if self.fan_in_fan_out else self.base.weight
        return weight if dtype is None else weight.to(dtype)

    def weight_norm(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """``||W0 + s B A||`` per output unit, ``(out_features,)``, detached (a constant)."""
        with torch.no_grad():
            lora_weight = (self.lora_B @ self.lora_A).to(dtype or self.lora_A.dtype)
            weight = self.base_weight(lora_weight.dtype) + self.scaling * lora_weight
            return torch.linalg.norm(weight, dim=1).to(weight.dtype)

    @torch.no_grad()
    def reset_lora_parameters(self, seed: int | torch.Generator = 0) -> None:
        """Draw ``lora_A`` afresh, set ``lora_B`` to zero and ``m`` to the norms of ``W0``."""
        super().reset_lora_parameters(seed=as_generator(seed))
        if "lora_magnitude_vector" in self._parameters:
            self.lora_magnitude_vector.copy_(self.weight_norm())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``base(x) + (f - 1)(base(x) - b) + f s B A x`` with ``f = m / ||W0 + sBA||``."""
        check_last_dim("x", x, self.in_features)
        if self.merged:
            self._refuse_training_while_merged()
            return self.base(x)
        result = self.base(x)
        if not self._adapter_enabled:
            return result
        scale = (self.lora_magnitude_vector / self.weight_norm(x.dtype)).view(1, -1)
        if isinstance(self.dropout, nn.Identity) or not self.training:
            bias = self.base.bias
            base_result = result if bias is None else result - bias
        else:  # PEFT applies W0 to the dropped-out input in the extra terms
            x = self.dropout(x)
            base_result = F.linear(x, self.base_weight(x.dtype))
        lora_result = F.linear(F.linear(x, self.lora_A), self.lora_B)
        return result + ((scale - 1) * base_result + scale * lora_result * self.scaling)

    def delta_weight(self) -> torch.Tensor:
        """What merging adds to ``W0``: ``f (W0 + s B A) - W0``, ``(out, in)``."""
        weight = self.base_weight(self.lora_A.dtype)
        merged = self._merged_weight(weight)[0]
        return merged - weight

    def _merged_weight(self, weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(f (W0 + sBA), f)`` from ``W0`` ``(out, in)``, as PEFT merges."""
        delta = (self.lora_B @ self.lora_A) * self.scaling
        scale = self.lora_magnitude_vector / torch.linalg.norm(weight + delta, dim=1)
        return scale.view(-1, 1) * (weight + delta), scale

    @torch.no_grad()
    def merge_weights_(self) -> None:
        """Write ``f (W0 + s B A)`` into the base weight, once, and record ``f`` and the update.

        Refused, with nothing changed, as for LoRA (a non-finite result, a tied
        weight, an NF4 base), and also if some ``f`` is zero or not finite
        (unmerging divides by it).
        """
        if self.merged:
            return
        _refuse_quantized_merge(self.base)
        self._refuse_if_tied()
        merged, scale = self._merged_weight(self.base_weight())
        bad = int((~torch.isfinite(merged)).sum())
        zero = int((~torch.isfinite(scale) | (scale == 0)).sum())
        if bad or zero:
            raise ValueError(
                f"refusing to merge: the merged weight would have {bad} non-finite value(s) "
                f"and {zero} output unit(s) whose scale m / ||W0 + sBA|| is zero or not "
                "finite (unmerging divides by it); the weights are left untouched")
        scaled_b, a = self.scaling * self.lora_B, self.lora_A.clone()
        self.base.weight.copy_(self._as_stored(merged))
        self.merged_lora_A, self.merged_lora_B = a, scaled_b
        self.merged_lora_scale = scale.clone()

    @torch.no_grad()
    def unmerge_weights_(self) -> None:
        """Undo the merge by its record: ``W0 = W' / f - (s B) A`` (exact up to rounding)."""
        if not self.merged:
            return
        weight = self.base_weight() / self.merged_lora_scale.view(-1, 1)
        weight = weight - self.merged_lora_B @ self.merged_lora_A
        self.base.weight.copy_(self._as_stored(weight))
        self.merged_lora_A = self.merged_lora_B = self.merged_lora_scale = None
