"""Read a llama-architecture GGUF file (llama.cpp's format) as `ModelArgs` and Hugging Face-named tensors.

What comes out is what a Hugging Face checkpoint directory gives `models.loading`: the model's
hyperparameters, and a dict from HF parameter names (`model.layers.0.self_attn.q_proj.weight`, ...) to float
arrays, so quantization, LoRA, the cache and export never care which format the weights came from.

- The header (metadata and tensor table) is parsed here, without reading tensor data: it gives each tensor's
  GGUF type, which MLX does not report (MLX converts types it cannot map to float16 silently), and lets a
  truncated file be refused before any tensor is read.
- Tensor data is read by `mx.load`, which reads the whole file eagerly (MLX has no lazy GGUF reader). It
  returns Q4_0, Q4_1 and Q8_0 tensors as MLX affine-quantized triples (uint32 weight, float16 scales and
  biases, groups of 32); they are dequantized in float32 lazily, when `models.loading` evaluates each block.
  BF16 tensors are read from the file directly, since MLX would round them to float16.
- llama.cpp stores the rows of q_proj and k_proj permuted for its RoPE kernel (the two rotated halves of each
  head interleaved); they are put back in Hugging Face's order.
"""

from __future__ import annotations

import dataclasses
import mmap
import struct
from pathlib import Path
from typing import Any

import mlx.core as mx
import numpy as np

from models.mistral import ModelArgs

ARCHITECTURE = "llama"
DEFAULT_ALIGNMENT = 32  # of the tensor data section, unless `general.alignment` says otherwise
QUANT_GROUP_SIZE = 32  # weights per block in Q4_0, Q4_1 and Q8_0

# GGML tensor types, by the id stored in the file; the names are llama.cpp's.
GGML_TYPE_NAMES = {
    0: "F32", 1: "F16", 2: "Q4_0", 3: "Q4_1", 6: "Q5_0", 7: "Q5_1", 8: "Q8_0", 9: "Q8_1", 10: "Q2_K",
    11: "Q3_K", 12: "Q4_K", 13: "Q5_K", 14: "Q6_K", 15: "Q8_K", 16: "IQ2_XXS", 17: "IQ2_XS", 18: "IQ3_XXS",
    19: "IQ1_S", 20: "IQ4_NL", 21: "IQ3_S", 22: "IQ2_S", 23: "IQ4_XS", 24: "I8", 25: "I16", 26: "I32",
    27: "I64", 28: "F64", 29: "IQ1_M", 30: "BF16", 34: "TQ1_0", 35: "TQ2_0", 39: "MXFP4",
}
# The types this reader dequantizes: (weights per block, bytes per block, bits of MLX's quantized form).
_READABLE = {
    "F32": (1, 4, None),
    "F16": (1, 2, None),
    "BF16": (1, 2, None),
    "Q4_0": (32, 18, 4),
    "Q4_1": (32, 20, 4),
    "Q8_0": (32, 34, 8),
}
# llama.cpp's tensor names -> Hugging Face's; `{}` is the layer index.
_LAYER_NAMES = {
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
    "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
}
_GLOBAL_NAMES = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}


class GGUFError(ValueError):
    """A GGUF file this reader cannot turn into a model: corrupt, truncated, or not a supported llama."""


@dataclasses.dataclass(frozen=True)
class TensorInfo:
    """One entry of a GGUF tensor table. `shape` is in NumPy/MLX order (llama.cpp lists dims reversed);
    `offset` is from the start of the file, in bytes."""

    name: str
    shape: tuple[int, ...]
    ggml_type: int
    offset: int

    @property
    def type_name(self) -> str:
        return GGML_TYPE_NAMES.get(self.ggml_type, f"type {self.ggml_type}")

    @property
    def nbytes(self) -> int | None:
        """Bytes of data in the file; None for a type this reader does not read."""
        if self.type_name not in _READABLE:
            return None
        per_block, block_bytes, _ = _READABLE[self.type_name]
        return int(np.prod(self.shape, dtype=np.int64)) // per_block * block_bytes


@dataclasses.dataclass
class GGUFHeader:
    """What a GGUF file says before its tensor data: scalar and string metadata, the length of each array
    value (e.g. `tokenizer.ggml.tokens`), and the tensor table, in file order."""

    path: Path
    version: int
    metadata: dict[str, Any]
    array_lengths: dict[str, int]
    tensors: dict[str, TensorInfo]


