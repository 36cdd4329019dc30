"""A linear head on frozen features: what it can reach, and how to train it fast.

When everything below a linear layer is frozen, the layer's full-batch MSE
depends on the data only through a few averages of the features ``h`` and the
targets ``y``: the Gram matrix ``E[h hᵀ]``, the cross term ``E[h yᵀ]``, the
means and ``E‖y‖²``. :class:`FeatureStats` holds them. From them:

* :func:`best_low_rank_update` solves reduced-rank regression: the lowest loss
  *any* rank-``r`` change of the weight (plus, optionally, a new bias) can
  reach on these features, and the change that reaches it;
* :func:`fit_lora_on_stats` trains a :class:`~lora_tutorial.layers.LoRALinear`'s
  adapter on the exact full-batch loss at a cost that does not depend on the
  number of samples. Dropout on the adapter's input enters through its exact
  expectation, ``p/(1-p) · Σᵢ E[hᵢ²] ‖ΔW[:, i]‖² / d_out``, so the objective is
  the expected value of the loss :func:`~lora_tutorial.training.train` sees at each step.

All statistics are kept in float64.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from ._checks import check_choice, check_positive_finite, check_positive_int
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
    betas: tuple[float, float] = (0.9, 0.999),
    eps: float = 1e-8,
    record_every: int = 1,
    record: str = "objective",
) -> list[float]:
    """Train ``layer``'s adapter (and bias) in place on the loss given by ``stats``.

    The optimizer is AdamW with PyTorch's defaults (``weight_decay=0.01``), as in
    :func:`~lora_tutorial.training.train`, on the exact full-batch MSE plus the exact
    expected effect of the layer's dropout, so the result is deterministic. A
    step costs ``O(k·d²)`` for a ``(k, d)`` layer, whatever the number of
    samples: the gradients are written out by hand (in float64) rather than
    taken by autograd, which keeps a 600-step fit of a 256→16 head near 0.1 s.

    With ``ΔW = s·B·A``, ``W = W0 + ΔW`` and ``q = p/(1-p)``, the objective is

    .. math:: L = \\tfrac1k\\big(E\\|y\\|^2 - 2\\,\\mathrm{tr}(W C) + \\mathrm{tr}(W G W^T)
              + 2 b^T W \\bar h - 2 b^T \\bar y + b^T b + q \\textstyle\\sum_{ji} G_{ii} \\Delta W_{ji}^2\\big)

    and its gradients are ``∂L/∂W = (2/k)(W G - Cᵀ + b h̄ᵀ)``,
    ``∂L/∂ΔW = ∂L/∂W + (2q/k) ΔW·diag(G)``, ``∂L/∂A = s Bᵀ ∂L/∂ΔW``,
    ``∂L/∂B = s ∂L/∂ΔW Aᵀ`` and ``∂L/∂b = (2/k)(W h̄ + b - ȳ)``.

    Args:
        record: what the history holds: ``"objective"`` (the expected training
            loss, dropout included) or ``"mse"`` (the training loss in
            evaluation mode, without dropout's penalty).

    Returns:
        The recorded value before each recorded step (steps 1,
        ``record_every``, ``2·record_every`` and so on).
    """
    steps = check_positive_int("steps", steps)
    lr = check_positive_finite("lr", lr)
    record_every = check_positive_int("record_every", record_every)
    check_choice("record", record, ("objective", "mse"))
    if layer.merged:
        raise RuntimeError("cannot train a merged layer: call unmerge_weights_() first")
    if (stats.d_out, stats.d_in) != (layer.out_features, layer.in_features):
        raise ValueError(
            f"stats are for a ({stats.d_out}, {stats.d_in}) layer, got a "
            f"({layer.out_features}, {layer.in_features}) layer"
        )
    p = layer.dropout.p if isinstance(layer.dropout, torch.nn.Dropout) else 0.0
    q, s, k = p / (1 - p), layer.scaling, stats.d_out
    beta1, beta2 = betas

    def f64(t: torch.Tensor) -> torch.Tensor:
        return t.detach().to("cpu", torch.float64).clone()

    a, b_mat, w0 = f64(layer.lora_A), f64(layer.lora_B), f64(layer.base.weight)
    bias = None if layer.base.bias is None else f64(layer.base.bias)
    params = [a, b_mat] + ([bias] if (train_bias and bias is not None) else [])
    exp_avg = [torch.zeros_like(t) for t in params]
    exp_avg_sq = [torch.zeros_like(t) for t in params]
    gram, cross_t, diag_g = stats.gram, stats.cross.T, torch.diagonal(stats.gram)
    history: list[float] = []
    for step in range(1, steps + 1):
        delta = s * (b_mat @ a)
        w = w0 + delta
        wg = w @ gram
        grad_w = wg - cross_t
        if bias is not None:
            grad_w = grad_w + torch.outer(bias, stats.mean_h)
        grad_delta = (2.0 / k) * (grad_w + q * delta * diag_g)
        grads = [s * (b_mat.T @ grad_delta), s * (grad_delta @ a.T)]
        if len(params) == 3:
            grads.append((2.0 / k) * (w @ stats.mean_h + bias - stats.mean_y))
        if step % record_every == 0 or step == 1:
            total = stats.y_sq - 2 * (w * cross_t).sum() + (wg * w).sum()
            if record == "objective":
                total = total + q * (delta * delta * diag_g).sum()
            if bias is not None:
                total = total + 2 * bias @ (w @ stats.mean_h) - 2 * bias @ stats.mean_y + bias @ bias
            value = float(total) / k
            if not math.isfinite(value):
                raise FloatingPointError(
                    f"the loss became {value} at step {step} (lr={lr}, alpha={layer.alpha}); lower either"
                )
            history.append(value)
        # AdamW, exactly as torch.optim.AdamW computes it.
        bias_c1, bias_c2 = 1 - beta1**step, 1 - beta2**step
        for param, grad, m, v in zip(params, grads, exp_avg, exp_avg_sq):
            param.mul_(1 - lr * weight_decay)
            m.lerp_(grad, 1 - beta1)
            v.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
            denom = (v.sqrt() / math.sqrt(bias_c2)).add_(eps)
            param.addcdiv_(m, denom, value=-lr / bias_c1)
    if not (torch.isfinite(a).all() and torch.isfinite(b_mat).all()):
        raise FloatingPointError(f"the adapter became non-finite (lr={lr}, alpha={layer.alpha}); lower either")
    with torch.no_grad():
        layer.lora_A.copy_(a)
        layer.lora_B.copy_(b_mat)
        if len(params) == 3:
            layer.base.bias.copy_(bias)
    return history
