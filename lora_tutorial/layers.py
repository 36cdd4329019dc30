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
from torch.nn.parameter import is_lazy

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


class _FixedByTensors:
    """An attribute of a LoRA layer set while it is built, read-only after (its tensors fix it)."""

    def __init__(self, doc: str) -> None:
        self.__doc__ = doc

    def __set_name__(self, owner: type, name: str) -> None:
        self.name = name

    def __get__(self, layer: Any, owner: type | None = None) -> Any:
        return self if layer is None else layer.__dict__["_" + self.name]

    def __set__(self, layer: Any, value: Any) -> None:
        layer._set_once(self.name, value)


class _LoRABookkeeping(nn.Module):
    """What :class:`LoRALinear` keeps besides its maths.

    Validated settings (``alpha``, ``rslora``, ``dropout_p``, settable later;
    ``alpha`` and ``rslora`` fixed while merged); sizes the tensors fix
    (``r``, ``in_features``, ``out_features``, ``fan_in_fan_out``: read-only
    once the layer is built); switching the adapter off; refusing what a
    merged layer cannot do; weight tying (a base weight that is also another
    module's parameter, recorded by :func:`~lora_tutorial.inject.add_lora`,
    is never merged into; :meth:`untie_weights_` gives the base its own copy);
    and the merged state in the state dict: a merged layer holds the update it
    merged, ``merged_lora_B`` (the scaled ``s B``) and ``merged_lora_A``, as
    buffers that a state dict carries only while merged (so an unmerged layer's
    state dict has exactly the keys ``lora_A``, ``lora_B``, ``base.weight`` and
    ``base.bias``). A state dict is checked whole before this layer changes:
    every shape, and a merge record only together with the base weight it was
    made with.
    """

    merged_lora_A: torch.Tensor | None
    merged_lora_B: torch.Tensor | None
    # Other holders of the base weight, as (name, module, attribute), recorded by add_lora.
    _ties: tuple[tuple[str, nn.Module, str], ...] = ()
    # The adapter's trainable tensors (a subclass may add some: DoRA's magnitude) and the
    # buffers of a merge record, by attribute name.
    _FACTORS: tuple[str, ...] = ("lora_A", "lora_B")
    _RECORD: tuple[str, ...] = ("merged_lora_A", "merged_lora_B")
    # The name of the adapter in the layer's own slots (lora_A, lora_B, alpha, ...); other
    # named adapters wait in ``lora_parked`` (see lora_tutorial.named_adapters).
    _adapter_name: str = "default"

    def _factor_shapes(self) -> dict[str, torch.Size]:
        """The shape of each of the adapter's tensors, and of each merge-record buffer."""
        return {"lora_A": self.lora_A.shape, "lora_B": self.lora_B.shape,
                "merged_lora_A": self.lora_A.shape, "merged_lora_B": self.lora_B.shape}

    @property
    def adapter_name(self) -> str:
        """The name of the adapter this layer computes with (PEFT's ``"default"`` unless named)."""
        return self._adapter_name

    def adapter_names(self) -> tuple[str, ...]:
        """The names of every adapter the layer holds, in the order they were added."""
        return self.__dict__.get("_names", (self._adapter_name,))

    def _parked(self) -> nn.ModuleDict:
        return self._modules.get("lora_parked") or nn.ModuleDict()

    @torch.no_grad()
    def _switch_to(self, name: str) -> None:
        """Put the adapter ``name`` in the layer's slots and park the one there (no checks
        beyond the merge: the callers in named_adapters check the names first)."""
        if name == self._adapter_name:
            return
        self._refuse_while_merged("switch adapters")
        parked = self._modules["lora_parked"]
        incoming = parked[name]
        outgoing = _ParkedAdapter.take(self)
        del parked[name]
        parked[self._adapter_name] = outgoing
        incoming.give(self)
        self._adapter_name = name

    @property
    def r(self) -> int:
        """The rank, ``lora_A.shape[0]`` (read-only; build a new layer for another rank)."""
        if "lora_A" in self._parameters:
            return int(self.lora_A.shape[0])
        return self.__dict__["_r"]

    @r.setter
    def r(self, value: int) -> None:
        self._set_once("r", value)

    in_features = _FixedByTensors("Size of each input sample, the base layer's (read-only).")
    out_features = _FixedByTensors("Size of each output sample, the base layer's (read-only).")
    fan_in_fan_out = _FixedByTensors(
        "Whether the base stores its weight ``(in, out)`` (GPT-2's ``Conv1D``; read-only).")

    def _set_once(self, name: str, value: object) -> None:
        if "lora_A" in self._parameters:  # built: the tensors fix it
            shapes = f"lora_A {tuple(self.lora_A.shape)}, lora_B {tuple(self.lora_B.shape)}"
            raise AttributeError(
                f"{name} is read-only: the layer's tensors fix it ({shapes}), so setting "
                f"it to {value!r} would contradict them; build a new layer instead, e.g. "
                "LoRALinear.from_linear(layer.base, r=...)")
        self.__dict__["_" + name] = value

    def tied_to(self) -> list[str]:
        """Other parameters that are this layer's base weight (weight tying), by name.

        :func:`~lora_tutorial.inject.add_lora` records them (found by parameter
        identity, or a tensor on the same memory); they are checked again
        here, so a tie undone since is not listed. ``merge_weights_`` refuses
        while the list is not empty: merging would change them too.
        """
        weight = _base_weight(self)
        if weight is None:
            return []
        return [name for name, module, attr in self._ties
                if (other := module._parameters.get(attr)) is not None and _same_tensor(other, weight)]

    @torch.no_grad()
    def untie_weights_(self) -> None:
        """Give the base layer its own copy of its weight, so merging changes this layer only.

        The explicit way to merge into a tied weight (GPT-2's ``lm_head`` is
        its input embedding): the tied partner keeps the original weight.
        Outputs do not change. A ``transformers`` model re-ties the two if its
        ``tie_weights()`` runs again (when saved and reloaded, for instance).
        """
        self._refuse_while_merged("untie the base weight")
        weight = _base_weight(self)
        if weight is None:  # a base without a float weight shares none
            return
        self.base.weight = nn.Parameter(weight.detach().clone(), requires_grad=weight.requires_grad)
        self._ties = ()

    def _refuse_if_tied(self) -> None:
        tied = self.tied_to()
        if tied:
            raise RuntimeError(
                f"refusing to merge: this LoRALinear's base weight is tied to {tied} (the "
                "same parameter), so merging would silently change that too. Call "
                "untie_weights_() on the layer first to give it its own copy, or keep the "
                "adapter unmerged; nothing was changed")

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
        # Checked whole first: PyTorch loads the base layer after this method
        # returns, and would change it even if a factor does not fit.
        self._check_state_dict(state_dict, prefix)
        # A state dict with the base weight says whether it is merged: by
        # holding every buffer of the merge record (merged_lora_A, ...), or not.
        if prefix + "base.weight" in state_dict:
            merged = all(prefix + key in state_dict for key in self._RECORD)
            shapes = self._factor_shapes()
            for key in self._RECORD:  # filled in by super()
                zeros = torch.zeros(shapes[key], dtype=self.lora_A.dtype, device=self.lora_A.device)
                setattr(self, key, zeros if merged else None)
        super()._load_from_state_dict(state_dict, prefix, *args)

    def _check_state_dict(self, state_dict: dict[str, Any], prefix: str) -> None:
        mine = tuple(self._parked())
        adapter_keys = [k for k in state_dict if k.startswith(prefix)
                        and k[len(prefix):].split(".")[0] in (*self._FACTORS, "lora_parked")]
        theirs = tuple(sorted({k[len(prefix) + 12:].split(".")[0] for k in state_dict
                               if k.startswith(prefix + "lora_parked.")}))
        if adapter_keys and sorted(mine) != list(theirs):
            raise RuntimeError(
                f"cannot load a state dict whose parked adapters under {prefix!r} are "
                f"{list(theirs)} into a LoRALinear whose parked adapters are {sorted(mine)} "
                f"(its active adapter is {self._adapter_name!r}): the slots lora_A and lora_B "
                "hold the active adapter, so a state dict taken with another adapter active "
                "would load into the wrong one. set_adapter() as when it was taken; nothing "
                "was loaded into this layer")
        expected = dict(self._factor_shapes())
        for name, adapter in self._parked().items():
            for key, value in adapter.named_parameters():
                expected[f"lora_parked.{name}.{key}"] = value.shape
        for key in ("weight", "bias"):
            value = getattr(self.base, key, None)
            if isinstance(value, torch.Tensor):
                expected["base." + key] = value.shape
        for key, shape in expected.items():
            value = state_dict.get(prefix + key)
            if value is not None and tuple(getattr(value, "shape", ())) != tuple(shape):
                raise RuntimeError(
                    f"cannot load {prefix + key} of shape {tuple(getattr(value, 'shape', ()))} "
                    f"into a LoRALinear that holds {tuple(shape)} (r={self.r}, in_features="
                    f"{self.in_features}, out_features={self.out_features}); nothing was "
                    "loaded into this layer")
        record = [k for k in self._RECORD if prefix + k in state_dict]
        if record and (len(record) < len(self._RECORD) or prefix + "base.weight" not in state_dict):
            lacking = [prefix + k for k in (*self._RECORD, "base.weight")
                       if prefix + k not in state_dict]
            raise RuntimeError(
                f"refusing a merge record without its base: the state dict holds "
                f"{[prefix + k for k in record]} but not {lacking}. A merge record is "
                "only loaded together with the base weight it was made with (filtering a "
                "state dict by '\"lora_\" in key' takes it apart: leave out the "
                "'merged_lora_' keys too, or unmerge before saving); nothing was loaded "
                "into this layer")

    def extra_repr(self) -> str:
        rule = "alpha/sqrt(r)" if self.rslora else "alpha/r"
        return (f"in_features={self.in_features}, "
                f"out_features={self.out_features}, r={self.r}, "
                f"alpha={self.alpha:g}, scaling={self.scaling:g} ({rule}), "
                f"init={self.init!r}, merged={self.merged}"
                + (f", adapter={self._adapter_name!r}"
                   if self.adapter_names() != ("default",) else ""))


