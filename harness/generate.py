"""Generate responses with a trained model: `python -m harness.generate run_dir=<run> generate.prompt="..."`.

The model is the run's base (rebuilt from its saved config) plus its best adapters, or an exported merged
directory (`generate.model_dir=`). Prompts use the training template (`harness.data.format_prompt`); tokens are
streamed to stdout as they are sampled (temperature / top-p), with a KV cache.
"""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path

import mlx.core as mx
from mlx import nn

from harness.step.cpu_streams import cpu_cores
from models.backend import is_cpu
from models.blas import blas_threads_within
from models.dense_copies import multiplying_by_kept_dense_weights


def sample_next_token(logits: mx.array, temperature: float, top_p: float) -> mx.array:
    """One token id per row of `logits (B, vocab)`: greedy at temperature 0, else nucleus sampling."""
    if temperature <= 0:
        return mx.argmax(logits, axis=-1)
    logits = logits.astype(mx.float32) / temperature
    if 0 < top_p < 1:
        order = mx.argsort(-logits, axis=-1)
        sorted_logits = mx.take_along_axis(logits, order, axis=-1)
        probs = mx.softmax(sorted_logits, axis=-1)
        # Keep the smallest prefix whose mass reaches top_p (the first token always stays).
        keep = (mx.cumsum(probs, axis=-1) - probs) < top_p
        sorted_logits = mx.where(keep, sorted_logits, -mx.inf)
        choice = mx.random.categorical(sorted_logits, axis=-1)
        return mx.take_along_axis(order, choice[:, None], axis=-1)[:, 0]
    return mx.random.categorical(logits, axis=-1)


def generate_tokens(
    model: nn.Module,
    prompt_ids: list[int],
    *,
    max_new_tokens: int,
    temperature: float = 0.0,
    top_p: float = 1.0,
    eos_id: int | None = 2,
) -> Iterator[int]:
    """Yield up to `max_new_tokens` new token ids after `prompt_ids`, stopping after `eos_id` (not yielded)."""
    cache = model.make_cache()
    logits = model(mx.array([prompt_ids], dtype=mx.int32), cache=cache)[:, -1]
    for _ in range(max_new_tokens):
        token = sample_next_token(logits, temperature, top_p)
        token_id = int(token.item())
        if eos_id is not None and token_id == eos_id:
            return
        yield token_id
        logits = model(token[:, None].astype(mx.int32), cache=cache)[:, -1]


def generate_batch(
    model: nn.Module,
    prompts: list[list[int]],
    *,
    max_new_tokens: int | list[int],
    eos_id: int | None,
    pad_id: int = 0,
) -> list[list[int]]:
    """Greedy continuations of several prompts at once: the new token ids of each, EOS excluded.

    Prompts are left-padded to one length and the padding is masked out (`attention_mask`); RoPE makes
    attention depend only on distances between tokens, so each row gets what it would get alone, up to float
    rounding. Rows stop at EOS or at their own `max_new_tokens`; the batch stops when every row has.
    """
    limits = [max_new_tokens] * len(prompts) if isinstance(max_new_tokens, int) else list(max_new_tokens)
    if not prompts:
        return []
    width = max(len(p) for p in prompts)
    ids = mx.array([[pad_id] * (width - len(p)) + list(p) for p in prompts], dtype=mx.int32)
    keep = mx.array([[0] * (width - len(p)) + [1] * len(p) for p in prompts], dtype=mx.bool_)
    cache = model.make_cache()
    logits = model(ids, cache=cache, attention_mask=keep)[:, -1]
    outputs: list[list[int]] = [[] for _ in prompts]
    done = [limit <= 0 for limit in limits]
    ones = mx.ones((len(prompts), 1), dtype=mx.bool_)
    for step in range(max(limits, default=0)):
        tokens = mx.argmax(logits, axis=-1)
        for row, token_id in enumerate(tokens.tolist()):
            if done[row]:
                continue
            if eos_id is not None and token_id == eos_id:
                done[row] = True
                continue
            outputs[row].append(token_id)
            done[row] = len(outputs[row]) >= limits[row]
        if all(done):
            break
        keep = mx.concatenate([keep, ones], axis=1)
        logits = model(tokens[:, None].astype(mx.int32), cache=cache, attention_mask=keep)[:, -1]
    return outputs


def encode_prompt(tokenizer, record: Mapping[str, str], template=None) -> list[int]:
    """Token ids of `record`'s prompt as training encodes it (BOS when the model's tokenizer adds one)."""
    from harness.data import format_prompt

    start = [tokenizer.bos_id] if tokenizer.add_bos else []  # as in training (harness/data/encode.py)
    return [*start, *tokenizer.encode(format_prompt(record, template))]


def complete_batch(
    model: nn.Module,
    tokenizer,
    records: list[Mapping[str, str]],
    *,
    template=None,
    max_new_tokens: int | list[int] = 64,
    batch_size: int = 32,
) -> list[str]:
    """Greedy responses to `records`, `batch_size` at a time (prompts of similar length batched together)."""
    limits = [max_new_tokens] * len(records) if isinstance(max_new_tokens, int) else list(max_new_tokens)
    prompts = [encode_prompt(tokenizer, record, template) for record in records]
    order = sorted(range(len(records)), key=lambda i: len(prompts[i]))
    responses = [""] * len(records)
    was_training = model.training
    model.eval()
    # On the CPU a batch's decoding steps multiply by dense weights (built once, they serve every step and the run),
    # one stream's work with every core's BLAS threads
    with contextlib.ExitStack() as on_cpu:
        if is_cpu():
            on_cpu.enter_context(multiplying_by_kept_dense_weights(model))
            on_cpu.enter_context(blas_threads_within(cpu_cores()))
        for start in range(0, len(order), batch_size):
            rows = order[start : start + batch_size]
            pad = tokenizer.pad_id if tokenizer.pad_id is not None else 0
            new = generate_batch(
                model, [prompts[i] for i in rows], max_new_tokens=[limits[i] for i in rows],
                eos_id=tokenizer.eos_id, pad_id=pad,
            )
            for i, ids in zip(rows, new):
                responses[i] = tokenizer.decode(ids, continuation=True)
    model.train(was_training)
    return responses


