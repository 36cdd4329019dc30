"""``TinyAdapter``: the two-layer network of chapters 3-5."""

from __future__ import annotations

import torch
from torch import nn

from ._checks import as_generator, check_bool, check_positive_int
from .layers import LoRALinear, _check_hparams, make_linear

__all__ = ["TinyAdapter"]


class TinyAdapter(nn.Module):
    """``backbone`` (``nn.Linear``) → GELU → ``head`` (:class:`~lora_tutorial.layers.LoRALinear`).

    The backbone is an ordinary layer that pretraining trains and fine-tuning
    freezes; the head's base is frozen from the start and its adapter is what
    fine-tuning trains.

    Args:
        d_in: size of each input.
        d_hidden: size of the backbone's output, the head's input.
        d_out: size of each output.
        r: the head's LoRA rank.
        alpha: the numerator of the head's scale ``alpha / r``.
        dropout: dropout probability on the head adapter's input.
        init: how the head's ``lora_A`` is drawn (see :class:`~lora_tutorial.layers.LoRALinear`).
        init_scale: the standard deviation of ``init="normal"``.
        rslora: scale the head's update by ``alpha / sqrt(r)``.
        seed: an ``int`` or a ``torch.Generator`` every initial value is drawn
            from (the backbone first, then the head).

    Shapes:
        input ``(n, d_in)`` → output ``(n, d_out)``; :meth:`features` gives the
        head's input ``(n, d_hidden)``.
    """

    def __init__(
        self,
        d_in: int = 128,
        d_hidden: int = 256,
        d_out: int = 16,
        r: int = 8,
        alpha: float = 16.0,
        dropout: float = 0.1,
        *,
        init: str = "normal",
        init_scale: float = 1e-4,
        rslora: bool = False,
        seed: int | torch.Generator = 0,
    ) -> None:
        for name, value in (("d_in", d_in), ("d_hidden", d_hidden), ("d_out", d_out)):
            check_positive_int(name, value)
        # Check the head's arguments before the backbone draws from the generator.
        _check_hparams(r, alpha, dropout, init, init_scale)
        check_bool("rslora", rslora)
        gen = as_generator(seed)
        super().__init__()
        self.backbone = make_linear(d_in, d_hidden, seed=gen)
        self.head = LoRALinear(
            d_hidden, d_out, r=r, alpha=alpha, dropout=dropout, bias=True,
            init=init, init_scale=init_scale, rslora=rslora, seed=gen,
        )
        self.act = nn.GELU()

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """The head's input ``gelu(backbone(x))``: ``(n, d_in)`` → ``(n, d_hidden)``."""
        return self.act(self.backbone(x))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``head(gelu(backbone(x)))``: ``(n, d_in)`` → ``(n, d_out)``."""
        return self.head(self.features(x))