# ---------------------------------------------------------------------------------------------------------
# The header

# Metadata value types: id -> struct format of a scalar (8: string, 9: array are variable-sized).
_SCALAR_FORMATS = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q", 11: "<q",
                   12: "<d"}
_STRING, _ARRAY = 8, 9


class _Cursor:
    """Little-endian reads from a memory-mapped file; running past the end raises GGUFError."""

    def __init__(self, buffer, path: Path):
        self.buffer, self.path, self.pos = buffer, path, 0

    def truncated(self) -> GGUFError:
        return GGUFError(f"{self.path}: the header ends early at byte {self.pos} (truncated or corrupt file)")

    def unpack(self, fmt: str):
        try:
            (value,) = struct.unpack_from(fmt, self.buffer, self.pos)
        except struct.error:
            raise self.truncated() from None
        self.pos += struct.calcsize(fmt)
        return value

    def string(self) -> str:
        length = self.unpack("<Q")
        if self.pos + length > len(self.buffer):
            raise self.truncated()
        raw = bytes(self.buffer[self.pos : self.pos + length])
        self.pos += length
        return raw.decode("utf-8", errors="replace")

    def value(self, value_type: int, key: str):
        if value_type in _SCALAR_FORMATS:
            return self.unpack(_SCALAR_FORMATS[value_type])
        if value_type == _STRING:
            return self.string()
        raise GGUFError(f"{self.path}: metadata {key} has unknown value type {value_type} (corrupt file)")

    def skip_array(self, key: str) -> int:
        """Step over an array value; returns its length. Strings are stepped over one by one."""
        item_type, length = self.unpack("<I"), self.unpack("<Q")
        if item_type == _STRING:
            for _ in range(length):
                string_length = self.unpack("<Q")  # (not `pos += unpack()`: that drops unpack's own step)
                self.pos += string_length
        elif item_type in _SCALAR_FORMATS:
            self.pos += length * struct.calcsize(_SCALAR_FORMATS[item_type])
        else:
            raise GGUFError(f"{self.path}: metadata {key} is an array of type {item_type}, unsupported")
        if self.pos > len(self.buffer):
            raise self.truncated()
        return length


def read_header(path: str | Path) -> GGUFHeader:
    """Parse a GGUF file's metadata and tensor table (no tensor data is read).

    Raises `GGUFError` naming the file when it is not GGUF, is truncated (a tensor's data would run past the
    end of the file) or its header is corrupt.
    """
    path = Path(path)
    try:
        with open(path, "rb") as file, mmap.mmap(file.fileno(), 0, access=mmap.ACCESS_READ) as buffer:
            return _parse_header(_Cursor(buffer, path), len(buffer))
    except (OSError, ValueError) as err:
        if isinstance(err, GGUFError):
            raise
        raise GGUFError(f"{path}: cannot read ({err})") from err


