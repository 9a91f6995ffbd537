"""Range checks of config values, run when a command starts, before any model or data work.

The structured configs (`harness/schema.py`) catch misspelled keys and wrong types at compose time; these
checks catch values of the right type that cannot work (`optim.lr=-1`, `trainer.batch_size=0`, `lora.alpha=nan`,
a LoRA target the model does not have). Every problem is one line naming the key, its value and the allowed
range, and all of them are reported at once.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

from harness.schema import SEVEN_PROJECTIONS

# Shortest training sequence that holds BOS, the template's headers and one response token.
MIN_SEQ_LEN = 16
QUANT_METHODS = ("rowwise", "group", "nf4", "none")
GROUP_SIZES = (32, 64, 128)  # the group-wise kernels' sizes (models.quant.QuantSpec)
# numpy's global seed is 32-bit; MLX's key takes the same range.
MAX_SEED = 2**32 - 1
DTYPES = ("auto", "float32", "bfloat16", "float16")  # models.backend.compute_dtype
WANDB_MODES = ("offline", "online", "disabled")
TRAIN_STEPS = ("auto", "standard", "layerwise")  # harness.step.factory.TRAIN_STEPS


class ConfigError(ValueError):
    """Config values out of range; one line per key (`key=value: must be ...`)."""


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def finite(value: Any) -> bool:
    return _is_number(value) and math.isfinite(value)


def at_least(low: float) -> Callable[[Any], bool]:
    return lambda v: finite(v) and v >= low


def above(low: float) -> Callable[[Any], bool]:
    return lambda v: finite(v) and v > low


def within(low: float, high: float, *, high_open: bool = False) -> Callable[[Any], bool]:
    return lambda v: finite(v) and low <= v and (v < high if high_open else v <= high)


def optional(check: Callable[[Any], bool]) -> Callable[[Any], bool]:
    return lambda v: v is None or check(v)


def one_of(choices: tuple[str, ...]) -> Callable[[Any], bool]:
    return lambda v: v in choices


# key -> (check, the allowed range in words)
TRAIN_RULES: dict[str, tuple[Callable[[Any], bool], str]] = {
    "optim.lr": (above(0), "a finite number > 0"),
    "optim.weight_decay": (at_least(0), "a finite number >= 0"),
    "optim.eps": (above(0), "a finite number > 0"),
    "optim.warmup_steps": (at_least(0), "an integer >= 0"),
    "optim.min_lr_ratio": (within(0, 1), "a number in [0, 1]"),
    "optim.grad_clip": (at_least(0), "a finite number >= 0 (0: off)"),
    "optim.grad_accum_steps": (at_least(1), "an integer >= 1"),
    "optim.schedule": (one_of(("cosine", "constant")), "cosine or constant"),
    "optim.name": (one_of(("adamw",)), "adamw"),
    "lora.rank": (at_least(1), "an integer >= 1"),
    "lora.alpha": (above(0), "a finite number > 0"),
    "lora.dropout": (within(0, 1, high_open=True), "a number in [0, 1)"),
    "quant.method": (one_of(QUANT_METHODS), " | ".join(QUANT_METHODS)),
    "quant.bits": (one_of((4,)), "4"),
    "quant.group_size": (one_of(GROUP_SIZES), "32, 64 or 128"),
    "trainer.epochs": (above(0), "a finite number > 0"),
    "trainer.max_steps": (optional(at_least(1)), "null or an integer >= 1"),
    "trainer.batch_size": (at_least(1), "an integer >= 1"),
    "trainer.eval_batch_size": (at_least(1), "an integer >= 1"),
    "trainer.eval_every": (at_least(0), "an integer >= 0 (0: only at the end)"),
    "trainer.max_eval_examples": (optional(at_least(1)), "null or an integer >= 1"),
    "trainer.log_every": (at_least(1), "an integer >= 1"),
    "trainer.save_every": (at_least(0), "an integer >= 0 (0: at validation only)"),
    "trainer.cpu_streams": (optional(at_least(1)), "null or an integer >= 1"),
    "trainer.train_step": (one_of(TRAIN_STEPS), " | ".join(TRAIN_STEPS)),
    "trainer.memory_limit_gb": (optional(above(0)), "null or a number > 0"),
    "trainer.stop_after_steps": (optional(at_least(1)), "null or an integer >= 1"),
    "trainer.num_sample_prompts": (at_least(0), "an integer >= 0"),
    "trainer.sample_max_new_tokens": (at_least(0), "an integer >= 0"),
    "trainer.exact_match_examples": (optional(at_least(0)), "null (all) or an integer >= 0 (0: none)"),
    "trainer.seed": (within(0, MAX_SEED), f"an integer in [0, {MAX_SEED}]"),
    "model.init_seed": (within(0, MAX_SEED), f"an integer in [0, {MAX_SEED}]"),
    "distributed.ranks_per_host": (at_least(1), "an integer >= 1"),
    "model.dtype": (one_of(DTYPES), " | ".join(DTYPES)),
    "model.arch.vocab_size": (at_least(1), "an integer >= 1"),
    "model.arch.hidden_size": (at_least(1), "an integer >= 1"),
    "model.arch.intermediate_size": (at_least(1), "an integer >= 1"),
    "model.arch.num_hidden_layers": (at_least(1), "an integer >= 1"),
    "model.arch.num_attention_heads": (at_least(1), "an integer >= 1"),
    "model.arch.num_key_value_heads": (at_least(1), "an integer >= 1"),
    "model.arch.max_position_embeddings": (at_least(MIN_SEQ_LEN), f"an integer >= {MIN_SEQ_LEN}"),
    "model.arch.sliding_window": (optional(at_least(1)), "null or an integer >= 1"),
    "model.arch.rope_theta": (above(0), "a finite number > 0"),
    "model.arch.rms_norm_eps": (above(0), "a finite number > 0"),
    "logger.wandb.mode": (one_of(WANDB_MODES), " | ".join(WANDB_MODES)),
}
DATA_RULES: dict[str, tuple[Callable[[Any], bool], str]] = {
    "data.max_seq_len": (at_least(MIN_SEQ_LEN), f"an integer >= {MIN_SEQ_LEN} (BOS, prompt headers, a response)"),
    "data.val_max_seq_len": (optional(at_least(MIN_SEQ_LEN)), f"null or an integer >= {MIN_SEQ_LEN}"),
    "data.max_records": (optional(at_least(1)), "null or an integer >= 1"),
    "data.val_fraction": (within(0, 1, high_open=True), "a number in [0, 1)"),
    "data.tokenize_threads": (at_least(0), "an integer >= 0 (0: one per core)"),
    "data.pad_to_multiple": (at_least(1), "an integer >= 1"),
    "data.sort_chunk_batches": (at_least(1), "an integer >= 1"),
    "data.invalid_records": (one_of(("error", "skip")), "error or skip"),
    "data.split_seed": (within(0, MAX_SEED), f"an integer in [0, {MAX_SEED}]"),
}
GENERATE_RULES: dict[str, tuple[Callable[[Any], bool], str]] = {
    "max_new_tokens": (at_least(0), "an integer >= 0"),
    "max_prompt_tokens": (at_least(1), "an integer >= 1"),
    "temperature": (at_least(0), "a finite number >= 0 (0: greedy)"),
    "top_p": (within(0, 1), "a number in [0, 1]"),
    "adapters": (one_of(("best", "latest")), "best or latest"),
    "seed": (within(0, MAX_SEED), f"an integer in [0, {MAX_SEED}]"),
}
EXPORT_RULES: dict[str, tuple[Callable[[Any], bool], str]] = {
    "adapters": (one_of(("best", "latest")), "best or latest"),
    "dtype": (one_of(DTYPES), " | ".join(DTYPES)),
}


def _lookup(cfg: Any, key: str) -> tuple[bool, Any]:
    node = cfg
    for part in key.split("."):
        if node is None or part not in node:
            return False, None
        node = node[part]
    return True, node


def problems(cfg: Any, rules: dict[str, tuple[Callable[[Any], bool], str]]) -> list[str]:
    """One line per key of `rules` present in `cfg` whose value fails its check."""
    lines = []
    for key, (check, allowed) in rules.items():
        present, value = _lookup(cfg, key)
        if present and not check(value):
            lines.append(f"{key}={value}: must be {allowed}")
    return lines


def _names_problems(cfg: Any) -> list[str]:
    """LoRA targets and quantized modules the Mistral layers have; Adam's betas; head counts that divide."""
    lines = []
    for key in ("lora.target_modules", "quant.modules"):
        present, names = _lookup(cfg, key)
        if present and names is not None:
            unknown = [n for n in names if n not in SEVEN_PROJECTIONS]
            if unknown or (key == "lora.target_modules" and not names):
                lines.append(
                    f"{key}={list(names)}: {'unknown module ' + repr(unknown[0]) if unknown else 'empty'}; "
                    f"choose from {SEVEN_PROJECTIONS}"
                )
    present, betas = _lookup(cfg, "optim.betas")
    if present and not (len(betas) == 2 and all(within(0, 1, high_open=True)(b) for b in betas)):
        lines.append(f"optim.betas={list(betas)}: must be two numbers in [0, 1)")
    present, arch = _lookup(cfg, "model.arch")
    path_present, path = _lookup(cfg, "model.path")
    if present and arch is not None and not (path_present and path):
        heads, kv, hidden = arch.num_attention_heads, arch.num_key_value_heads, arch.hidden_size
        if all(finite(v) and v >= 1 for v in (heads, kv, hidden)):
            if hidden % heads:
                lines.append(f"model.arch.hidden_size={hidden}: must be a multiple of num_attention_heads={heads}")
            if heads % kv:
                lines.append(f"model.arch.num_attention_heads={heads}: must be a multiple of num_key_value_heads={kv}")
        present, layers = _lookup(cfg, "lora.layers")
        count = arch.num_hidden_layers
        if present and layers is not None and finite(count):
            outside = [i for i in layers if not (isinstance(i, int) and -count <= i < count)]
            if outside:
                lines.append(f"lora.layers={list(layers)}: layer {outside[0]} does not exist (the model has {count})")
    return lines


def raise_if(lines: list[str]) -> None:
    if lines:
        raise ConfigError("\n".join(lines))


def check_train_config(cfg: Any) -> None:
    """Raise `ConfigError` listing every out-of-range value of a composed `train` config."""
    raise_if(problems(cfg, TRAIN_RULES) + problems(cfg, DATA_RULES) + _names_problems(cfg))


def check_data_config(cfg: Any) -> None:
    """The data part alone (`harness.prepare`)."""
    raise_if(problems(cfg, DATA_RULES))


def check_generate_config(cfg: Any) -> None:
    lines = problems(cfg, GENERATE_RULES)
    if not cfg.get("run_dir") and not cfg.get("model_dir"):
        lines.append("run_dir and model_dir are both null: give run_dir=<training run> or model_dir=<exported model>")
    raise_if(lines)


def check_export_config(cfg: Any) -> None:
    raise_if(problems(cfg, EXPORT_RULES))
