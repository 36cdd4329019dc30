"""A linear head on frozen features: what it can reach, and how to train it fast.

When everything below a linear layer is frozen, the layer's full-batch MSE
depends on the data only through a few averages of the features ``h`` and the
targets ``y``: the Gram matrix ``E[h hᵀ]``, the cross term ``E[h yᵀ]``, the
means and ``E‖y‖²``. :class:`FeatureStats` holds them. From them:

* :func:`best_low_rank_update` solves reduced-rank regression: the lowest loss
  *any* rank-``r`` change of the weight (plus, optionally, a new bias) can
  reach on these features, and the change that reaches it;
* :func:`fit_lora_on_stats` trains a :class:`~lora_tutorial.LoRALinear`'s
  adapter on the exact full-batch loss at a cost that does not depend on the
  number of samples. Dropout on the adapter's input enters through its exact
  expectation, ``p/(1-p) · Σᵢ E[hᵢ²] ‖ΔW[:, i]‖² / d_out``, so the objective is
  the expected value of the loss :func:`~lora_tutorial.train` sees at each step.

All statistics are kept in float64.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from ._checks import check_positive_finite, check_positive_int, check_probability
from .layers import LoRALinear

__all__ = ["FeatureStats", "LowRankFit", "best_low_rank_update", "fit_lora_on_stats"]


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

    @classmethod
    @torch.no_grad()
    def from_data(cls, features: torch.Tensor, targets: torch.Tensor) -> "FeatureStats":
        """Statistics of ``features (n, d)`` and ``targets (n, k)``."""
        if features.dim() != 2 or targets.dim() != 2 or features.shape[0] != targets.shape[0]:
            raise ValueError(
                "features and targets must be 2-D with the same number of rows, "
                f"got shapes {tuple(features.shape)} and {tuple(targets.shape)}"
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

    def mse(self, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        """Mean squared error of ``h ↦ weight @ h + bias`` over samples and outputs.

        ``weight`` is ``(k, d)`` and ``bias`` ``(k,)``; differentiable in both.
        Equal (to float64 rounding) to ``F.mse_loss(features @ weight.T + bias, targets)``.
        """
        w = weight.to(torch.float64)
        total = self.y_sq - 2 * (w * self.cross.T).sum() + ((w @ self.gram) * w).sum()
        if bias is not None:
            b = bias.to(torch.float64)
            total = total - 2 * (b @ self.mean_y) + 2 * (b @ (w @ self.mean_h)) + (b @ b)
        return total / self.d_out

    def dropout_penalty(self, delta_weight: torch.Tensor, p: float) -> torch.Tensor:
        """Expected extra MSE from dropout ``p`` on the input of the update ``delta_weight (k, d)``."""
        if p == 0:
            return delta_weight.new_zeros((), dtype=torch.float64)
        dw = delta_weight.to(torch.float64)
        return p / (1 - p) * ((dw * dw) * torch.diagonal(self.gram)).sum() / self.d_out


@dataclass(frozen=True)
class LowRankFit:
    """The best rank-``r`` change of a linear layer on fixed features.

    Attributes:
        rank: the rank allowed.
        delta_weight: the optimal change ``(k, d)`` (rank at most ``rank``).
        bias: the optimal bias ``(k,)`` (the original bias if it was not fitted).
        loss: the MSE it reaches (mean over samples and outputs).
        full_rank_loss: the MSE of the best unrestricted change.
    """

    rank: int
    delta_weight: torch.Tensor
    bias: torch.Tensor
    loss: float
    full_rank_loss: float


@torch.no_grad()
def best_low_rank_update(
    stats: FeatureStats,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    rank: int,
    fit_bias: bool = True,
) -> LowRankFit:
    """Reduced-rank regression: the lowest MSE of ``(weight + ΔW) h + b`` with ``rank(ΔW) <= rank``.

    Args:
        stats: statistics of the frozen features and the targets.
        weight: the frozen weight ``W0`` ``(k, d)``.
        bias: the layer's bias ``(k,)`` (``None`` for none).
        rank: the largest rank allowed for ``ΔW``.
        fit_bias: whether the bias may change too (as it does when it is trained).

    The unrestricted optimum is ordinary least squares ``M = Σ⁻¹ C`` on the
    (centred, if ``fit_bias``) features; the best rank-``r`` change keeps the
    top ``r`` principal directions of the fitted values ``M^T Σ M``, and the
    loss rises by the variance in the directions it drops.
    """
    rank = check_positive_int("rank", rank)
    k, d = stats.d_out, stats.d_in
    if tuple(weight.shape) != (k, d):
        raise ValueError(f"weight must have shape {(k, d)}, got {tuple(weight.shape)}")
    w0 = weight.detach().to("cpu", torch.float64)
    b0 = torch.zeros(k, dtype=torch.float64) if bias is None else bias.detach().to("cpu", torch.float64)
    # Statistics of the residual targets t = y - W0 h - b0.
    mean_t = stats.mean_y - w0 @ stats.mean_h - b0
    cross_t = stats.cross - stats.gram @ w0.T - torch.outer(stats.mean_h, b0)
    t_sq = float(stats.mse(w0, b0)) * k
    if fit_bias:  # a free intercept: regress the centred residual on centred features
        sigma = stats.gram - torch.outer(stats.mean_h, stats.mean_h)
        cross_t = cross_t - torch.outer(stats.mean_h, mean_t)
        t_sq = t_sq - float(mean_t @ mean_t)
    else:
        sigma = stats.gram
    m = torch.linalg.lstsq(sigma, cross_t).solution  # (d, k): the full-rank optimum, transposed
    fitted_cov = m.T @ sigma @ m  # (k, k): covariance of the fitted values
    eigvals, eigvecs = torch.linalg.eigh((fitted_cov + fitted_cov.T) / 2)  # ascending
    eigvals, eigvecs = eigvals.flip(0).clamp_min(0), eigvecs.flip(1)
    full = (t_sq - float(eigvals.sum())) / k
    loss = full + float(eigvals[rank:].sum()) / k
    v = eigvecs[:, :rank]
    delta_t = m @ v @ v.T  # (d, k): keep the top-`rank` directions of the fitted values
    new_bias = b0 + mean_t - delta_t.T @ stats.mean_h if fit_bias else b0
    return LowRankFit(
        rank=rank,
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
    train_bias: bool = True,
    weight_decay: float = 0.01,
    record_every: int = 1,
) -> list[float]:
    """Train ``layer``'s adapter (and bias) in place on the loss given by ``stats``.

    The optimizer is AdamW with ``weight_decay`` (PyTorch's default 0.01), as in
    :func:`~lora_tutorial.train`. The objective is the exact full-batch MSE plus
    the exact expected effect of the layer's dropout, so it is deterministic.
    The cost of a step depends on the layer's sizes, not on the number of
    samples.

    Returns:
        The objective every ``record_every`` steps (the expected training loss).
    """
    steps = check_positive_int("steps", steps)
    lr = check_positive_finite("lr", lr)
    record_every = check_positive_int("record_every", record_every)
    if layer.merged:
        raise RuntimeError("cannot train a merged layer: call unmerge_weights_() first")
    if (stats.d_out, stats.d_in) != (layer.out_features, layer.in_features):
        raise ValueError(
            f"stats are for a ({stats.d_out}, {stats.d_in}) layer, got a "
            f"({layer.out_features}, {layer.in_features}) layer"
        )
    p = layer.dropout.p if isinstance(layer.dropout, torch.nn.Dropout) else 0.0
    check_probability("dropout", p)
    w0 = layer.base.weight.detach()
    bias = layer.base.bias
    params = [layer.lora_A, layer.lora_B]
    if train_bias and bias is not None:
        params.append(bias)
    saved = [q.requires_grad for q in params]
    for q in params:
        q.requires_grad_(True)
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    history: list[float] = []
    try:
        for step in range(1, steps + 1):
            opt.zero_grad(set_to_none=True)
            delta = layer.delta_weight()
            loss = stats.mse(w0 + delta, bias) + stats.dropout_penalty(delta, p)
            loss.backward()
            opt.step()
            if step % record_every == 0 or step == 1:
                value = loss.item()
                if not math.isfinite(value):
                    raise FloatingPointError(
                        f"the loss became {value} at step {step} (lr={lr}, alpha={layer.alpha}); lower either"
                    )
                history.append(value)
    finally:
        for q, flag in zip(params, saved):
            q.requires_grad_(flag)
    return history
