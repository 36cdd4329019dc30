"""4-bit NormalFloat (NF4) quantisation and QLoRA's frozen 4-bit base layer.

QLoRA (Dettmers et al., 2023) fine-tunes a model whose frozen weights are
stored in 4 bits: each weight becomes one of 16 levels, and LoRA's adapters,
kept in full precision, train on top. Everything here is written from the
definitions, and reproduces what ``bitsandbytes`` 0.50.2 stores on a CPU bit
for bit (the unit tests check it):

* :func:`nf4_levels`: the 16 NF4 levels, quantiles of N(0, 1) with an exact
  zero; :func:`fp4_levels` and :func:`int4_levels`, the 4-bit formats NF4 is
  compared with.
* :func:`quantize_blocks` / :func:`dequantize_blocks`: blockwise absmax
  quantisation (blocks of 64 weights, each scaled by its largest magnitude,
  every weight rounded to the nearest level); :func:`pack_4bit` puts two
  codes in a byte.
* :func:`quantize_constants` / :func:`dequantize_constants`: double
  quantisation, the absmax constants themselves stored in 8 bits.
* :func:`quantize_nf4` → :class:`NF4Tensor`, and :class:`NF4Linear`, a frozen
  linear layer that stores only that and dequantises its weight on the fly.
  ``LoRALinear(base=NF4Linear(...))`` is a QLoRA layer.

Where bitsandbytes' CPU code makes a choice the definition leaves open, this
module makes the same one, and says so: ties between two levels go to the
lower one; full blocks are scaled by multiplying by ``1 / absmax``, a last
partial block by dividing by its absmax; and the 8-bit step of double
quantisation rounds through bitsandbytes' 65,536-entry lookup table, which
for a value within 1/65,535 of a midpoint can pick the other neighbour.

Shapes: a weight of any shape is read as its ``numel()`` values in memory
order (row-major), cut into blocks of ``blocksize``; the last block may be
shorter.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ._checks import check_bool, check_choice, check_last_dim, check_positive_int, conv1d_type

__all__ = [
    "BLOCK_SIZE",
    "CONSTANTS_BLOCK_SIZE",
    "NF4_OFFSET",
    "NF4Linear",
    "NF4Tensor",
    "SCHEMES",
    "WEIGHT_DTYPES",
    "bits_per_parameter",
    "dequantize_blocks",
    "dequantize_constants",
    "dynamic_map",
    "fake_quantize",
    "fp4_levels",
    "int4_levels",
    "nf4_levels",
    "pack_4bit",
    "quantization_errors",
    "quantize_blocks",
    "quantize_constants",
    "quantize_nf4",
    "unpack_4bit",
]

#: Weights per absmax block (QLoRA's and bitsandbytes' default).
BLOCK_SIZE = 64
#: Absmax constants per 8-bit block in double quantisation (as bitsandbytes).
CONSTANTS_BLOCK_SIZE = 256
#: The outermost probability NF4's quantiles are taken at. Numerically the mean
#: of 1 - 1/(2·15) and 1 - 1/(2·16) (0.967708333...), written to 7 digits as
#: bitsandbytes writes it: the unrounded value moves some levels by 3e-7.
NF4_OFFSET = 0.9677083
#: The weight dtypes bitsandbytes quantises, and so does this module.
WEIGHT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
#: The 4-bit formats :func:`fake_quantize` knows.
SCHEMES = ("nf4", "fp4", "int4")

_STORED = ("packed", "absmax", "absmax_scales", "absmax_offset")  # NF4Linear's buffers
_TINY = 1e-38  # bitsandbytes' floor for an absmax it divides by (an all-zero block)
_LUT_SIZE = 65536  # bitsandbytes' CPU 8-bit rounding table


# ---------------------------------------------------------------------------
# The levels


@functools.lru_cache(maxsize=None)
def _nf4_levels() -> torch.Tensor:
    quantile = torch.special.ndtri  # the inverse of the standard normal CDF
    # 8 positive levels: quantiles at 9 evenly spaced probabilities from
    # NF4_OFFSET down to 1/2, the last (the median, 0) dropped; 7 negative
    # ones the same way from 8 probabilities; and an exact zero between them.
    positive = quantile(torch.linspace(NF4_OFFSET, 0.5, 9)[:-1].double())
    negative = -quantile(torch.linspace(NF4_OFFSET, 0.5, 8)[:-1].double())
    zero = torch.zeros(1, dtype=torch.float64)
    levels = torch.cat([negative, zero, positive]).float().sort().values
    return levels / levels.max()  # from -1 to 1


def nf4_levels() -> torch.Tensor:
    """The 16 levels of 4-bit NormalFloat, sorted, from -1 to 1: shape ``(16,)``.

    Quantiles of the standard normal distribution, so that a normally
    distributed weight is equally likely to fall near each level. The type
    is asymmetric, as in the paper: 8 positive levels, 7 negative ones and
    an exact zero (a symmetric type with zero would have only 15 levels).
    The positive levels are the N(0, 1) quantiles at 8 of 9 evenly spaced
    probabilities from :data:`NF4_OFFSET` to 1/2 (the last, the median, is
    0), the negative ones the same with 8 probabilities; all are divided by
    the largest, so the levels run from -1 to 1. This is bitsandbytes'
    ``create_normal_map``; the paper writes the same idea as the midpoints
    of neighbouring quantiles.
    """
    return _nf4_levels().clone()


def fp4_levels() -> torch.Tensor:
    """bitsandbytes' 4-bit float (``"fp4"``) as 16 sorted levels: shape ``(16,)``.

    A sign, 2 exponent bits and 1 mantissa bit give the magnitudes
    0, 0.0625, 2, 3, 4, 6, 8 and 12 (bitsandbytes' exponent bias), divided
    by 12 so they reach 1. Zero appears twice (+0 and -0), so only 15 values
    are distinct.
    """
    magnitudes = [0.0, 0.0625, 2.0, 3.0, 4.0, 6.0, 8.0, 12.0]
    values = [-m for m in reversed(magnitudes)] + magnitudes
    return torch.tensor(values) / 12.0


def int4_levels() -> torch.Tensor:
    """Symmetric uniform int4 as levels: ``k / 7`` for ``k = -7..7``, shape ``(15,)``.

    The plain alternative: evenly spaced levels, absmax mapped to ±7 (the
    16th code, -8, is left out to keep zero in the middle).
    """
    return torch.arange(-7, 8, dtype=torch.float32) / 7.0


@functools.lru_cache(maxsize=None)
def _dynamic_map() -> torch.Tensor:
    magnitudes = [torch.zeros(1), torch.ones(1)]
    for e in range(7):  # 2**e fraction values at scale 10**(e - 6)
        edges = torch.linspace(0.1, 1.0, 2**e + 1)
        fractions = (edges[:-1] + edges[1:]) / 2.0
        scaled = fractions * 10.0 ** (e - 6)
        magnitudes += [scaled, -scaled]
    return torch.cat(magnitudes).sort().values


def dynamic_map() -> torch.Tensor:
    """The 256 sorted levels of the signed 8-bit dynamic map: shape ``(256,)``.

    Dettmers' dynamic tree quantisation, as bitsandbytes builds it
    (``create_dynamic_map``): after the sign bit, a run of zero bits ended
    by a one says the scale, 10^-6 to 10^0, and the bits left over (0 to 6)
    are a linear fraction between 0.1 and 1, so small magnitudes get levels
    too; plus 0 and 1. Double quantisation stores the absmax constants in it.

    Built with ``torch.linspace`` at run time, as bitsandbytes builds it: under
    ``ATEN_CPU_CAPABILITY=default`` 42 of the levels come out one float32 step
    away from what AVX2 and AVX-512 give (bitsandbytes' too), so doubly
    quantised float32 weights dequantise up to about 2e-7 apart; the codes do
    not change.
    """
    return _dynamic_map().clone()


def _check_levels(levels: object) -> torch.Tensor:
    if not isinstance(levels, torch.Tensor) or levels.dtype != torch.float32 or levels.dim() != 1:
        raise TypeError(f"levels must be a 1-D float32 tensor, got {levels!r}")
    if not 2 <= levels.numel() <= 256:
        raise ValueError(f"levels must hold 2 to 256 values, got {levels.numel()}")
    if bool((levels[1:] < levels[:-1]).any()):
        raise ValueError("levels must be sorted in increasing order")
    return levels


def _midpoints(levels: torch.Tensor) -> torch.Tensor:
    return (levels[:-1] + levels[1:]) / 2


# ---------------------------------------------------------------------------
# Blockwise absmax quantisation


def _check_weight(name: str, weight: object) -> torch.Tensor:
    if not isinstance(weight, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(weight).__name__}")
    if weight.dtype not in WEIGHT_DTYPES:
        allowed = ", ".join(str(d) for d in WEIGHT_DTYPES)
        raise TypeError(f"{name} must have dtype {allowed} (what bitsandbytes quantises), "
                        f"got {weight.dtype}")
    if weight.numel() == 0:
        raise ValueError(f"{name} must have at least one value, got shape {tuple(weight.shape)}")
    bad = int((~torch.isfinite(weight)).sum())
    if bad:
        raise ValueError(f"{name} has {bad} non-finite value(s) (NaN or inf); "
                         "absmax quantisation needs finite weights")
    return weight


def quantize_blocks(
    weight: torch.Tensor, levels: torch.Tensor, blocksize: int = BLOCK_SIZE
) -> tuple[torch.Tensor, torch.Tensor]:
    """Blockwise absmax quantisation of ``weight`` to the nearest of ``levels``.

    The ``n = weight.numel()`` values are cut into blocks of ``blocksize``;
    each block is divided by its absmax (its largest magnitude), which puts
    it in [-1, 1], and each value becomes the index of the nearest level
    (a tie goes to the lower level). As bitsandbytes, full blocks are
    multiplied by ``1 / absmax`` and the last, shorter block (if any) is
    divided by its absmax, which it stores no smaller than 1e-38.

    Args:
        weight: any shape, dtype float32, bfloat16 or float16 (computed in
            float32), finite.
        levels: sorted float32 levels in [-1, 1], shape ``(k,)``, k ≤ 256.
        blocksize: values per block.

    Returns:
        ``(codes, absmax)``: codes ``(n,)`` uint8 in ``[0, k)``, and absmax
        ``(ceil(n / blocksize),)`` float32.
    """
    weight = _check_weight("weight", weight)
    levels = _check_levels(levels)
    blocksize = check_positive_int("blocksize", blocksize)
    flat = weight.detach().reshape(-1).float()
    full = flat.numel() - flat.numel() % blocksize
    blocks = flat[:full].reshape(-1, blocksize)
    absmax = blocks.abs().amax(dim=1)
    scaled = (blocks * (1.0 / absmax.clamp(min=_TINY)).unsqueeze(1)).reshape(-1)
    if full < flat.numel():  # the last, shorter block
        tail_max = flat[full:].abs().max().clamp(min=_TINY)
        absmax = torch.cat([absmax, tail_max.unsqueeze(0)])
        scaled = torch.cat([scaled, flat[full:] / tail_max])
    scaled = scaled.clamp(-1, 1)
    codes = torch.bucketize(scaled, _midpoints(levels).to(flat.device))  # nearest, ties down
    return codes.to(torch.uint8), absmax


def dequantize_blocks(
    codes: torch.Tensor, absmax: torch.Tensor, levels: torch.Tensor,
    blocksize: int = BLOCK_SIZE,
) -> torch.Tensor:
    """``levels[codes]`` times each block's absmax: the inverse of :func:`quantize_blocks`.

    Args:
        codes: ``(n,)`` integer codes (indices into ``levels``).
        absmax: ``(ceil(n / blocksize),)`` float32.
        levels: the levels the codes index, ``(k,)`` float32.
        blocksize: values per block.

    Returns:
        ``(n,)`` float32 (reshape and cast it as needed).
    """
    levels = _check_levels(levels)
    blocksize = check_positive_int("blocksize", blocksize)
    n = codes.numel()
    if absmax.shape != (-(-n // blocksize),):
        raise ValueError(f"absmax must have shape ({-(-n // blocksize)},) for {n} codes in "
                         f"blocks of {blocksize}, got {tuple(absmax.shape)}")
    scale = absmax.float().repeat_interleave(blocksize)[:n]
    return levels.to(scale.device)[codes.reshape(-1).long()] * scale


def pack_4bit(codes: torch.Tensor) -> torch.Tensor:
    """Two 4-bit codes per byte: ``(n,)`` codes in [0, 16) → ``(ceil(n / 2),)`` uint8.

    As bitsandbytes: the first code of each pair in the high nibble, the
    second in the low one. An odd count is padded with the code 7 (NF4's
    zero, what bitsandbytes pads with).
    """
    codes = codes.reshape(-1).to(torch.uint8)
    if bool((codes > 15).any()):
        raise ValueError("codes must be 4-bit, in [0, 16)")
    if codes.numel() % 2:
        codes = torch.cat([codes, codes.new_full((1,), 7)])
    return (codes[0::2] << 4) | codes[1::2]


def unpack_4bit(packed: torch.Tensor, n: int) -> torch.Tensor:
    """The first ``n`` codes of ``packed`` ``(m,)`` uint8: ``(n,)`` uint8 (high nibble first)."""
    n = check_positive_int("n", n)
    if packed.dtype != torch.uint8 or 2 * packed.numel() < n:
        raise ValueError(f"packed must be uint8 holding at least {n} codes, got "
                         f"{packed.numel()} {packed.dtype} values")
    packed = packed.reshape(-1)
    return torch.stack([packed >> 4, packed & 0xF], dim=1).reshape(-1)[:n]


# ---------------------------------------------------------------------------
# Double quantisation: the absmax constants in 8 bits


@functools.lru_cache(maxsize=None)
def _dynamic_lut() -> torch.Tensor:
    # bitsandbytes' CPU kernel does not search the 256 levels for each value:
    # it snaps the value to one of 65,536 evenly spaced points of [-1, 1] and
    # looks up the level nearest that point, precomputed here as it does.
    points = -1.0 + (2.0 * torch.arange(_LUT_SIZE, dtype=torch.float32)) / (_LUT_SIZE - 1)
    return torch.searchsorted(_midpoints(_dynamic_map()), points).to(torch.uint8)


def quantize_constants(
    absmax: torch.Tensor, blocksize: int = CONSTANTS_BLOCK_SIZE
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Double quantisation: float32 absmax constants → 8-bit codes, as bitsandbytes.

    The constants are all positive, so their mean is subtracted first (the
    *offset*) to use both halves of the signed :func:`dynamic_map`; then
    they are quantised blockwise (blocks of 256, each scaled by its own
    absmax) to the 256 dynamic levels, through bitsandbytes' CPU rounding
    table (see the module docstring). A block of zeros gets code 0.

    Args:
        absmax: ``(m,)`` float32 constants.
        blocksize: constants per 8-bit block.

    Returns:
        ``(codes, scales, offset)``: ``(m,)`` uint8, ``(ceil(m / blocksize),)``
        float32, and a 0-d float32 tensor.
    """
    if not isinstance(absmax, torch.Tensor) or absmax.dtype != torch.float32 or absmax.dim() != 1:
        raise TypeError(f"absmax must be a 1-D float32 tensor, got {absmax!r}")
    blocksize = check_positive_int("blocksize", blocksize)
    offset = absmax.mean()
    codes, scales = _quantize_dynamic(absmax - offset, blocksize)
    return codes, scales, offset


def _quantize_dynamic(x: torch.Tensor, blocksize: int) -> tuple[torch.Tensor, torch.Tensor]:
    """bitsandbytes' CPU ``quantize_blockwise`` with the dynamic map: ``(m,)`` float32
    → ``(m,)`` uint8 codes and ``(ceil(m / blocksize),)`` float32 scales."""
    m = x.numel()
    blocks = F.pad(x, (0, -m % blocksize)).reshape(-1, blocksize)
    scales = blocks.abs().amax(dim=1)
    scaled = (blocks * (1.0 / scales).unsqueeze(1)).clamp(-1, 1)
    point = ((scaled + 1.0) * 0.5 * (_LUT_SIZE - 1) + 0.5).to(torch.int64)  # truncates
    codes = torch.where(scales.unsqueeze(1) > 0, _dynamic_lut()[point.clamp(0, _LUT_SIZE - 1)], 0)
    return codes.reshape(-1)[:m].to(torch.uint8), scales


def dequantize_constants(
    codes: torch.Tensor, scales: torch.Tensor, offset: torch.Tensor,
    blocksize: int = CONSTANTS_BLOCK_SIZE,
) -> torch.Tensor:
    """The absmax constants back from :func:`quantize_constants`: ``(m,)`` float32."""
    return dequantize_blocks(codes, scales, _dynamic_map(), blocksize) + offset


# ---------------------------------------------------------------------------
# An NF4 tensor


@dataclass(frozen=True)
class NF4Tensor:
    """A tensor stored in NF4, as bitsandbytes' ``quantize_4bit`` stores it.

    Attributes:
        packed: ``(ceil(n / 2),)`` uint8, two NF4 codes per byte
            (:func:`pack_4bit`), ``n = shape.numel()``.
        absmax: ``(ceil(n / blocksize),)`` float32 constants, or, with
            double quantisation, their uint8 codes.
        shape: the original shape.
        dtype: the original dtype (what :meth:`dequantize` returns).
        blocksize: weights per absmax block.
        absmax_scales: with double quantisation, the float32 scale of each
            block of 256 constants, ``(ceil(n_blocks / 256),)``; else ``None``.
        absmax_offset: with double quantisation, the 0-d float32 mean
            subtracted from the constants; else ``None``.
    """

    packed: torch.Tensor
    absmax: torch.Tensor
    shape: torch.Size
    dtype: torch.dtype
    blocksize: int = BLOCK_SIZE
    absmax_scales: torch.Tensor | None = None
    absmax_offset: torch.Tensor | None = None

    @property
    def double_quant(self) -> bool:
        """Whether the absmax constants are themselves quantised (8-bit)."""
        return self.absmax_scales is not None

    @property
    def nbytes(self) -> int:
        """The bytes stored (the codes, the constants and, if any, their scales and offset)."""
        tensors = (self.packed, self.absmax, self.absmax_scales, self.absmax_offset)
        return sum(t.numel() * t.element_size() for t in tensors if t is not None)

    @property
    def bits_per_parameter(self) -> float:
        """The measured bits per weight, ``8 * nbytes / shape.numel()`` (4.5, or about 4.127
        doubly quantised)."""
        return 8 * self.nbytes / self.shape.numel()

    def constants(self) -> torch.Tensor:
        """The float32 absmax constants ``(n_blocks,)`` (dequantised if need be)."""
        if not self.double_quant:
            return self.absmax
        return dequantize_constants(self.absmax, self.absmax_scales, self.absmax_offset)

    def dequantize(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """The weight back, of ``shape``, in ``dtype`` (default: the original dtype).

        Computed in float32 (level times absmax), then cast, as bitsandbytes
        does; a bfloat16 or float16 result is rounded once, to nearest.
        """
        n = self.shape.numel()
        codes = unpack_4bit(self.packed, n)
        values = dequantize_blocks(codes, self.constants(), _nf4_levels(), self.blocksize)
        return values.reshape(self.shape).to(self.dtype if dtype is None else dtype)


def quantize_nf4(
    weight: torch.Tensor, double_quant: bool = False, blocksize: int = BLOCK_SIZE
) -> NF4Tensor:
    """Quantise ``weight`` to NF4: what bitsandbytes' ``quantize_4bit(weight,
    blocksize=blocksize, quant_type="nf4", compress_statistics=double_quant)`` stores.

    Args:
        weight: any shape, float32/bfloat16/float16, finite, not empty.
        double_quant: also quantise the absmax constants to 8 bits
            (:func:`quantize_constants`), QLoRA's double quantisation.
        blocksize: weights per absmax block (64 in QLoRA).

    Returns:
        An :class:`NF4Tensor`; ``dequantize()`` gives back a weight of the same
        shape and dtype.
    """
    double_quant = check_bool("double_quant", double_quant)
    codes, absmax = quantize_blocks(weight, _nf4_levels(), blocksize)
    scales = offset = None
    if double_quant:
        absmax, scales, offset = quantize_constants(absmax)
    return NF4Tensor(pack_4bit(codes), absmax, weight.shape, weight.dtype, blocksize,
                     scales, offset)


def bits_per_parameter(double_quant: bool, blocksize: int = BLOCK_SIZE,
                       constants_blocksize: int = CONSTANTS_BLOCK_SIZE) -> float:
    """The paper's count of bits per weight: 4 for the code plus the constants.

    One float32 absmax per block costs ``32 / blocksize`` bits per weight
    (0.5 for blocks of 64); double quantisation stores it in 8 bits plus one
    float32 per ``constants_blocksize`` constants: ``8 / 64 + 32 / (64 * 256)``
    = 0.127 bits. Returns the total, 4.5 or 4.127 (the per-tensor offset
    and a last partial block, which :attr:`NF4Tensor.bits_per_parameter`
    counts, are left out).
    """
    double_quant = check_bool("double_quant", double_quant)
    blocksize = check_positive_int("blocksize", blocksize)
    constants_blocksize = check_positive_int("constants_blocksize", constants_blocksize)
    if not double_quant:
        return 4 + 32 / blocksize
    return 4 + 8 / blocksize + 32 / (blocksize * constants_blocksize)


# ---------------------------------------------------------------------------
# Comparing 4-bit formats


def _scheme_levels(scheme: str) -> torch.Tensor:
    return {"nf4": _nf4_levels, "fp4": fp4_levels, "int4": int4_levels}[scheme]()


def fake_quantize(weight: torch.Tensor, scheme: str = "nf4",
                  blocksize: int = BLOCK_SIZE) -> torch.Tensor:
    """``weight`` quantised to a 4-bit ``scheme`` and back, same shape and dtype.

    The same blocks and absmax constants for every scheme; only the 16
    levels differ: ``"nf4"`` (:func:`nf4_levels`), ``"fp4"`` (bitsandbytes'
    4-bit float, :func:`fp4_levels`; equal to its ``quant_type="fp4"``
    round trip) or ``"int4"`` (uniform, :func:`int4_levels`).
    """
    scheme = check_choice("scheme", scheme, SCHEMES)
    levels = _scheme_levels(scheme)
    codes, absmax = quantize_blocks(weight, levels, blocksize)
    values = dequantize_blocks(codes, absmax, levels, blocksize)
    return values.reshape(weight.shape).to(weight.dtype)


def quantization_errors(weight: torch.Tensor, blocksize: int = BLOCK_SIZE) -> dict[str, float]:
    """The relative error ``‖W − Q(W)‖ / ‖W‖`` (Frobenius) of each of :data:`SCHEMES`.

    ``weight`` of any shape; returns ``{"nf4": ..., "fp4": ..., "int4": ...}``.
    """
    weight = _check_weight("weight", weight).detach()
    exact = weight.float()
    norm = float(torch.linalg.vector_norm(exact))
    if norm == 0:
        raise ValueError("weight is all zeros: the relative error is undefined")
    return {scheme: float(torch.linalg.vector_norm(
                fake_quantize(weight, scheme, blocksize).float() - exact)) / norm
            for scheme in SCHEMES}


# ---------------------------------------------------------------------------
# The frozen NF4 base layer


class _DequantizedLinear(torch.autograd.Function):
    """``x W^T + b`` with ``W`` dequantised in forward and again in backward.

    Autograd would otherwise keep the dequantised float weight of every
    layer alive until the backward pass, which is the memory QLoRA saves.
    """

    @staticmethod
    def forward(  # type: ignore[override]
        ctx, x: torch.Tensor, bias: torch.Tensor | None, layer: "NF4Linear"
    ) -> torch.Tensor:
        ctx.layer = layer
        ctx.bias_shape = None if bias is None else bias.shape
        return F.linear(x, layer.dequantize_weight(x.dtype), bias)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):  # type: ignore[override]
        grad_x = grad_bias = None
        if ctx.needs_input_grad[0]:
            grad_x = grad @ ctx.layer.dequantize_weight(grad.dtype)
        if ctx.needs_input_grad[1]:
            grad_bias = grad.reshape(-1, grad.shape[-1]).sum(0)
            grad_bias = grad_bias.reshape(ctx.bias_shape)
        return grad_x, grad_bias, None


class NF4Linear(nn.Module):
    """A frozen linear layer whose weight is stored in NF4: QLoRA's base.

    ``forward(x) = x W^T + b`` with ``W`` dequantised from its 4-bit codes at
    every call, in the input's dtype, exactly as bitsandbytes' ``Linear4bit``
    computes it on a CPU (dequantise, then ``F.linear``); the dequantised
    weight is not kept for the backward pass. The layer has no trainable
    parameter: the codes and constants are buffers (``.to(dtype)``,
    ``.half()`` and ``.double()`` leave them as they are, moving only their
    device), the bias (if any) is a parameter that starts frozen. What
    ``.to(dtype)`` changes is :attr:`weight_dtype`, the dtype the weight is
    dequantised into, as it would change a float layer's weight: after
    ``.double()`` the layer computes in float64 with the same stored values
    (each float32 level-times-absmax product, cast exactly). Wrap it in
    :class:`~lora_tutorial.layers.LoRALinear` for QLoRA:
    ``LoRALinear.from_linear(NF4Linear.from_linear(linear))``.

    The weight is stored ``(out_features, in_features)`` whatever it came
    from: a GPT-2 ``Conv1D``'s ``(in, out)`` weight is transposed first, as
    ``transformers`` does before bitsandbytes quantises it.

    Args:
        weight: ``(out_features, in_features)``, float32/bfloat16/float16.
        bias: ``(out_features,)`` or ``None``; kept as it is.
        double_quant: quantise the absmax constants too (QLoRA's default).
        blocksize: weights per absmax block.

    Shapes:
        input ``(..., in_features)`` → output ``(..., out_features)``.
    """

    absmax_scales: torch.Tensor | None
    absmax_offset: torch.Tensor | None
    #: The dtype :meth:`dequantize_weight` returns by default (and LoRA's
    #: factors take): the quantised weight's dtype, then whatever floating
    #: dtype ``.to(dtype)``, ``.half()``, ``.double()`` ... give the layer.
    weight_dtype: torch.dtype

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None = None, *,
                 double_quant: bool = True, blocksize: int = BLOCK_SIZE) -> None:
        weight = _check_weight("weight", weight)
        if weight.dim() != 2:
            raise ValueError(f"weight must be 2-D (out_features, in_features), "
                             f"got shape {tuple(weight.shape)}")
        if bias is not None and (not isinstance(bias, torch.Tensor)
                                 or bias.shape != (weight.shape[0],)):
            raise ValueError(f"bias must be None or a tensor of shape ({weight.shape[0]},), "
                             f"got {bias if bias is None else tuple(bias.shape)}")
        quantized = quantize_nf4(weight.detach(), double_quant, blocksize)
        super().__init__()
        self.out_features, self.in_features = (int(s) for s in weight.shape)
        self.blocksize = quantized.blocksize
        self.weight_dtype = quantized.dtype
        self.register_buffer("packed", quantized.packed)
        self.register_buffer("absmax", quantized.absmax)
        self.register_buffer("absmax_scales", quantized.absmax_scales)
        self.register_buffer("absmax_offset", quantized.absmax_offset)
        self.bias = None if bias is None else nn.Parameter(bias.detach().clone(),
                                                           requires_grad=False)

    @classmethod
    def from_linear(cls, linear: nn.Module, *, double_quant: bool = True,
                    blocksize: int = BLOCK_SIZE) -> "NF4Linear":
        """Quantise an ``nn.Linear`` (or subclass) or a GPT-2 ``Conv1D`` (a new layer;
        ``linear`` is left as it is)."""
        conv1d = conv1d_type()
        if conv1d is not None and isinstance(linear, conv1d):
            weight = linear.weight.T  # Conv1D stores (in, out)
        elif isinstance(linear, nn.Linear):
            weight = linear.weight
        else:
            raise TypeError("linear must be a torch.nn.Linear (or a subclass) or a transformers "
                            f"Conv1D, got {type(linear).__name__}")
        return cls(weight, linear.bias, double_quant=double_quant, blocksize=blocksize)

    @property
    def double_quant(self) -> bool:
        """Whether the absmax constants are quantised too."""
        return self.absmax_scales is not None

    def quantized(self) -> NF4Tensor:
        """The stored weight as an :class:`NF4Tensor` (the buffers, not copies)."""
        shape = torch.Size((self.out_features, self.in_features))
        return NF4Tensor(self.packed, self.absmax, shape, self.weight_dtype, self.blocksize,
                         self.absmax_scales, self.absmax_offset)

    def dequantize_weight(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """The weight ``(out_features, in_features)``, in ``dtype`` (default: :attr:`weight_dtype`).

        Computed in float32, then cast: in float64 the values are exactly the
        float32 ones; bfloat16 and float16 round each once, to nearest.
        """
        return self.quantized().dequantize(dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``x W^T + b`` in ``x``'s dtype: ``(..., in)`` → ``(..., out)``."""
        check_last_dim("x", x, self.in_features)
        bias = None if self.bias is None else self.bias.to(x.dtype)
        return _DequantizedLinear.apply(x, bias, self)

    def _apply(self, fn, recurse=True):  # type: ignore[no-untyped-def]
        # .to(dtype), .half(), .bfloat16() must not round the stored constants: the
        # codes and constants follow the device only (the bias is cast as usual).
        # What fn does to a float tensor of weight_dtype says the dtype the weight is
        # now dequantised into (unchanged by a move to another device).
        stored = {name: self._buffers.pop(name) for name in _STORED}
        try:
            super()._apply(fn, recurse)
            target = fn(torch.empty(0, dtype=self.weight_dtype)).dtype
            if target.is_floating_point:
                self.weight_dtype = target
        finally:
            for name, buffer in stored.items():
                self._buffers[name] = (None if buffer is None
                                       else buffer.to(fn(buffer.new_empty(0)).device))
        return self

    def to_linear(self) -> nn.Linear:
        """A new ``nn.Linear`` holding the dequantised weight (in :attr:`weight_dtype`) and the bias."""
        weight = self.dequantize_weight()
        linear = nn.Linear(self.in_features, self.out_features, bias=self.bias is not None,
                           device=weight.device, dtype=weight.dtype)
        with torch.no_grad():
            linear.weight.copy_(weight)
            if self.bias is not None:
                linear.bias.copy_(self.bias)
        return linear

    @property
    def nbytes(self) -> int:
        """The bytes the layer holds (the quantised weight's codes and constants, and the bias)."""
        bias = 0 if self.bias is None else self.bias.numel() * self.bias.element_size()
        return self.quantized().nbytes + bias

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"bias={self.bias is not None}, blocksize={self.blocksize}, "
                f"double_quant={self.double_quant}, dtype={self.weight_dtype}")

