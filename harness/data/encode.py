"""Records -> token sequences with labels on the response only.

Sequence layout: `[BOS] + prompt + response + [EOS]`, with BOS only when the tokenizer's model adds one
(`tokenizer.add_bos`: Mistral yes, SmolLM2 no) and the model's own EOS. The prompt (`format_prompt`) and the
response are encoded separately and concatenated, so the boundary is exact: labels are -100 on BOS and every
prompt token and equal the token on every response token and on the final EOS. The response is encoded as a
continuation of the prompt (no added leading "▁"), so its labelled tokens decode (`decode(...,
continuation=True)`) to exactly the response. With the default template the prompt ends in a newline, a token
boundary of Mistral's and of byte-level BPE tokenizers, so this is also exactly how the whole text would be
tokenized at once.

Truncation to `max_seq_len`, in this order, keeping the response whole when it can:
1. the context is shortened from its end, at a word boundary where one is near (down to nothing, which
   removes the context section);
2. then the response tail is cut; a cut response gets no EOS, so the model never learns to stop where the
   length limit, not the answer, ended (and still sees a labelled token at every position after the prompt);
3. the instruction is never cut: when the prompt without context leaves no room for one response token,
   the example is dropped and counted ("prompt longer than max_seq_len").
Records with an empty instruction or response are dropped and counted too. A dropped example is `None`.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

from tqdm.auto import tqdm

from harness.data.config import TemplateConfig
from harness.data.prompt import format_prompt
from models.tokenizer import Tokenizer

IGNORE_INDEX = -100  # label of positions that carry no loss (HF convention)
CHUNK_RECORDS = 2048  # records per batched tokenizer call (one progress-bar step)

DROP_EMPTY_INSTRUCTION = "empty instruction"
DROP_EMPTY_RESPONSE = "empty response"
DROP_PROMPT_TOO_LONG = "prompt longer than max_seq_len"


@dataclass(frozen=True)
class EncodedSequence:
    """One example: `input_ids` ([BOS] + prompt + response [+ EOS]); the first `prompt_length` carry no label."""

    input_ids: list[int]
    prompt_length: int  # [BOS +] prompt tokens
    truncated: str = ""  # "" | "context" | "response": what truncation shortened

    def labels(self) -> list[int]:
        return [IGNORE_INDEX] * self.prompt_length + self.input_ids[self.prompt_length :]

    def as_example(self) -> dict[str, list[int]]:
        return {
            "input_ids": list(self.input_ids),
            "attention_mask": [1] * len(self.input_ids),
            "labels": self.labels(),
        }


@dataclass
class EncodeResult:
    """Per record: its `EncodedSequence` or None (dropped); why each was dropped; what was truncated."""

    sequences: list[EncodedSequence | None]
    drop_reasons: list[str | None]
    truncated: Counter = field(default_factory=Counter)

    @property
    def dropped(self) -> Counter:
        return Counter(reason for reason in self.drop_reasons if reason is not None)


def _with_context(record: Mapping[str, str], context: str) -> dict[str, str]:
    return {"instruction": record["instruction"], "context": context}


def _word_boundary(ids: list[int], keep: int, tokenizer: Tokenizer, max_back: int = 16) -> int:
    """`keep`, moved back (by at most `max_back` tokens) so that `ids[:keep]` does not end inside a word."""
    for cut in range(keep, max(0, keep - max_back), -1):
        if cut == len(ids) or tokenizer.starts_word(ids[cut]):
            return cut
    return keep


def fit_sequence(
    record: Mapping[str, str],
    prompt_ids: list[int],
    response_ids: list[int],
    tokenizer: Tokenizer,
    max_seq_len: int,
    template: TemplateConfig | Mapping[str, str] | None,
) -> tuple[EncodedSequence | None, str | None]:
    """Assemble one sequence of at most `max_seq_len` tokens from already-encoded prompt and response,
    truncating as the module docstring says. Returns `(sequence, None)` or `(None, reason)`."""
    if not record["instruction"].strip():
        return None, DROP_EMPTY_INSTRUCTION
    if not record["response"].strip():
        return None, DROP_EMPTY_RESPONSE
    start = [tokenizer.bos_id] if tokenizer.add_bos else []
    budget = max_seq_len - len(start)

    def assemble(prompt: list[int], response: list[int], eos: bool, truncated: str) -> EncodedSequence:
        ids = [*start, *prompt, *response] + ([tokenizer.eos_id] if eos else [])
        return EncodedSequence(ids, len(start) + len(prompt), truncated)

    if len(prompt_ids) + len(response_ids) + 1 <= budget:
        return assemble(prompt_ids, response_ids, True, ""), None

    context = record.get("context") or ""
    if context.strip():
        context_ids = tokenizer.encode(context, continuation=True)
        keep = len(context_ids) - (len(prompt_ids) + len(response_ids) + 1 - budget)
        while keep > 0:
            keep = _word_boundary(context_ids, keep, tokenizer)
            shortened = tokenizer.decode(context_ids[:keep], continuation=True)
            prompt_ids = tokenizer.encode(format_prompt(_with_context(record, shortened), template))
            overflow = len(prompt_ids) + len(response_ids) + 1 - budget
            if overflow <= 0:
                return assemble(prompt_ids, response_ids, True, "context"), None
            keep -= overflow  # re-encoding the cut text can differ by a token or two: cut again
        prompt_ids = tokenizer.encode(format_prompt(_with_context(record, ""), template))
        if len(prompt_ids) + len(response_ids) + 1 <= budget:
            return assemble(prompt_ids, response_ids, True, "context"), None

    room = budget - len(prompt_ids)
    if room < 1:
        return None, DROP_PROMPT_TOO_LONG
    return assemble(prompt_ids, response_ids[:room], False, "response"), None


def encode_example(
    record: Mapping[str, str],
    tokenizer: Tokenizer,
    max_seq_len: int,
    template: TemplateConfig | Mapping[str, str] | None = None,
) -> dict[str, list[int]] | None:
    """One training example: `input_ids`, `attention_mask`, `labels` (lists of int, length <= max_seq_len,
    unpadded), or None when the example is dropped (see the module docstring for truncation and drops)."""
    if max_seq_len < 2:
        raise ValueError(f"max_seq_len must be at least 2 (BOS + one response token), got {max_seq_len}")
    prompt_ids = tokenizer.encode(format_prompt(record, template))
    response_ids = tokenizer.encode(record["response"], continuation=True)
    sequence, _ = fit_sequence(record, prompt_ids, response_ids, tokenizer, max_seq_len, template)
    return None if sequence is None else sequence.as_example()


def encode_records(
    records: Sequence[Mapping[str, str]],
    tokenizer: Tokenizer,
    max_seq_len: int,
    template: TemplateConfig | Mapping[str, str] | None = None,
    *,
    num_threads: int = 0,
    progress: bool = False,
    desc: str = "tokenizing",
) -> EncodeResult:
    """`encode_example` for many records at once: prompts and responses go to the tokenizer in large batches
    encoded on `num_threads` threads (0: one per core). Gives the same sequences as `encode_example`."""
    if max_seq_len < 2:
        raise ValueError(f"max_seq_len must be at least 2 (BOS + one response token), got {max_seq_len}")
    result = EncodeResult(sequences=[], drop_reasons=[])
    with tqdm(total=len(records), desc=desc, unit="rec", disable=not progress, leave=False) as bar:
        for start in range(0, len(records), CHUNK_RECORDS):
            chunk = records[start : start + CHUNK_RECORDS]
            prompts = tokenizer.encode([format_prompt(r, template) for r in chunk], num_threads=num_threads)
            responses = tokenizer.encode(
                [r["response"] for r in chunk], continuation=True, num_threads=num_threads
            )
            for record, prompt_ids, response_ids in zip(chunk, prompts, responses):
                sequence, reason = fit_sequence(record, prompt_ids, response_ids, tokenizer, max_seq_len, template)
                result.sequences.append(sequence)
                result.drop_reasons.append(reason)
                if sequence is not None and sequence.truncated:
                    result.truncated[sequence.truncated] += 1
            bar.update(len(chunk))
    return result
