"""A linear head on frozen features: what it can reach, how to train it fast.

When everything below a linear layer is frozen, the layer's full-batch MSE
depends on the data only through a few averages of the features ``h`` and the
targets ``y``: the Gram matrix ``E[h hᵀ]``, the cross term ``E[h yᵀ]``, the
means and ``E‖y‖²``. :class:`FeatureStats` holds them, and its
:meth:`~FeatureStats.mse` turns them into the loss of any weight and bias.
From it:

* :func:`best_low_rank_update` solves reduced-rank regression: the lowest loss
  *any* rank-``r`` change of the weight (plus, optionally, a new bias) can
  reach on these features, and the change that reaches it;
* :func:`fit_lora_on_stats` trains a
  :class:`~lora_tutorial.layers.LoRALinear` with ``torch.optim.AdamW`` on
  that loss (autograd takes the gradients), so a step costs the same for
  4,096 samples or 4 million;
* :func:`fit_many_on_stats` trains many such adapters at once, one vectorised
  step for all of them (``torch.func.vmap``), which is how the book measures
  a setting over several seeds and a grid of settings for the price of a few runs.

The statistics are accumulated and kept in float64.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Sequence

import torch
from torch import nn

from ._checks import check_choice, check_positive_finite, check_positive_int
from .layers import LoRALinear

__all__ = [
    "FeatureStats",
    "LowRankFit",
    "best_low_rank_update",
    "fit_lora_on_stats",
    "fit_many_on_stats",
]


@dataclass(frozen=True)
class FeatureStats:
    """Averages of features ``h`` (d) and targets ``y`` (k) over ``n`` samples.

    Attributes:
        n: number of samples.
        mean_h: ``E[h]``, shape ``(d,)``.
        gram: ``E[h hᵀ]``, shape ``(d, d)``.
        mean_y: ``E[y]``, shape ``(k,)``.
        cross: ``E[h yᵀ]``, shape ``(d, k)``.
        y_sq: ``E‖y‖²`` (a float).
    """

    n: int
    mean_h: torch.Tensor
    gram: torch.Tensor
    mean_y: torch.Tensor
    cross: torch.Tensor
    y_sq: float
    _rounded: dict = field(default_factory=dict, repr=False, compare=False)

    @classmethod
    @torch.no_grad()
    def from_data(
        cls, features: torch.Tensor, targets: torch.Tensor
    ) -> "FeatureStats":
        """Statistics of ``features (n, d)`` and ``targets (n, k)``."""
        if (features.dim() != 2 or targets.dim() != 2
                or features.shape[0] != targets.shape[0]):
            raise ValueError(
                "features and targets must be 2-D with the same number of "
                f"rows, got shapes {tuple(features.shape)} and "
                f"{tuple(targets.shape)}"
            )
        h = features.detach().to("cpu", torch.float64)
        y = targets.detach().to("cpu", torch.float64)
        n = h.shape[0]
        return cls(
            n=n,
            mean_h=h.mean(0),
            gram=h.T @ h / n,
            mean_y=y.mean(0),
            cross=h.T @ y / n,
            y_sq=float((y * y).sum() / n),
        )

    @property
    def d_in(self) -> int:
        """Feature dimension ``d``."""
        return self.gram.shape[0]

    @property
    def d_out(self) -> int:
        """Target dimension ``k``."""
        return self.cross.shape[1]

    def mse(
        self, weight: torch.Tensor, bias: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Mean squared error of ``h ↦ weight @ h + bias`` (samples, outputs).

        ``weight`` is ``(k, d)`` and ``bias`` ``(k,)``; differentiable in
        both. With the bias as the weight of a constant feature 1 (so ``h``
        and ``G = E[h hᵀ]`` gain a last entry), ``E‖Wh - y‖²`` expands into
        ``E‖y‖² + tr(W G Wᵀ) - 2 tr(W C)``, divided by ``k``. Computed in
        ``weight``'s precision (the statistics are rounded to it), so a
        float32 layer gets the float32 loss that training on the data would
        compute; equals ``F.mse_loss(features @ weight.T + bias, targets)``
        to that rounding.
        """
        gram, cross2 = self._like(weight)  # G and 2 Cᵀ, with the constant 1
        if bias is None:
            w, gram, cross2 = weight, gram[:-1, :-1], cross2[:, :-1]
        else:
            w = torch.cat([weight, bias.to(weight.dtype)[:, None]], 1)
        return (self.y_sq + (w * (w @ gram - cross2)).sum()) / self.d_out

    def dropout_penalty(
        self, delta_weight: torch.Tensor, p: float
    ) -> torch.Tensor:
        """Expected extra MSE from dropout ``p`` on ``delta_weight``'s input.

        Dropout on the adapter's input keeps feature ``i`` with probability
        ``1 - p`` and scales it by ``1 / (1 - p)``: the output's mean is
        unchanged and its variance, averaged over the samples, adds
        ``p / (1 - p) · Σᵢ E[hᵢ²] ‖ΔW[:, i]‖² / k`` to the MSE (a ridge
        penalty on the update). ``delta_weight`` is ``(k, d)``.
        """
        mean_h_sq = torch.diagonal(self._like(delta_weight)[0])[:-1]
        ridge = (delta_weight * delta_weight).sum(0) @ mean_h_sq
        return ridge * (p / (1 - p) / self.d_out)

    def _like(self, tensor: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``G`` and ``2 Cᵀ`` with the constant feature, like ``tensor``."""
        key = (tensor.dtype, tensor.device)
        if key not in self._rounded:  # build and round once, then reuse
            d = self.d_in
            gram = torch.empty(d + 1, d + 1, dtype=torch.float64)
            gram[:d, :d], gram[d, d] = self.gram, 1.0
            gram[:d, d] = gram[d, :d] = self.mean_h
            cross = torch.cat([self.cross, self.mean_y[None]])  # (d + 1, k)
            self._rounded[key] = tuple(
                t.to(tensor.device, tensor.dtype) for t in (gram, 2 * cross.T))
        return self._rounded[key]


@dataclass(frozen=True)
class LowRankFit:
    """The best rank-``r`` change of a linear layer on fixed features.

    Attributes:
        r: the rank allowed.
        delta_weight: the optimal change ``(k, d)`` (rank at most ``r``).
        bias: the optimal bias ``(k,)`` (the original bias if not fitted).
        loss: the MSE it reaches (mean over samples and outputs).
        full_rank_loss: the MSE of the best unrestricted change.
    """

    r: int
    delta_weight: torch.Tensor
    bias: torch.Tensor
    loss: float
    full_rank_loss: float


@torch.no_grad()
def best_low_rank_update(
    stats: FeatureStats,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    r: int,
    fit_bias: bool = True,
) -> LowRankFit:
    """The lowest MSE of ``(weight + ΔW) h + b`` with ``rank(ΔW) <= r``.

    Args:
        stats: statistics of the frozen features and the targets.
        weight: the frozen weight ``W0`` ``(k, d)``.
        bias: the layer's bias ``(k,)`` (``None`` for none).
        r: the largest rank allowed for ``ΔW``.
        fit_bias: whether the bias may change too (as when it is trained).

    Reduced-rank regression: the unrestricted optimum is ordinary least
    squares ``M = Σ⁻¹ C`` on the (centred, if ``fit_bias``) features; the best
    rank-``r`` change keeps the top ``r`` principal directions of the fitted
    values ``Mᵀ Σ M``, and the loss rises by the variance it drops.
    """
    r = check_positive_int("r", r)
    k, d = stats.d_out, stats.d_in
    if tuple(weight.shape) != (k, d):
        raise ValueError(
            f"weight must have shape {(k, d)}, got {tuple(weight.shape)}")
    w0 = weight.detach().to("cpu", torch.float64)
    b0 = (torch.zeros(k, dtype=torch.float64) if bias is None
          else bias.detach().to("cpu", torch.float64))
    # Statistics of the residual targets t = y - W0 h - b0.
    mean_t = stats.mean_y - w0 @ stats.mean_h - b0
    cross_t = stats.cross - stats.gram @ w0.T - torch.outer(stats.mean_h, b0)
    t_sq = float(stats.mse(w0, b0)) * k
    if fit_bias:  # a free intercept: centre the residual and the features
        sigma = stats.gram - torch.outer(stats.mean_h, stats.mean_h)
        cross_t = cross_t - torch.outer(stats.mean_h, mean_t)
        t_sq = t_sq - float(mean_t @ mean_t)
    else:
        sigma = stats.gram
    m = torch.linalg.lstsq(sigma, cross_t).solution  # (d, k): full-rank optimum
    fitted_cov = m.T @ sigma @ m  # (k, k): covariance of the fitted values
    eigvals, eigvecs = torch.linalg.eigh((fitted_cov + fitted_cov.T) / 2)
    eigvals, eigvecs = eigvals.flip(0).clamp_min(0), eigvecs.flip(1)  # big 1st
    full = (t_sq - float(eigvals.sum())) / k
    loss = full + float(eigvals[r:].sum()) / k
    v = eigvecs[:, :r]
    delta_t = m @ v @ v.T  # (d, k): the top-`r` directions of the fit
    new_bias = b0 + mean_t - delta_t.T @ stats.mean_h if fit_bias else b0
    return LowRankFit(
        r=r,
        delta_weight=delta_t.T.contiguous(),
        bias=new_bias,
        loss=max(loss, 0.0),
        full_rank_loss=max(full, 0.0),
    )


def fit_lora_on_stats(
    layer: LoRALinear,
    stats: FeatureStats,
    *,
    steps: int,
    lr: float,
    record: str = "objective",
) -> list[float]:
    """Train ``layer`` in place with AdamW on the loss ``stats`` give.

    The loss is the full-batch MSE of the layer on the frozen features,
    ``stats.mse(W0 + ΔW, b)``, plus the exact expected effect of the layer's
    dropout, ``stats.dropout_penalty(ΔW, p)``; autograd takes its gradients
    and ``torch.optim.AdamW`` (PyTorch's defaults, weight decay 0.01, as
    :func:`~lora_tutorial.training.train` uses) steps exactly the parameters
    of ``layer`` whose ``requires_grad`` is set: ``lora_A`` and ``lora_B``,
    and the base layer's bias or weight if you make them trainable.

    Dropout: training on the data draws a fresh dropout mask each step;
    this minimises the loss *averaged over the masks* instead, whose
    gradient is the average of the stochastic gradients. Without dropout the
    two are the same loss, and the same AdamW gives the same steps; with
    dropout this is the deterministic run the stochastic one scatters around.

    A step costs ``O(k·d²)`` for a ``(k, d)`` layer, whatever the number of
    samples behind ``stats``. It runs in the layer's precision (see
    :meth:`FeatureStats.mse`), like training on the data would.

    Args:
        layer: an unmerged :class:`~lora_tutorial.layers.LoRALinear` on an
            ``nn.Linear`` of shape ``(stats.d_out, stats.d_in)``.
        stats: statistics of the layer's input features and its targets.
        steps: number of AdamW steps.
        lr: learning rate.
        record: what the history holds: ``"objective"`` (the loss trained
            on, dropout's penalty included) or ``"mse"`` (the training MSE in
            evaluation mode, without it).

    Returns:
        The recorded value before each step.

    Raises:
        FloatingPointError: if the loss stops being finite (lower ``lr`` or
            alpha); the layer is then put back as it was.
    """
    steps = check_positive_int("steps", steps)
    lr = check_positive_finite("lr", lr)
    check_choice("record", record, ("objective", "mse"))
    if not isinstance(layer, LoRALinear) or type(layer.base) is not nn.Linear:
        raise TypeError("layer must be a LoRALinear on an nn.Linear, got "
                        f"{type(layer).__name__}")
    if layer.merged:
        raise RuntimeError(
            "cannot train a merged layer: call unmerge_weights_() first")
    if (stats.d_out, stats.d_in) != (layer.out_features, layer.in_features):
        raise ValueError(
            f"stats are for a ({stats.d_out}, {stats.d_in}) layer, got a "
            f"({layer.out_features}, {layer.in_features}) layer")
    params = [p for p in layer.parameters() if p.requires_grad]
    if not params:
        raise ValueError("layer has no trainable parameters: nothing to train")
    start = [p.detach().clone() for p in params]
    # AdamW with PyTorch's defaults, as train() uses; fused: one kernel.
    optimizer = torch.optim.AdamW(params, lr=lr, fused=True)
    history: list[float] = []
    for _ in range(steps):
        delta = layer.delta_weight()
        mse = stats.mse(layer.base.weight + delta, layer.base.bias)
        loss = mse + stats.dropout_penalty(delta, layer.dropout_p)
        history.append((loss if record == "objective" else mse).item())
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    if not (math.isfinite(sum(history))
            and all(torch.isfinite(p).all() for p in params)):
        with torch.no_grad():  # refuse the result: put the layer back
            for param, saved in zip(params, start):
                param.copy_(saved)
        raise FloatingPointError(
            f"training diverged (lr={lr}, alpha={layer.alpha}): the loss or "
            "the parameters stopped being finite; lower either")
    return history


#: The parameters of a LoRALinear on an nn.Linear that the fits can train.
_FIT_PARAMS = ("lora_A", "lora_B", "base.weight", "base.bias")


def fit_many_on_stats(
    layers: Sequence[LoRALinear],
    stats: FeatureStats,
    *,
    steps: int,
    lr: float,
    record: str = "objective",
) -> list[list[float]]:
    """Train several adapters on the same statistics at once.

    Each layer is trained exactly as :func:`fit_lora_on_stats` trains it alone
    (AdamW on ``stats.mse(W0 + ΔW, b)`` plus dropout's expected penalty), up to
    rounding, but all of them share each step: their trainable tensors are
    stacked along a new first dimension, ``torch.func.vmap`` computes every
    layer's loss in one batched pass, and one AdamW steps the stacks. AdamW
    updates each number on its own, and the sum of the losses gives each layer
    exactly its own gradient, so this is one optimizer per layer in disguise.
    The layers may differ in their numbers (initial ``A`` and ``B``, base
    weight and bias) and in their scaling (alpha, rsLoRA); they must share the
    rank, the base's shape, the dropout rate and which parameters train.

    Args:
        layers: unmerged :class:`~lora_tutorial.layers.LoRALinear` layers on
            ``nn.Linear`` bases of shape ``(stats.d_out, stats.d_in)``.
        stats: the features' statistics, shared by every layer.
        steps: number of AdamW steps, as for :func:`fit_lora_on_stats`.
        lr: learning rate, as for :func:`fit_lora_on_stats`.
        record: what to record before each step, as for :func:`fit_lora_on_stats`.

    Returns:
        For each layer, the recorded value before each step.

    Raises:
        FloatingPointError: if any layer's loss stops being finite; every
            layer is then left as it was.
    """
    steps = check_positive_int("steps", steps)
    lr = check_positive_finite("lr", lr)
    check_choice("record", record, ("objective", "mse"))
    if isinstance(layers, nn.Module) or not isinstance(layers, (list, tuple)) or not layers:
        raise TypeError("layers must be a non-empty list of LoRALinear layers")
    first = layers[0]
    for i, layer in enumerate(layers):
        if not isinstance(layer, LoRALinear) or type(layer.base) is not nn.Linear:
            raise TypeError(f"layers[{i}] must be a LoRALinear on an nn.Linear, got "
                            f"{type(layer).__name__}")
        if layer.merged:
            raise RuntimeError(f"layers[{i}] is merged: call unmerge_weights_() first")
        if (stats.d_out, stats.d_in) != (layer.out_features, layer.in_features):
            raise ValueError(
                f"stats are for a ({stats.d_out}, {stats.d_in}) layer, layers[{i}] is a "
                f"({layer.out_features}, {layer.in_features}) layer")
        mine = {n: p.requires_grad for n, p in layer.named_parameters()}
        theirs = {n: p.requires_grad for n, p in first.named_parameters()}
        if (layer.r, layer.dropout_p, mine, layer.lora_A.dtype) != (
                first.r, first.dropout_p, theirs, first.lora_A.dtype):
            raise ValueError(
                f"layers[{i}] differs from layers[0] in its rank, dropout, dtype or "
                "trainable parameters; fit_many_on_stats trains layers that differ "
                "only in their numbers and scaling")
    names = [n for n in _FIT_PARAMS if n in dict(first.named_parameters())]
    stacked = {n: torch.stack([l.get_parameter(n).detach() for l in layers]) for n in names}
    trainable = [n for n in names if first.get_parameter(n).requires_grad]
    if not trainable:
        raise ValueError("the layers have no trainable parameters: nothing to train")
    for n in trainable:
        stacked[n].requires_grad_(True)
    scaling = torch.tensor([l.scaling for l in layers], dtype=first.lora_A.dtype)
    p = first.dropout_p

    def losses(t: dict[str, torch.Tensor], s: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        delta = s * (t["lora_B"] @ t["lora_A"])
        mse = stats.mse(t["base.weight"] + delta, t.get("base.bias"))
        return mse + stats.dropout_penalty(delta, p), mse

    batched = torch.func.vmap(losses)
    optimizer = torch.optim.AdamW([stacked[n] for n in trainable], lr=lr, fused=True)
    histories: list[list[float]] = [[] for _ in layers]
    for _ in range(steps):
        objective, mse = batched(stacked, scaling)
        for history, value in zip(histories, (objective if record == "objective" else mse).tolist()):
            history.append(value)
        optimizer.zero_grad()
        objective.sum().backward()
        optimizer.step()
    finite = all(math.isfinite(v) for h in histories for v in h) and all(
        bool(torch.isfinite(stacked[n]).all()) for n in trainable)
    if not finite:
        bad = [i for i, h in enumerate(histories) if not all(map(math.isfinite, h))]
        raise FloatingPointError(
            f"training diverged (lr={lr}) for layers {bad or 'with non-finite parameters'}: "
            "the layers are left as they were; lower lr or alpha")
    with torch.no_grad():
        for n in trainable:
            for i, layer in enumerate(layers):
                layer.get_parameter(n).copy_(stacked[n][i])
    return histories
