"""4-bit weight quantization: row-wise affine, group-wise affine and QLoRA's NF4, behind one `QuantizedLinear`.

Storage follows MLX's affine layout wherever the scheme allows it: codes packed into uint32 words, low bits
first (eight 4-bit codes per word), and `w ≈ scale * q + bias`. Row-wise quantization is the affine scheme
with one (scale, bias) per output row, so `mx.dequantize` and `mx.quantized_matmul` apply to it with the row's
parameters broadcast over MLX's groups, giving exactly the same numbers. NF4 has its own code book and
dequantizes through a table look-up.

Forward paths of `QuantizedLinear` (see `QuantizedLinear.__call__`):
- "dequantize": rebuild the dense weight in x's dtype and run a dense matmul, inside an `mx.custom_function`
  whose backward pass rebuilds the weight again instead of keeping it alive (the weight is frozen, so only
  the gradient with respect to x is needed). Fast when many tokens share a weight (training, prefill).
- "dequantize_saved": the same dense matmul differentiated by MLX, which keeps the dense weight for the backward
  pass. "auto" picks it inside a gradient-checkpointed layer (`dense_weights_kept_for_backward`): there the
  layer's forward pass is recomputed right before its backward pass, so keeping the weight costs one layer's
  dense weights for a moment and saves rebuilding them a third time.
- "fused": `mx.quantized_matmul` on the packed weight (affine schemes only). Fast when few tokens are
  multiplied (generation), where reading 4-bit weights beats writing and re-reading a dense copy.
- "reference": plain dequantize-then-matmul, differentiated by MLX itself; the readable baseline.

Inside `dense_weights_shared(modules, dtype)` the given layers multiply by dense weights built once when the block
is entered, whatever their path: a training step split over several CPU streams builds each weight once for all
streams and for the backward pass, instead of once per stream and pass.
"""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
import functools
import math
from statistics import NormalDist
from typing import Any

import mlx.core as mx
from mlx import nn

from models.backend import backend_name
from models.dequantize_kernels import affine_dequantize_4bit
from models.mistral import PROJECTIONS

METHODS = ("rowwise", "group", "nf4", "none")
FORWARD_PATHS = ("auto", "dequantize", "dequantize_saved", "fused", "reference")

NF4_BLOCK = 64  # QLoRA: one absmax per 64 weights
NF4_DOUBLE_QUANT_BLOCK = 256  # QLoRA: absmax constants quantized to 8 bits in blocks of 256

# Largest number of tokens (rows of x) for which "auto" uses the fused kernel, by backend. The fused kernel reads
# the packed weight once and so wins while the product is bandwidth-bound (generation, short prefills); beyond
# that, dequantizing once and multiplying with the BLAS/GEMM wins. The CPU's fused kernel does not use the BLAS,
# so only matrix-vector-like products favour it there. The crossover points are measured (BENCHMARKS.md, "Why the
# code is as it is"); Metal's is not, and 16 keeps decoding on the fused kernel.
FUSED_MAX_TOKENS = {"cpu": 4, "metal": 16, "cuda": 256}

_KEEP_DENSE_FOR_BACKWARD = contextvars.ContextVar("keep_dense_for_backward", default=False)
_SHARED_DENSE: contextvars.ContextVar[dict[int, mx.array] | None] = contextvars.ContextVar("shared_dense", default=None)


@contextlib.contextmanager
def dense_weights_kept_for_backward():
    """Within this block "auto" uses "dequantize_saved" instead of "dequantize" (see the module docstring);
    `models.recompute` runs each checkpointed layer's forward pass (and its recomputation) inside it."""
    token = _KEEP_DENSE_FOR_BACKWARD.set(True)
    try:
        yield
    finally:
        _KEEP_DENSE_FOR_BACKWARD.reset(token)


def dense_weights(modules: list[nn.Module], dtype: mx.Dtype) -> dict[int, mx.array]:
    """The dense weights in `dtype` of the `QuantizedLinear`s among `modules` (a `QuantizedEmbedding`, a tied LM
    head, by its table), by module id, unevaluated and frozen (no gradient flows into them): what
    `dense_weights_shared` shares."""
    modules = [m.table if isinstance(m, QuantizedEmbedding) else m for m in modules]  # a tied head's table
    return {id(m): mx.stop_gradient(m.dequantize(dtype)) for m in modules if isinstance(m, QuantizedLinear)}