def complete(
    model: nn.Module,
    tokenizer,
    record: Mapping[str, str],
    *,
    template=None,
    max_new_tokens: int = 64,
    temperature: float = 0.0,
    top_p: float = 1.0,
    on_text: Callable[[str], None] | None = None,
    max_prompt_tokens: int | None = None,
) -> str:
    """The model's response to `record` (instruction [+ context]) under the training prompt template.

    `on_text` receives the response piece by piece as tokens arrive (streaming); the full text is returned.
    A prompt longer than `max_prompt_tokens` tokens (None: no limit) raises `ConfigError` before any work.
    """
    from harness.config_checks import ConfigError

    prompt = encode_prompt(tokenizer, record, template)
    if max_prompt_tokens is not None and len(prompt) > max_prompt_tokens:
        raise ConfigError(
            f"max_prompt_tokens={max_prompt_tokens}: the prompt is {len(prompt)} tokens; shorten it or raise "
            "max_prompt_tokens (memory grows with the square of the prompt's length)"
        )
    was_training = model.training
    model.eval()
    ids: list[int] = []
    shown = ""
    for token_id in generate_tokens(
        model,
        prompt,
        max_new_tokens=max_new_tokens,
        temperature=temperature,
        top_p=top_p,
        eos_id=tokenizer.eos_id,
    ):
        ids.append(token_id)
        text = tokenizer.decode(ids, continuation=True)
        if on_text is not None and len(text) > len(shown) and not text.endswith("\ufffd"):
            on_text(text[len(shown) :])
            shown = text
    text = tokenizer.decode(ids, continuation=True)
    if on_text is not None and len(text) > len(shown):
        on_text(text[len(shown) :])
    model.train(was_training)
    return text


def load_exported(model_dir: str | Path):
    """`(model, tokenizer)` from an exported (merged) Hugging Face directory (its own tokenizer files)."""
    from models.backend import compute_dtype
    from models.cpu_paths import use_cpu_paths
    from models.loading import load_pretrained
    from models.tokenizer import load_tokenizer

    model = load_pretrained(str(model_dir), dtype=compute_dtype("auto"), progress=False)
    use_cpu_paths(model)  # as for every model harness.build loads: on the CPU only, MLX's exp is a scalar loop there
    return model, load_tokenizer(model_dir)


def check_utf8(text: str | None, where: str) -> None:
    """Raise `ConfigError` when a command-line value holds bytes that are not UTF-8 (Python keeps them as
    lone surrogates, which no tokenizer can encode)."""
    from harness.config_checks import ConfigError

    try:
        (text or "").encode("utf-8")
    except UnicodeEncodeError as err:
        raise ConfigError(f"{where}: not UTF-8 text (character {err.start + 1}); pass it as UTF-8") from None


def stdin_prompts() -> list[str]:
    """The non-blank lines of stdin, read as UTF-8 (a BOM accepted); an undecodable line is a `DataError`
    naming it."""
    from harness.data.records import undecodable_line

    prompts = []
    for line_number, raw in enumerate(sys.stdin.buffer, start=1):
        try:
            line = raw.decode("utf-8-sig" if line_number == 1 else "utf-8").strip()
        except UnicodeDecodeError as err:
            raise undecodable_line("stdin", line_number, err, remedy="send UTF-8") from None
        if line:
            prompts.append(line)
    return prompts


def run(cfg) -> list[str]:
    """Generate for `cfg.prompt` (or each line of stdin), streaming to stdout; returns the responses."""
    from harness.config_checks import check_generate_config
    from harness.process import set_up_process

    check_generate_config(cfg)
    for key in ("prompt", "context"):
        check_utf8(cfg[key], key)
    set_up_process()
    if cfg.model_dir:
        model, tokenizer = load_exported(cfg.model_dir)
        template = None
    else:
        from harness.build import load_trained

        train_cfg, model, tokenizer = load_trained(cfg.run_dir, cfg.adapters)
        template = train_cfg.data.template
    mx.random.seed(cfg.seed)
    prompts = [cfg.prompt] if cfg.prompt is not None else stdin_prompts()
    responses = []
    for instruction in prompts:
        record = {"instruction": instruction, "context": cfg.context}
        response = complete(
            model,
            tokenizer,
            record,
            template=template,
            max_new_tokens=cfg.max_new_tokens,
            temperature=cfg.temperature,
            top_p=cfg.top_p,
            on_text=lambda piece: print(piece, end="", flush=True),
            max_prompt_tokens=cfg.max_prompt_tokens,
        )
        print(flush=True)
        responses.append(response)
    return responses


def main() -> None:
    """Console entry point (`qlora-generate`)."""
    import hydra

    import harness.schema  # noqa: F401
    from harness.cli import CONFIG_DIR, TRUSTED_TARGETS

    from harness.command_outcome import hydra_task, run_command

    task = hydra.main(config_path=CONFIG_DIR, config_name="generate", execution_whitelist=TRUSTED_TARGETS)
    run_command(task(hydra_task(run)))


if __name__ == "__main__":
    main()
