"""Mistral decoder in MLX, with Hugging Face's parameter names; Llama is the same model without a sliding window.

The module tree mirrors `transformers.MistralForCausalLM` (and `LlamaForCausalLM`, whose names are the same)
exactly (`model.layers.0.self_attn.q_proj.weight`, ...), so a Hugging Face checkpoint loads without renaming.
The model knows nothing of quantization, LoRA or gradient checkpointing: those are applied from outside
by swapping modules (`models.quant`, `models.lora`, `models.recompute`).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import mlx.core as mx
import mlx.nn as nn

from models.attention import fused_attention
from models.rope_kernels import rope_heads_first

SUPPORTED_MODEL_TYPES = ("mistral", "llama")
# The decoder layer's linear projections, by their HF names: what LoRA may adapt and quantization may quantize.
ATTENTION_PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj")  # under `self_attn`
MLP_PROJECTIONS = ("gate_proj", "up_proj", "down_proj")  # under `mlp`
PROJECTIONS = ATTENTION_PROJECTIONS + MLP_PROJECTIONS
# Features of Hugging Face's Llama that this model does not implement: a config that switches one on is refused
# rather than loaded into a model that would silently compute something else.
_UNSUPPORTED_FLAGS = ("attention_bias", "mlp_bias")


class ModelConfigError(ValueError):
    """A `config.json` that does not describe a model this project can build."""


@dataclasses.dataclass
class ModelArgs:
    """Hyperparameters of a Mistral or Llama model, named as in Hugging Face's `MistralConfig`/`LlamaConfig`.

    `model_type` "llama" has no sliding window: `sliding_window` is always None for it (as in transformers,
    whose Llama ignores the key).
    """

    vocab_size: int = 32000
    hidden_size: int = 4096
    intermediate_size: int = 14336
    num_hidden_layers: int = 32
    num_attention_heads: int = 32
    num_key_value_heads: int = 8
    head_dim: int | None = None
    max_position_embeddings: int = 32768
    rms_norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    sliding_window: int | None = 4096
    tie_word_embeddings: bool = False
    hidden_act: str = "silu"
    bos_token_id: int = 1
    eos_token_id: int = 2
    model_type: str = "mistral"

    def __post_init__(self) -> None:
        if self.model_type not in SUPPORTED_MODEL_TYPES:
            raise ModelConfigError(
                f"model_type={self.model_type!r} is not supported; this project builds "
                f"{', '.join(SUPPORTED_MODEL_TYPES)} models"
            )
        if self.model_type == "llama":
            self.sliding_window = None
        if self.head_dim is None:
            self.head_dim = self.hidden_size // self.num_attention_heads
        if self.num_attention_heads % self.num_key_value_heads:
            raise ModelConfigError(
                f"num_attention_heads ({self.num_attention_heads}) must be a multiple of "
                f"num_key_value_heads ({self.num_key_value_heads})"
            )
        if self.hidden_act != "silu":
            raise ModelConfigError(f"hidden_act={self.hidden_act!r} is not supported (Mistral and Llama use 'silu')")

    @classmethod
    def from_hf_config(cls, config: dict[str, Any], source: str = "config.json") -> "ModelArgs":
        """Build from a Hugging Face `config.json` dict (Mistral or Llama); unknown keys are ignored.

        `rope_theta` may sit at the top level (transformers 4) or in `rope_parameters` (transformers 5).
        Raises `ModelConfigError` naming `source` and the key when the config describes a model this project
        cannot build (another model_type, RoPE scaling, biases in attention or MLP).
        """
        model_type = config.get("model_type")
        if model_type not in SUPPORTED_MODEL_TYPES:
            raise ModelConfigError(
                f"{source}: model_type={model_type!r} is not supported; this project builds "
                f"{', '.join(SUPPORTED_MODEL_TYPES)} models"
            )
        rope_key = "rope_parameters" if config.get("rope_parameters") else "rope_scaling"
        rope = config.get(rope_key) or {}
        if not isinstance(rope, dict):
            raise ModelConfigError(f"{source}: {rope_key}={rope!r} should be an object")
        rope_type = rope.get("rope_type", rope.get("type", "default"))
        if rope_type not in ("default", None):
            raise ModelConfigError(
                f"{source}: {rope_key} has rope_type={rope_type!r}: rope scaling {rope!r} is not supported "
                f"(only the default RoPE)"
            )
        for flag in _UNSUPPORTED_FLAGS:
            if config.get(flag):
                raise ModelConfigError(f"{source}: {flag}={config[flag]!r} is not supported (no biases in this model)")
        values = dict(config)
        if "rope_theta" not in values and "rope_theta" in rope:
            values["rope_theta"] = rope["rope_theta"]
        if model_type == "llama" and values.get("num_key_value_heads") is None and "num_attention_heads" in values:
            values["num_key_value_heads"] = values["num_attention_heads"]  # a Llama without GQA omits it
        known = {f.name for f in dataclasses.fields(cls)}
        kwargs = {k: v for k, v in values.items() if k in known}
        for key in ("bos_token_id", "eos_token_id"):
            if isinstance(kwargs.get(key), list):  # some configs list several ids
                kwargs[key] = kwargs[key][0]
            if kwargs.get(key) is None:
                kwargs.pop(key, None)
        for key, value in kwargs.items():
            _check_type(key, value, source)
        try:
            return cls(**kwargs)
        except ModelConfigError as err:
            raise ModelConfigError(f"{source}: {err}") from err

    def to_hf_config(self) -> dict[str, Any]:
        """The `config.json` dict that `transformers.MistralForCausalLM` (model_type "mistral") or
        `LlamaForCausalLM` (model_type "llama") reads back to the same model."""
        config = dataclasses.asdict(self)
        if self.model_type == "llama":
            del config["sliding_window"]
            config.update({flag: False for flag in _UNSUPPORTED_FLAGS})
            config["architectures"] = ["LlamaForCausalLM"]
        else:
            config["architectures"] = ["MistralForCausalLM"]
        config["torch_dtype"] = "float32"
        return config


# The JSON type of each field, read from its annotation ("int | None" is an optional int).
_JSON_TYPES = {"int": int, "float": float, "bool": bool, "str": str}
_FIELD_TYPES = {f.name: _JSON_TYPES[f.type.split(" |")[0]] for f in dataclasses.fields(ModelArgs)}
_OPTIONAL = {f.name for f in dataclasses.fields(ModelArgs) if f.type.endswith("| None")}


def _check_type(key: str, value: Any, source: str) -> None:
    """Raise `ModelConfigError` naming `source` and `key` when a config value has the wrong JSON type."""
    if value is None and key in _OPTIONAL:
        return
    expected = _FIELD_TYPES[key]
    if expected is bool:
        ok = isinstance(value, bool)
    elif expected is float:  # an integer is fine where a float is expected (e.g. rope_theta: 10000)
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
    else:
        ok = isinstance(value, expected) and not isinstance(value, bool)
    if not ok:
        raise ModelConfigError(f"{source}: {key}={value!r} should be {expected.__name__}")


def attention_mask(
    query_len: int,
    key_len: int,
    sliding_window: int | None,
    segment_ids: mx.array | None = None,
    key_padding: mx.array | None = None,
) -> mx.array | str | None:
    """Boolean mask `(…, query_len, key_len)`; True where a query may attend to a key.

    Queries are the last `query_len` positions of the `key_len` keys (a KV cache holds the rest).
    A query at position i attends to keys j with `i - sliding_window < j <= i`, and, when `segment_ids`
    `(B, L)` is given (packed sequences), only to keys of its own segment. `key_padding` `(B, key_len)`, true
    at real tokens (Hugging Face's `attention_mask`), hides padding from every query; a padding query still
    sees itself, so no row of the softmax is empty (its output is never read).
    Returns the string "causal" when a plain causal mask is exact, so the fused kernel can use it.
    """
    window_matters = sliding_window is not None and key_len > sliding_window
    if segment_ids is None and key_padding is None and not window_matters:
        if query_len == 1:
            return None
        if query_len == key_len:
            return "causal"
    q_pos = mx.arange(key_len - query_len, key_len)[:, None]
    k_pos = mx.arange(key_len)[None, :]
    mask = k_pos <= q_pos
    if window_matters:
        mask = mask & (k_pos > q_pos - sliding_window)
    if segment_ids is not None:
        if query_len != key_len:
            raise ValueError("segment_ids (packed sequences) cannot be combined with a KV cache")
        same = segment_ids[:, :, None] == segment_ids[:, None, :]
        mask = mask[None] & same
        mask = mask[:, None]  # broadcast over heads
    if key_padding is not None:
        keep = key_padding.astype(mx.bool_)[:, None, None, :] | (k_pos == q_pos)
        mask = mask & keep
    return mask


class KVCache:
    """Keys and values of past positions for generation; grows by concatenation."""

    def __init__(self) -> None:
        self.keys: mx.array | None = None
        self.values: mx.array | None = None

    @property
    def offset(self) -> int:
        return 0 if self.keys is None else self.keys.shape[2]

    def update(self, keys: mx.array, values: mx.array) -> tuple[mx.array, mx.array]:
        if self.keys is None:
            self.keys, self.values = keys, values
        else:
            self.keys = mx.concatenate([self.keys, keys], axis=2)
            self.values = mx.concatenate([self.values, values], axis=2)
        return self.keys, self.values


class MistralAttention(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.num_heads = args.num_attention_heads
        self.num_kv_heads = args.num_key_value_heads
        self.head_dim = args.head_dim
        self.scale = self.head_dim**-0.5
        self.q_proj = nn.Linear(args.hidden_size, self.num_heads * self.head_dim, bias=False)
        self.k_proj = nn.Linear(args.hidden_size, self.num_kv_heads * self.head_dim, bias=False)
        self.v_proj = nn.Linear(args.hidden_size, self.num_kv_heads * self.head_dim, bias=False)
        self.o_proj = nn.Linear(self.num_heads * self.head_dim, args.hidden_size, bias=False)
        self.rope = nn.RoPE(self.head_dim, traditional=False, base=args.rope_theta)
        # A plain function attribute (not a parameter), like `act_fn` in the MLP, so a backend-specific
        # attention (models.cpu_paths) can be swapped in from outside.
        self.attention_fn = fused_attention

    def __call__(self, x: mx.array, mask: mx.array | str | None, cache: KVCache | None = None) -> mx.array:
        batch, length, _ = x.shape
        q = self.q_proj(x).reshape(batch, length, self.num_heads, -1)
        k = self.k_proj(x).reshape(batch, length, self.num_kv_heads, -1)
        v = self.v_proj(x).reshape(batch, length, self.num_kv_heads, -1).transpose(0, 2, 1, 3)
        offset = 0 if cache is None else cache.offset
        # (batch, heads, length, head_dim), rotated; on CUDA by one kernel that also moves the heads to the front
        q = rope_heads_first(q, self.rope, offset)
        k = rope_heads_first(k, self.rope, offset)
        if cache is not None:
            k, v = cache.update(k, v)
        out = self.attention_fn(q, k, v, self.scale, mask)
        return self.o_proj(out.transpose(0, 2, 1, 3).reshape(batch, length, -1))


class MistralMLP(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.gate_proj = nn.Linear(args.hidden_size, args.intermediate_size, bias=False)
        self.up_proj = nn.Linear(args.hidden_size, args.intermediate_size, bias=False)
        self.down_proj = nn.Linear(args.intermediate_size, args.hidden_size, bias=False)
        self.act_fn = nn.SiLU()  # a module (as in HF), so a backend-specific SiLU can be swapped in from outside

    def __call__(self, x: mx.array) -> mx.array:
        return self.down_proj(self.act_fn(self.gate_proj(x)) * self.up_proj(x))


class MistralDecoderLayer(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.self_attn = MistralAttention(args)
        self.mlp = MistralMLP(args)
        self.input_layernorm = nn.RMSNorm(args.hidden_size, eps=args.rms_norm_eps)
        self.post_attention_layernorm = nn.RMSNorm(args.hidden_size, eps=args.rms_norm_eps)

    def __call__(self, x: mx.array, mask: mx.array | str | None, cache: KVCache | None = None) -> mx.array:
        h = x + self.self_attn(self.input_layernorm(x), mask, cache)
        return h + self.mlp(self.post_attention_layernorm(h))


class MistralModel(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.args = args
        self.embed_tokens = nn.Embedding(args.vocab_size, args.hidden_size)
        self.layers = [MistralDecoderLayer(args) for _ in range(args.num_hidden_layers)]
        self.norm = nn.RMSNorm(args.hidden_size, eps=args.rms_norm_eps)

    def __call__(
        self,
        input_ids: mx.array,
        cache: list[KVCache] | None = None,
        segment_ids: mx.array | None = None,
        attention_mask: mx.array | None = None,
    ) -> mx.array:
        """Final hidden states `(B, L, hidden_size)` for token ids `(B, L)`. `attention_mask` `(B, cached + L)`,
        1 at real tokens and 0 at padding (left padding, for batched generation), as in Hugging Face."""
        h = self.embed(input_ids)
        offset = 0 if cache is None else cache[0].offset
        mask = self.mask(input_ids.shape[1], offset, segment_ids, attention_mask)
        for i, layer in enumerate(self.layers):
            h = layer(h, mask, None if cache is None else cache[i])
        return self.final_norm(h)

    # The forward pass in its parts, for callers that run the layers one at a time (a layer-by-layer training
    # step): embed -> mask -> each of `layers` as `layer(h, mask)` -> final_norm.
    def embed(self, input_ids: mx.array) -> mx.array:
        """Token embeddings `(B, L, hidden_size)` for ids `(B, L)`: the first layer's input."""
        return self.embed_tokens(input_ids)

    def mask(
        self,
        length: int,
        offset: int = 0,
        segment_ids: mx.array | None = None,
        key_padding: mx.array | None = None,
    ) -> mx.array | str | None:
        """The attention mask every layer takes for `length` new positions after `offset` cached ones."""
        return attention_mask(length, offset + length, self.args.sliding_window, segment_ids, key_padding)

    def final_norm(self, hidden: mx.array) -> mx.array:
        """The last layer's output `(…, hidden_size)` normed: what the head reads."""
        return self.norm(hidden)


class MistralForCausalLM(nn.Module):
    """Mistral with its language-model head: `model(input_ids) -> logits (B, L, vocab_size)`."""

    def __init__(self, args: ModelArgs):
        super().__init__()
        self.args = args
        self.model = MistralModel(args)
        if not args.tie_word_embeddings:
            self.lm_head = nn.Linear(args.hidden_size, args.vocab_size, bias=False)

    @property
    def dtype(self) -> mx.Dtype:
        """The dtype activations and dequantized weights compute in: its norms' weights' (bfloat16 on a GPU,
        float32 on the CPU, as loaded)."""
        return self.model.norm.weight.dtype

    def logits(self, hidden: mx.array) -> mx.array:
        """Project hidden states `(…, hidden_size)` to vocabulary logits `(…, vocab_size)`."""
        if self.args.tie_word_embeddings:
            return self.model.embed_tokens.as_linear(hidden)
        return self.lm_head(hidden)

    def __call__(
        self,
        input_ids: mx.array,
        cache: list[KVCache] | None = None,
        segment_ids: mx.array | None = None,
        attention_mask: mx.array | None = None,
    ) -> mx.array:
        return self.logits(
            self.model(input_ids, cache=cache, segment_ids=segment_ids, attention_mask=attention_mask)
        )

    def embed(self, input_ids: mx.array) -> mx.array:
        """`self.model.embed`: the first decoder layer's input `(B, L, hidden_size)`."""
        return self.model.embed(input_ids)

    def mask(
        self,
        length: int,
        offset: int = 0,
        segment_ids: mx.array | None = None,
        key_padding: mx.array | None = None,
    ) -> mx.array | str | None:
        """`self.model.mask`: the attention mask every decoder layer takes."""
        return self.model.mask(length, offset, segment_ids, key_padding)

    def final_norm(self, hidden: mx.array) -> mx.array:
        """`self.model.final_norm`: the last decoder layer's output normed for `logits`."""
        return self.model.final_norm(hidden)

    def make_cache(self) -> list[KVCache]:
        return [KVCache() for _ in self.model.layers]

    @property
    def layers(self) -> list[MistralDecoderLayer]:
        return self.model.layers