@contextlib.contextmanager
def dense_weights_shared(modules: list[nn.Module], dtype: mx.Dtype, dense: dict[int, mx.array] | None = None):
    """Within this block every `QuantizedLinear` among `modules` (or `QuantizedEmbedding`, for a tied LM head)
    multiplies by, and `dequantize`s to, its dense weight in `dtype`, shared by all its calls instead of rebuilt
    per call: built here once, or `dense` (`dense_weights(modules, dtype)`, built earlier and kept by the caller).
    Costs the dense weights' memory for the block's lifetime (or the caller's)."""
    token = _SHARED_DENSE.set(dense_weights(modules, dtype) if dense is None else dense)
    try:
        yield
    finally:
        _SHARED_DENSE.reset(token)


@dataclasses.dataclass(frozen=True)
class QuantSpec:
    """How to quantize a model's linear layers.

    method: "rowwise" (one scale/zero per output row), "group" (one per `group_size` inputs), "nf4"
    (NormalFloat4, block-wise absmax over 64 weights, optional 8-bit double quantization of the absmax),
    or "none". `modules` names the decoder projections to quantize; embeddings and lm_head stay dense
    unless `quantize_embeddings` / `quantize_lm_head`.
    """

    method: str = "rowwise"
    bits: int = 4
    group_size: int = 64
    double_quant: bool = True
    modules: tuple[str, ...] = PROJECTIONS
    quantize_embeddings: bool = False
    quantize_lm_head: bool = False

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise ValueError(f"quant.method={self.method!r}; choose one of {', '.join(METHODS)}")
        if self.method == "nf4" and self.bits != 4:
            raise ValueError(f"quant.bits={self.bits}: nf4 is a 4-bit code book")
        if self.bits not in (2, 4, 8):
            raise ValueError(f"quant.bits={self.bits}; choose 2, 4 or 8 (codes must tile a uint32)")
        if self.method == "group" and self.group_size not in (32, 64, 128):
            raise ValueError(f"quant.group_size={self.group_size}; choose 32, 64 or 128")
        unknown = set(self.modules) - set(PROJECTIONS)
        if unknown:
            raise ValueError(f"quant.modules has unknown names {sorted(unknown)}; known: {', '.join(PROJECTIONS)}")
        object.__setattr__(self, "modules", tuple(self.modules))

    @property
    def enabled(self) -> bool:
        return self.method != "none"

    def to_dict(self) -> dict[str, Any]:
        return {**dataclasses.asdict(self), "modules": list(self.modules)}

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> QuantSpec:
        return cls(**{**values, "modules": tuple(values.get("modules", PROJECTIONS))})


# ---------------------------------------------------------------------------------------------------------
# Packing: codes of `bits` bits, low bits first, into uint32 words (MLX's affine layout)