def _parse_header(cursor: _Cursor, size: int) -> GGUFHeader:
    path = cursor.path
    if bytes(cursor.buffer[:4]) != b"GGUF":
        raise GGUFError(f"{path}: not a GGUF file (it does not start with b'GGUF')")
    cursor.pos = 4
    version = cursor.unpack("<I")
    if version not in (2, 3):
        raise GGUFError(f"{path}: GGUF version {version} is not supported (versions 2 and 3 are)")
    n_tensors, n_values = cursor.unpack("<Q"), cursor.unpack("<Q")
    metadata: dict[str, Any] = {}
    array_lengths: dict[str, int] = {}
    for _ in range(n_values):
        key = cursor.string()
        value_type = cursor.unpack("<I")
        if value_type == _ARRAY:
            array_lengths[key] = cursor.skip_array(key)
        else:
            metadata[key] = cursor.value(value_type, key)
    infos = []
    for _ in range(n_tensors):
        name = cursor.string()
        n_dims = cursor.unpack("<I")
        if n_dims > 4:
            raise GGUFError(f"{path}: tensor {name} has {n_dims} dimensions (corrupt file)")
        dims = [cursor.unpack("<Q") for _ in range(n_dims)]
        ggml_type, offset = cursor.unpack("<I"), cursor.unpack("<Q")
        infos.append((name, tuple(reversed(dims)), ggml_type, offset))
    alignment = metadata.get("general.alignment", DEFAULT_ALIGNMENT)
    if not isinstance(alignment, int) or alignment <= 0:
        raise GGUFError(f"{path}: general.alignment={alignment!r} should be a positive integer")
    data_start = -(-cursor.pos // alignment) * alignment
    tensors = {}
    for name, shape, ggml_type, offset in infos:
        info = TensorInfo(name, shape, ggml_type, data_start + offset)
        if info.nbytes is not None:
            per_block = _READABLE[info.type_name][0]
            if shape and shape[-1] % per_block:
                raise GGUFError(
                    f"{path}: tensor {name} ({info.type_name}) has rows of {shape[-1]} weights, not a multiple "
                    f"of its block of {per_block} (corrupt file)"
                )
            if info.offset + info.nbytes > size:
                raise GGUFError(
                    f"{path}: tensor {name} ends at byte {info.offset + info.nbytes}, past the end of the "
                    f"{size}-byte file (truncated download? fetch it again)"
                )
        tensors[name] = info
    return GGUFHeader(path, version, metadata, array_lengths, tensors)


# ---------------------------------------------------------------------------------------------------------
# Hyperparameters


def model_args(header: GGUFHeader) -> ModelArgs:
    """`ModelArgs` (model_type "llama") from the `llama.*` metadata and the tensor table.

    The vocabulary size is the row count of `token_embd` (the token list's length when that tensor is
    missing); embeddings are tied when there is no `output.weight`. Raises `GGUFError` naming the file and
    the key for another architecture, missing or mistyped keys and features this model does not implement
    (RoPE scaling, partial rotary, mixture of experts); `ModelConfigError` when the values are inconsistent.
    """
    path, meta = header.path, header.metadata
    arch = meta.get("general.architecture")
    if arch != ARCHITECTURE:
        raise GGUFError(
            f"{path}: general.architecture={arch!r} is not supported; only {ARCHITECTURE!r} GGUF files load"
        )

    def get(key: str, kind: type, required: bool = True):
        """A positive number `llama.<key>` of the metadata (None when optional and absent)."""
        full = f"{ARCHITECTURE}.{key}"
        if full in header.array_lengths:
            raise GGUFError(f"{path}: metadata {full} is an array (one value per layer), which is not supported")
        if full not in meta:
            if required:
                raise GGUFError(f"{path}: metadata {full} is missing")
            return None
        value = meta[full]
        ok = isinstance(value, (int, float)) if kind is float else isinstance(value, kind)
        if not ok or isinstance(value, bool) or value <= 0:
            raise GGUFError(f"{path}: metadata {full}={value!r} should be a positive {kind.__name__}")
        return value

    scaling = meta.get(f"{ARCHITECTURE}.rope.scaling.type")
    if scaling not in (None, "none"):
        raise GGUFError(f"{path}: metadata {ARCHITECTURE}.rope.scaling.type={scaling!r} is not supported")
    if meta.get(f"{ARCHITECTURE}.expert_count"):
        raise GGUFError(f"{path}: metadata {ARCHITECTURE}.expert_count: mixture-of-experts is not supported")
    heads = get("attention.head_count", int)
    hidden = get("embedding_length", int)
    head_dim = get("attention.key_length", int, required=False) or hidden // heads
    rotary = get("rope.dimension_count", int, required=False)
    if rotary is not None and rotary != head_dim:
        raise GGUFError(
            f"{path}: metadata {ARCHITECTURE}.rope.dimension_count={rotary} differs from the head dim "
            f"{head_dim}: partial rotary embeddings are not supported"
        )
    if "token_embd.weight" in header.tensors:
        vocab_size = header.tensors["token_embd.weight"].shape[0]
    elif "tokenizer.ggml.tokens" in header.array_lengths:
        vocab_size = header.array_lengths["tokenizer.ggml.tokens"]
    else:
        raise GGUFError(f"{path}: no token_embd.weight tensor and no tokenizer.ggml.tokens: vocabulary unknown")
    config = {
        "model_type": "llama",
        "vocab_size": vocab_size,
        "hidden_size": hidden,
        "intermediate_size": get("feed_forward_length", int),
        "num_hidden_layers": get("block_count", int),
        "num_attention_heads": heads,
        "num_key_value_heads": get("attention.head_count_kv", int, required=False) or heads,
        "head_dim": head_dim,
        "max_position_embeddings": get("context_length", int, required=False),
        "rms_norm_eps": get("attention.layer_norm_rms_epsilon", float),
        "rope_theta": get("rope.freq_base", float, required=False),
        "tie_word_embeddings": "output.weight" not in header.tensors,
        "bos_token_id": meta.get("tokenizer.ggml.bos_token_id"),
        "eos_token_id": meta.get("tokenizer.ggml.eos_token_id"),
    }
    # Keys the file leaves out take ModelArgs' defaults (one list of defaults, in models.mistral).
    config = {key: value for key, value in config.items() if value is not None}
    return ModelArgs.from_hf_config(config, source=str(path))


# ---------------------------------------------------------------------------------------------------------
# Tensors


def hf_name(gguf_name: str) -> str | None:
    """The Hugging Face parameter name of a llama.cpp tensor name (None when it has none)."""
    if gguf_name in _GLOBAL_NAMES:
        return _GLOBAL_NAMES[gguf_name]
    parts = gguf_name.split(".")
    if len(parts) == 4 and parts[0] == "blk" and parts[1].isdigit() and parts[3] == "weight":
        if parts[2] in _LAYER_NAMES:
            return f"model.layers.{parts[1]}.{_LAYER_NAMES[parts[2]]}.weight"
    return None


def unpermute_rope_rows(weight: mx.array, n_heads: int) -> mx.array:
    """Undo llama.cpp's row order of a q/k projection `(n_heads * head_dim, in)`.

    llama.cpp interleaves each head's two rotated halves (row pairs (i, i + d/2) become (2i, 2i + 1)) for its
    RoPE kernel; Hugging Face keeps the halves apart. Per head: `(d/2, 2, in)` -> swap the first two axes.
    """
    rows, cols = weight.shape
    return weight.reshape(n_heads, rows // n_heads // 2, 2, cols).swapaxes(1, 2).reshape(rows, cols)


def read_tensors(header: GGUFHeader, args: ModelArgs) -> dict[str, mx.array]:
    """HF parameter name -> float array (lazy: dequantized when evaluated) for every tensor of the file.

    Quantized types come out in float32, F16/BF16/F32 in their own dtype. Raises `GGUFError` naming the
    tensor for a name with no Hugging Face counterpart or a type other than F32, F16, BF16, Q4_0, Q4_1, Q8_0,
    before any tensor data is read.
    """
    path = header.path
    for info in header.tensors.values():
        if hf_name(info.name) is None:
            raise GGUFError(f"{path}: tensor {info.name} ({info.type_name}) is not part of a llama model")
        if info.type_name not in _READABLE:
            raise GGUFError(
                f"{path}: tensor {info.name} has GGUF type {info.type_name}, which this reader cannot "
                f"dequantize (supported: {', '.join(_READABLE)})"
            )
    try:
        raw = mx.load(str(path), format="gguf")
    except (RuntimeError, ValueError, OSError) as err:
        raise GGUFError(f"{path}: MLX cannot read the tensors ({err}); the file is probably corrupt") from err
    heads = {"attn_q": args.num_attention_heads, "attn_k": args.num_key_value_heads}
    tensors = {}
    for info in header.tensors.values():
        if info.type_name == "BF16":
            value = _read_bf16(info, path)
        elif _READABLE[info.type_name][2] is not None:
            value = _dequantize(raw, info)
        else:
            value = raw[info.name]
        kind = info.name.split(".")[2] if info.name.startswith("blk.") else None
        if kind in heads and value.shape[0] == heads[kind] * args.head_dim:  # else the shape check reports it
            value = unpermute_rope_rows(value, heads[kind])
        tensors[hf_name(info.name)] = value
    return tensors


def _dequantize(raw: dict[str, mx.array], info: TensorInfo) -> mx.array:
    # Scales and biases are float16 in MLX's triple; cast them first, or the product is rounded to float16.
    prefix = info.name.removesuffix(".weight")
    return mx.dequantize(
        raw[info.name],
        raw[f"{prefix}.scales"].astype(mx.float32),
        raw[f"{prefix}.biases"].astype(mx.float32),
        group_size=QUANT_GROUP_SIZE,
        bits=_READABLE[info.type_name][2],
    )


def _read_bf16(info: TensorInfo, path: Path) -> mx.array:
    count = int(np.prod(info.shape, dtype=np.int64))
    bits = np.fromfile(path, dtype="<u2", count=count, offset=info.offset)
    return mx.array(bits).view(mx.bfloat16).reshape(info.shape)