class _ParkedAdapter(nn.Module):
    """A named adapter a layer holds but does not compute with: its tensors and settings.

    :meth:`_LoRABookkeeping._switch_to` moves the very tensors (the same
    ``nn.Parameter`` objects, so an optimizer holding them keeps them) between
    the layer's slots and here.
    """

    alpha: float
    rslora: bool
    dropout_p: float
    init: str
    init_scale: float

    @classmethod
    def take(cls, layer: "_LoRABookkeeping") -> "_ParkedAdapter":
        """The adapter in ``layer``'s slots, as a parked adapter (the same tensors)."""
        parked = cls()
        for key in layer._FACTORS:
            setattr(parked, key, layer._parameters[key])
        parked.alpha, parked.rslora, parked.dropout_p = layer.alpha, layer.rslora, layer.dropout_p
        parked.init, parked.init_scale = layer.init, layer.init_scale
        return parked

    def give(self, layer: "_LoRABookkeeping") -> None:
        """Put this adapter's tensors and settings into ``layer``'s slots."""
        for key in layer._FACTORS:
            setattr(layer, key, self._parameters[key])
        layer._alpha, layer._rslora = self.alpha, self.rslora
        layer.dropout_p = self.dropout_p
        layer.init, layer.init_scale = self.init, self.init_scale

    @property
    def r(self) -> int:
        """The adapter's rank."""
        return int(self.lora_A.shape[0])

    @property
    def scaling(self) -> float:
        """``alpha / r`` (``alpha / sqrt(r)`` with rsLoRA)."""
        return self.alpha / (math.sqrt(self.r) if self.rslora else self.r)

    def extra_repr(self) -> str:
        return f"r={self.r}, alpha={self.alpha:g}, scaling={self.scaling:g}"


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
        factors take its ``weight_dtype``, and it cannot be merged into.
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
        fp16/bf16) raises :class:`ValueError`, a base weight tied to another
        parameter (:meth:`tied_to`) :class:`RuntimeError`; nothing is changed. An
        :class:`~lora_tutorial.quant.NF4Linear` base raises :class:`TypeError`
        (merging would mean quantising again; merge into a dequantised copy).
        """
        if self.merged:
            return
        _refuse_quantized_merge(self.base)
        self._refuse_if_tied()  # merging would change the tied partner too
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
        if is_lazy(layer.weight):
            raise ValueError(
                f"linear is an uninitialised {type(layer).__name__}: its in_features are "
                "unknown until its first forward pass; run one batch through it (or the "
                "model) first")
        return (layer.in_features, layer.out_features), False
    raise TypeError(
        "linear must be a torch.nn.Linear (or a subclass), a transformers Conv1D "
        f"or an NF4Linear, got {type(layer).__name__}")


def _base_weight(layer: nn.Module) -> torch.Tensor | None:
    """The base layer's weight tensor, or ``None`` for a base that keeps none."""
    weight = getattr(layer.base, "weight", None)
    return weight if isinstance(weight, torch.Tensor) else None


def _same_tensor(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Whether ``a`` and ``b`` are one tensor: the same object, or the same memory.

    Weight tying makes two modules hold the same ``nn.Parameter``; a tensor
    made from another's memory (``nn.Parameter(w.data)``) is tied just as
    much, since writing into one writes into the other.
    """
    if a is b:
        return True
    if is_lazy(a) or is_lazy(b) or a.device != b.device or a.device.type == "meta":
        return False
    if a.numel() == 0 or b.numel() == 0:
        return False
    return (a.untyped_storage().data_ptr() == b.untyped_storage().data_ptr()
            and a.storage_offset() == b.storage_offset())


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