def pack_codes(q: mx.array, bits: int) -> mx.array:
    """Pack integer codes `(rows, cols)` in [0, 2**bits) into uint32 `(rows, cols * bits / 32)`."""
    per_word = 32 // bits
    rows, cols = q.shape
    if cols % per_word:
        raise ValueError(f"{cols} columns do not fill whole uint32 words of {per_word} {bits}-bit codes")
    shifts = mx.arange(per_word, dtype=mx.uint32) * bits
    words = q.astype(mx.uint32).reshape(rows, cols // per_word, per_word) << shifts
    return words.sum(axis=-1).astype(mx.uint32)  # fields do not overlap, so the sum is a bitwise or


def unpack_codes(packed: mx.array, bits: int) -> mx.array:
    """Inverse of `pack_codes`: uint32 `(rows, words)` -> uint32 codes `(rows, words * 32 / bits)`."""
    per_word = 32 // bits
    shifts = mx.arange(per_word, dtype=mx.uint32) * bits
    codes = (packed[..., None] >> shifts) & ((1 << bits) - 1)
    return codes.reshape(*packed.shape[:-1], packed.shape[-1] * per_word)


# ---------------------------------------------------------------------------------------------------------
# Affine schemes (row-wise and group-wise): w ≈ scale * q + bias, bias = -scale * zero


def _round_toward(x: mx.array, dtype: mx.Dtype, down: bool) -> mx.array:
    """Round float32 `x` to `dtype`, never above x (down) or below it (up), so the code range still covers
    the group's values after the parameters are stored in a narrower dtype."""
    if dtype == mx.float32:
        return x
    rel = {mx.float16: 2.0**-10, mx.bfloat16: 2.0**-7}[dtype]  # one ulp relative, so the nudge survives rounding
    nudged = x - mx.abs(x) * rel if down else x + mx.abs(x) * rel
    return nudged.astype(dtype)


def _affine_quantize(w: mx.array, group_size: int, bits: int, param_dtype: mx.Dtype):
    """Quantize `(out, in)` in groups of `group_size` inputs; returns packed codes, scales, biases
    `(out, in / group_size)` in `param_dtype`, with `|w - (scale*q + bias)| <= scale / 2` per element."""
    out_features, in_features = w.shape
    if in_features % group_size:
        raise ValueError(f"in_features={in_features} is not a multiple of group_size={group_size}")
    levels = (1 << bits) - 1
    groups = w.astype(mx.float32).reshape(out_features, in_features // group_size, group_size)
    low = groups.min(axis=-1)
    high = groups.max(axis=-1)
    bias = _round_toward(low, param_dtype, down=True)
    scale = _round_toward((high - bias.astype(mx.float32)) / levels, param_dtype, down=False)
    scale = mx.where(scale > 0, scale, mx.ones_like(scale))  # constant group: any step represents it exactly
    scale32, bias32 = scale.astype(mx.float32), bias.astype(mx.float32)
    q = mx.clip(mx.round((groups - bias32[..., None]) / scale32[..., None]), 0, levels)
    packed = pack_codes(q.reshape(out_features, in_features).astype(mx.uint32), bits)
    return packed, scale, bias


def _affine_dequantize(packed, scales, biases, bits: int, dtype, native: bool = True) -> mx.array:
    """Dense `(out, in)` from packed codes and per-group `scales`/`biases` `(out, groups)`.

    `native` uses a fast kernel: on CUDA, for 4-bit codes, our own (`models.dequantize_kernels`: the parameters
    read as stored, `scale * q + bias` in float32); elsewhere MLX's `mx.dequantize` (one output buffer, no
    temporaries) whenever a row splits into MLX groups, row-wise parameters broadcast over them. MLX's kernel gets
    its parameters in the output's dtype, contiguous (for a float32 result `scale * q + bias` is then in float32
    too); that is faster on GPUs (BENCHMARKS.md, "Why the code is as it is") for at most about one more unit in the
    last place of the bf16 weight it writes anyway. With `native=False`, or when neither kernel applies, the plain
    unpack-scale-shift below runs, in float32.
    """
    if native and bits == 4:
        dense = affine_dequantize_4bit(packed, scales, biases, dtype)  # CUDA: our own kernel (faster)
        if dense is not None:
            return dense
    in_features = packed.shape[-1] * 32 // bits
    groups = scales.shape[-1]
    mlx_group = in_features // groups if groups > 1 else _fused_group_size(in_features)
    if native and mlx_group in (32, 64, 128):
        shape = (packed.shape[0], in_features // mlx_group)
        # the parameters in the output's dtype, contiguous (see above)
        scales_ = mx.contiguous(mx.broadcast_to(scales.astype(dtype), shape))
        biases_ = mx.contiguous(mx.broadcast_to(biases.astype(dtype), shape))
        return mx.dequantize(packed, scales_, biases_, group_size=mlx_group, bits=bits, dtype=dtype)
    q = unpack_codes(packed, bits)
    out_features, in_features = q.shape
    groups = scales.shape[-1]
    q = q.reshape(out_features, groups, in_features // groups).astype(mx.float32)
    w = q * scales.astype(mx.float32)[..., None] + biases.astype(mx.float32)[..., None]
    return w.reshape(out_features, in_features).astype(dtype)


def quantize_rowwise(w: mx.array, bits: int = 4) -> tuple[mx.array, mx.array, mx.array]:
    """Asymmetric per-output-row quantization of a weight `(out, in)`.

    Returns `packed` uint32 `(out, in * bits / 32)` (low bits first), `scales` float32 `(out, 1)` and `zeros`
    float32 `(out, 1)` (the zero point in steps, not rounded, so the row's minimum is exact), with
    `w ≈ scales * (q - zeros)` and every element within half a step (`scales / 2`) of its row.
    """
    packed, scales, biases = _affine_quantize(w, w.shape[1], bits, mx.float32)
    return packed, scales, -biases / scales


def dequantize_rowwise(packed, scales, zeros, bits: int = 4, dtype=mx.float32, native: bool = True) -> mx.array:
    """Dense `(out, in)` from `quantize_rowwise`'s output: `scales * (q - zeros)` cast to `dtype`.

    `native` uses `mx.dequantize` with the row's parameters broadcast over MLX groups (same numbers).
    """
    return _affine_dequantize(packed, scales, -scales * zeros, bits, dtype, native=native)


def quantize_group(w: mx.array, group_size: int = 64, bits: int = 4, param_dtype=mx.float16):
    """Affine quantization of `(out, in)` with one scale and bias per `group_size` consecutive inputs.

    Returns `packed` uint32 `(out, in * bits / 32)`, `scales` and `biases` `(out, in / group_size)` in
    `param_dtype` (float16 by default: 4.5 bits per weight at group 64), exactly MLX's affine layout.
    """
    return _affine_quantize(w, group_size, bits, param_dtype)


def dequantize_group(packed, scales, biases, bits: int = 4, dtype=mx.float32, native: bool = True) -> mx.array:
    """Dense `(out, in)` from `quantize_group`'s output: `scales * q + biases` per group."""
    return _affine_dequantize(packed, scales, biases, bits, dtype, native=native)


# ---------------------------------------------------------------------------------------------------------
# NF4 (QLoRA, Dettmers et al. 2023)


@functools.lru_cache(maxsize=1)
def nf4_code_values() -> tuple[float, ...]:
    """The 16 NormalFloat4 values, derived from normal quantiles as the QLoRA paper defines them.

    8 positive quantiles of N(0, 1) at probabilities evenly spaced from `offset` down to 0.5 (0.5 itself is
    dropped), 7 negative ones from 8 probabilities likewise, plus an exact zero; then scaled into [-1, 1].
    `offset = 1 - (1/32 + 1/30) / 2` puts the extreme quantiles halfway between the last two of a 2**4 and a
    2**4 - 1 level grid, avoiding the infinite quantile at probability 1.
    """
    offset = 1 - 0.5 * (1 / 32 + 1 / 30)
    normal = NormalDist()

    def spaced(n: int) -> list[float]:  # n evenly spaced probabilities from offset to 0.5, last dropped
        return [offset + (0.5 - offset) * i / (n - 1) for i in range(n - 1)]

    positive = [normal.inv_cdf(p) for p in spaced(9)]
    negative = [-normal.inv_cdf(p) for p in spaced(8)]
    values = sorted(positive + [0.0] + negative)
    top = max(abs(v) for v in values)
    return tuple(v / top for v in values)


def _nf4_code_book() -> mx.array:
    return mx.array(nf4_code_values(), dtype=mx.float32)


def quantize_nf4(w: mx.array, block_size: int = NF4_BLOCK, double_quant: bool = True) -> dict[str, mx.array]:
    """NF4 quantization of `(out, in)` with one absmax per `block_size` inputs of a row.

    Each weight is divided by its block's absmax and replaced by the nearest NF4 code (4 bits, packed like
    the affine schemes). With `double_quant`, the float32 absmax constants are themselves quantized to
    8 bits: their mean is subtracted and blocks of 256 are scaled linearly to int8 by their own absmax
    (float32), as in QLoRA but with a linear instead of a dynamic 8-bit code.
    Returns a dict of arrays: `weight` uint32 codes, and `absmax` float32 `(out, in / block_size)` or
    `absmax_q` uint8 + `absmax_scale` float32 `(ceil(blocks / 256),)` + `absmax_mean` float32 `(1,)`.
    """
    out_features, in_features = w.shape
    if in_features % block_size:
        raise ValueError(f"in_features={in_features} is not a multiple of the NF4 block size {block_size}")
    blocks = w.astype(mx.float32).reshape(out_features, in_features // block_size, block_size)
    absmax = mx.abs(blocks).max(axis=-1)
    arrays: dict[str, mx.array] = {}
    if double_quant:
        arrays.update(_quantize_absmax(absmax))
        absmax = _dequantize_absmax(arrays, absmax.shape)  # codes are chosen against what is stored
    else:
        arrays["absmax"] = absmax
    safe = mx.where(absmax > 0, absmax, mx.ones_like(absmax))
    normalized = blocks / safe[..., None]
    arrays["weight"] = pack_codes(_nf4_nearest(normalized).reshape(out_features, in_features), 4)
    return arrays


@mx.compile
def _nf4_nearest(normalized: mx.array) -> mx.array:
    """Index of the nearest NF4 code: the number of midpoints between consecutive codes below the value.

    Fifteen compares accumulated in one compiled kernel, instead of a 15x larger comparison tensor.
    """
    values = nf4_code_values()
    q = mx.zeros(normalized.shape, mx.uint32)
    for low, high in zip(values[:-1], values[1:]):
        q = q + (normalized > (low + high) / 2).astype(mx.uint32)
    return q


def _quantize_absmax(absmax: mx.array) -> dict[str, mx.array]:
    flat = absmax.reshape(-1)
    mean = flat.mean()
    centered = flat - mean
    pad = (-flat.size) % NF4_DOUBLE_QUANT_BLOCK
    padded = mx.concatenate([centered, mx.zeros((pad,), mx.float32)]).reshape(-1, NF4_DOUBLE_QUANT_BLOCK)
    scale = mx.abs(padded).max(axis=-1) / 127
    scale = mx.where(scale > 0, scale, mx.ones_like(scale))
    codes = mx.clip(mx.round(padded / scale[:, None]), -127, 127).astype(mx.int8)
    return {
        "absmax_q": codes.reshape(-1)[: flat.size].view(mx.uint8),
        "absmax_scale": scale,
        "absmax_mean": mean.reshape(1),
    }


def _dequantize_absmax(arrays: dict[str, mx.array], shape) -> mx.array:
    codes = arrays["absmax_q"].view(mx.int8).astype(mx.float32)
    pad = (-codes.size) % NF4_DOUBLE_QUANT_BLOCK
    padded = mx.concatenate([codes, mx.zeros((pad,), mx.float32)]).reshape(-1, NF4_DOUBLE_QUANT_BLOCK)
    values = (padded * arrays["absmax_scale"][:, None]).reshape(-1)[: codes.size] + arrays["absmax_mean"]
    return values.reshape(shape)


def nf4_absmax(arrays: dict[str, mx.array], out_features: int, in_features: int, block_size=NF4_BLOCK):
    """The per-block absmax `(out, in / block_size)` as stored (after double quantization, if any)."""
    if "absmax" in arrays:
        return arrays["absmax"]
    return _dequantize_absmax(arrays, (out_features, in_features // block_size))


def dequantize_nf4(arrays: dict[str, mx.array], block_size: int = NF4_BLOCK, dtype=mx.float32) -> mx.array:
    """Dense `(out, in)` from `quantize_nf4`'s arrays: `code[q] * absmax` per block."""
    out_features, in_features = arrays["weight"].shape[0], arrays["weight"].shape[1] * 8
    absmax = nf4_absmax(arrays, out_features, in_features, block_size)
    return _nf4_expand(arrays["weight"], absmax, _nf4_code_book(), dtype)


@functools.partial(mx.compile, shapeless=False)
def _nf4_expand_compiled(packed, absmax, code, dtype_probe):
    q = unpack_codes(packed, 4)
    out_features, in_features = q.shape
    values = code[q].reshape(out_features, absmax.shape[-1], -1) * absmax[..., None]
    return values.reshape(out_features, in_features).astype(dtype_probe.dtype)


def _nf4_expand(packed, absmax, code, dtype) -> mx.array:
    # Compiled so the unpack, look-up and scale fuse instead of materializing three temporaries.
    return _nf4_expand_compiled(packed, absmax, code, mx.zeros((), dtype))


# ---------------------------------------------------------------------------------------------------------
# The quantized linear layer

_NF4_KEYS = ("weight", "absmax", "absmax_q", "absmax_scale", "absmax_mean")


def _fused_group_size(in_features: int) -> int | None:
    """MLX group size over which row-wise parameters are broadcast: 64 (MLX's default, the one every backend's
    kernels implement; CUDA's quantized_matmul had no bf16 kernel for group 128 at 1x4096x4096), else 32."""
    return next((g for g in (64, 32) if in_features % g == 0), None)


def _dense_weight(method: str, bits: int, arrays: dict[str, mx.array], dtype, native: bool = True) -> mx.array:
    """The dense `(out, in)` weight in `dtype` that a quantized layer's stored `arrays` define."""
    if method == "nf4":
        return dequantize_nf4(arrays, dtype=dtype)
    return _affine_dequantize(arrays["weight"], arrays["scales"], arrays["biases"], bits, dtype, native)


def _after(arrays: dict[str, mx.array], x: mx.array) -> dict[str, mx.array]:
    """`arrays` made to depend on `x`, so what is computed from them is scheduled only once x exists."""
    return dict(zip(arrays, mx.depends(list(arrays.values()), x)))


def _dense_product(method: str, bits: int, arrays: dict[str, mx.array], x: mx.array, path: str) -> mx.array:
    """`x @ W^T` for the weight `arrays` define, W dequantized for this product ("dequantize": rebuilt again for the
    backward pass; "dequantize_saved": kept for it; see the module docstring)."""
    if path == "dequantize":
        return _dequantize_matmul(method, bits)(x, arrays)
    # As in "dequantize": rebuild W only once x exists, or MLX may schedule the recomputation's dense weights of
    # every layer long before their backward passes and keep them all alive.
    return x @ mx.stop_gradient(_dense_weight(method, bits, _after(arrays, x), x.dtype)).T  # frozen: no gradient


@functools.cache
def _dequantize_matmul(method: str, bits: int):
    """`x @ W^T` with W rebuilt from packed arrays; the backward pass rebuilds W again rather than saving it."""

    def dense(dtype, arrays, after):
        # Rebuild W only once `after` exists: the dequantization depends on the packed weights alone, so
        # without this MLX may schedule every layer's dense W up front and keep them all alive at once.
        return _dense_weight(method, bits, _after(arrays, after), dtype)

    @mx.custom_function
    def matmul(x, arrays):
        return x @ dense(x.dtype, arrays, x).T

    @matmul.vjp
    def matmul_vjp(primals, cotangent, output):
        _, arrays = primals
        grad_x = cotangent @ dense(cotangent.dtype, arrays, cotangent)
        return grad_x, {k: mx.zeros_like(v) for k, v in arrays.items()}  # frozen weights: no gradient

    return matmul


class QuantizedLinear(nn.Module):
    """A frozen linear layer `y = x @ W^T (+ bias)` whose weight `(out, in)` is stored quantized.

    Parameters (names as saved): `weight` uint32 packed codes; affine schemes add `scales`, `biases`
    (`(out, 1)` row-wise, `(out, in / group_size)` group-wise); NF4 adds `absmax` or its double-quantized
    `absmax_q`, `absmax_scale`, `absmax_mean`. `forward_path` chooses the computation (module docstring).
    """

    def __init__(self, in_features: int, out_features: int, spec: QuantSpec, bias: bool = False):
        super().__init__()
        if not spec.enabled:
            raise ValueError("QuantizedLinear needs a quantization method other than 'none'")
        self.in_features = in_features
        self.out_features = out_features
        self.method = spec.method
        self.bits = spec.bits
        self.group_size = {"rowwise": in_features, "group": spec.group_size, "nf4": NF4_BLOCK}[spec.method]
        self.forward_path = "auto"
        if in_features % self.group_size:
            raise ValueError(f"in_features={in_features} is not a multiple of group size {self.group_size}")
        # Zero-filled arrays of the stored shapes: `from_linear` fills them, `load_weights` may replace them.
        groups = in_features // self.group_size
        self.weight = mx.zeros((out_features, in_features * self.bits // 32), mx.uint32)
        if spec.method == "nf4":
            if spec.double_quant:
                n_blocks = out_features * groups
                self.absmax_q = mx.zeros((n_blocks,), mx.uint8)
                self.absmax_scale = mx.zeros((-(-n_blocks // NF4_DOUBLE_QUANT_BLOCK),), mx.float32)
                self.absmax_mean = mx.zeros((1,), mx.float32)
            else:
                self.absmax = mx.zeros((out_features, groups), mx.float32)
        else:
            param_dtype = mx.float32 if spec.method == "rowwise" else mx.float16
            self.scales = mx.zeros((out_features, groups), param_dtype)
            self.biases = mx.zeros((out_features, groups), param_dtype)
        if bias:
            self.bias = mx.zeros((out_features,), mx.float32)
        self.freeze()

    @classmethod
    def from_linear(cls, linear: nn.Linear, spec: QuantSpec) -> QuantizedLinear:
        """Quantize an `nn.Linear` (weight `(out, in)`) according to `spec`."""
        out_features, in_features = linear.weight.shape
        has_bias = "bias" in linear
        layer = cls(in_features, out_features, spec, bias=has_bias)
        if spec.method == "nf4":
            for key in _NF4_KEYS:
                if key in layer:
                    del layer[key]
            for key, value in quantize_nf4(linear.weight, double_quant=spec.double_quant).items():
                layer[key] = value
        else:
            packed, scales, biases = _affine_quantize(
                linear.weight, layer.group_size, spec.bits, layer.scales.dtype
            )
            layer.weight, layer.scales, layer.biases = packed, scales, biases
        if has_bias:
            layer.bias = linear.bias
        layer.freeze()
        return layer

    def quantized_arrays(self) -> dict[str, mx.array]:
        """The stored arrays that define the weight (excluding the optional bias)."""
        return {k: v for k, v in self.items() if isinstance(v, mx.array) and k != "bias"}

    def dequantize(self, dtype=mx.float32, native: bool = True) -> mx.array:
        """The dense weight `(out, in)` in `dtype` (`native=False`: the plain reference dequantizer); inside
        `dense_weights_shared`, the shared one."""
        shared = _SHARED_DENSE.get()
        if shared is not None and id(self) in shared:
            return shared[id(self)].astype(dtype)
        return _dense_weight(self.method, self.bits, self.quantized_arrays(), dtype, native)

    @property
    def bits_per_weight(self) -> float:
        """Bits actually stored per weight: packed codes plus every scale, zero/bias and absmax constant."""
        stored = sum(v.nbytes for v in self.quantized_arrays().values()) * 8
        return stored / (self.in_features * self.out_features)

    def choose_path(self, x: mx.array) -> str:
        """The forward path for input `x`: `forward_path` unless "auto", else fused for few tokens."""
        if self.forward_path != "auto":
            return self.forward_path
        tokens = math.prod(x.shape[:-1])
        fusable = self.method != "nf4" and _fused_group_size(self.in_features) is not None
        if fusable and tokens <= FUSED_MAX_TOKENS.get(backend_name(), 4):
            return "fused"
        return "dequantize_saved" if _KEEP_DENSE_FOR_BACKWARD.get() else "dequantize"

    def __call__(self, x: mx.array) -> mx.array:
        """`x (…, in) -> (…, out)` in x's dtype."""
        shared = _SHARED_DENSE.get()
        path = "shared" if shared is not None and id(self) in shared else self.choose_path(x)
        if path == "shared":
            y = x @ shared[id(self)].astype(x.dtype).T
        elif path == "fused":
            y = self._fused(x)
        elif path in ("dequantize", "dequantize_saved"):
            y = _dense_product(self.method, self.bits, self.quantized_arrays(), x, path)
        elif path == "reference":
            y = x @ self.dequantize(x.dtype, native=False).T
        else:
            raise ValueError(f"forward_path={path!r}; choose one of {', '.join(FORWARD_PATHS)}")
        if "bias" in self:
            y = y + self.bias.astype(y.dtype)
        return y

    def _fused(self, x: mx.array) -> mx.array:
        if self.method == "nf4":
            raise ValueError("the fused path needs an affine scheme (rowwise or group), not nf4")
        group = self.group_size if self.method == "group" else _fused_group_size(self.in_features)
        if group is None:
            raise ValueError(f"in_features={self.in_features} is not a multiple of 32: no fused kernel")
        scales, biases = self.scales.astype(x.dtype), self.biases.astype(x.dtype)
        if self.method == "rowwise":  # one (scale, bias) per row, repeated over MLX's groups
            shape = (self.out_features, self.in_features // group)
            # contiguous: CUDA's kernels refuse stride-0 parameters ("no implementation for problem shape")
            scales = mx.contiguous(mx.broadcast_to(scales, shape))
            biases = mx.contiguous(mx.broadcast_to(biases, shape))
        return mx.quantized_matmul(x, self.weight, scales, biases, transpose=True, group_size=group, bits=self.bits)


class QuantizedEmbedding(nn.Module):
    """An embedding table `(vocab, dim)` stored like a `QuantizedLinear` weight; rows are dequantized on look-up."""

    def __init__(self, table: QuantizedLinear, dtype: mx.Dtype = mx.float32):
        super().__init__()
        self.table = table
        self.dtype = dtype  # what the dense embedding produced, so the rest of the model sees no change
        self.freeze()

    @classmethod
    def from_embedding(cls, embedding: nn.Embedding, spec: QuantSpec) -> QuantizedEmbedding:
        linear = nn.Linear(1, 1, bias=False)
        linear.weight = embedding.weight
        return cls(QuantizedLinear.from_linear(linear, spec), embedding.weight.dtype)

    def __call__(self, ids: mx.array) -> mx.array:
        """Token ids `(…)` -> embeddings `(…, dim)`, dequantizing only the rows looked up (affine schemes)."""
        table = self.table
        if table.method == "nf4":
            return self.dequantize(self.dtype)[ids]
        flat = ids.reshape(-1)
        rows = _affine_dequantize(table.weight[flat], table.scales[flat], table.biases[flat], table.bits, self.dtype)
        return rows.reshape(*ids.shape, table.in_features)

    def as_linear(self, x: mx.array) -> mx.array:
        return self.table(x)

    def dequantize(self, dtype=mx.float32) -> mx.array:
        return self.table.dequantize(dtype)


# ---------------------------------------------------------------------------------------------------------
# Applying quantization to a model (from outside: module swaps)


def _linears_of_layer(layer: nn.Module, modules) -> list[tuple[nn.Module, str]]:
    """(parent module, attribute) of each projection named in `modules` inside one decoder layer."""
    found = []
    for parent in (layer.self_attn, layer.mlp):
        for name in modules:
            if name in parent:
                found.append((parent, name))
    return found


def quantize_layer(layer: nn.Module, spec: QuantSpec) -> nn.Module:
    """Replace the `spec.modules` linears of one decoder layer by `QuantizedLinear`s, in place.

    Evaluates the new arrays so the dense weights can be freed before the next layer is quantized.
    """
    if not spec.enabled:
        return layer
    new = []
    for parent, name in _linears_of_layer(layer, spec.modules):
        linear = parent[name]
        if isinstance(linear, nn.Linear):
            parent[name] = QuantizedLinear.from_linear(linear, spec)
            new.append(parent[name])
    mx.eval([q.parameters() for q in new])
    return layer


def quantize_model(model: nn.Module, spec: QuantSpec, progress: bool = False) -> nn.Module:
    """Quantize every decoder layer of `model` in place, then embeddings / lm_head if `spec` says so."""
    if not spec.enabled:
        return model
    layers = model.model.layers
    if progress:
        from tqdm import tqdm

        layers = tqdm(layers, desc=f"quantize ({spec.method})", unit="layer")
    for layer in layers:
        quantize_layer(layer, spec)
    if spec.quantize_embeddings and isinstance(model.model.embed_tokens, nn.Embedding):
        model.model.embed_tokens = QuantizedEmbedding.from_embedding(model.model.embed_tokens, spec)
    if spec.quantize_lm_head and "lm_head" in model and isinstance(model.lm_head, nn.Linear):
        model.lm_head = QuantizedLinear.from_linear(model.lm_head, spec)
    mx.eval(model.parameters())
    return model


def quantized_shell(model: nn.Module, spec: QuantSpec) -> nn.Module:
    """Swap linears for zero-filled `QuantizedLinear`s of the right shapes, in place, without quantizing.

    Used to reload a cached quantized base: build the model, call this, then `model.load_weights(path)`.
    """
    if not spec.enabled:
        return model

    def empty(linear: nn.Linear) -> QuantizedLinear:
        out_features, in_features = linear.weight.shape
        return QuantizedLinear(in_features, out_features, spec, bias="bias" in linear)

    for layer in model.model.layers:
        for parent, name in _linears_of_layer(layer, spec.modules):
            parent[name] = empty(parent[name])
    if spec.quantize_embeddings:
        embed = model.model.embed_tokens
        model.model.embed_tokens = QuantizedEmbedding(
            QuantizedLinear(embed.weight.shape[1], embed.weight.shape[0], spec), embed.weight.dtype
        )
    if spec.quantize_lm_head and "lm_head" in model:
        model.lm_head = empty(model.lm_head)
    return model


def set_forward_path(model: nn.Module, path: str) -> int:
    """Set `forward_path` (one of `FORWARD_PATHS`) on every `QuantizedLinear`; returns how many."""
    if path not in FORWARD_PATHS:
        raise ValueError(f"forward_path={path!r}; choose one of {', '.join(FORWARD_PATHS)}")
    layers = [m for _, m in model.named_modules() if isinstance(m, QuantizedLinear)]
    for layer in layers:
        layer.forward_path = path
    return len(layers)


def model_bits_per_weight(model: nn.Module) -> dict[str, float]:
    """Storage report: bits per weight of the quantized layers, and of the whole model.

    Returns `quantized_bits_per_weight` (stored bits / weights over all `QuantizedLinear`s),
    `model_bits_per_weight` (all stored bits / all weights, dense parameters included),
    `quantized_bytes` and `total_bytes`.
    """

    q_bits = q_weights = total_bits = total_weights = 0
    for _, module in model.named_modules():
        if isinstance(module, QuantizedLinear):
            q_bits += sum(v.nbytes for v in module.quantized_arrays().values()) * 8
            q_weights += module.in_features * module.out_features
    quant_ids = {id(m) for _, m in model.named_modules() if isinstance(m, QuantizedLinear)}
    for _, module in model.named_modules():
        if id(module) in quant_ids:
            total_weights += module.in_features * module.out_features + ("bias" in module) * module.out_features
            total_bits += sum(v.nbytes for v in module.parameters().values() if isinstance(v, mx.array)) * 8
            continue
        for value in module.values():
            if isinstance(value, mx.array):
                total_weights += value.size
                total_bits += value.nbytes * 8
    return {
        "quantized_bits_per_weight": q_bits / q_weights if q_weights else float("nan"),
        "model_bits_per_weight": total_bits / total_weights if total_weights else float("nan"),
        "quantized_bytes": q_bits // 8,
        "total_bytes": total_bits // 8,
    }
