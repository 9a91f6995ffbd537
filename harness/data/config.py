"""`DataConfig`: every setting of the data pipeline, as a Hydra structured config (`conf/data/*.yaml`)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

# The sample dataset that ships inside the package (written by `tools/make_dolly_sample.py`).
EMBEDDED_SAMPLE = "embedded:dolly_sample"


@dataclass
class TemplateConfig:
    """The one prompt template: `Instruction [+ Context] -> Response`.

    The prompt is `preamble + instruction_header + instruction + [context_header + context] + response_header`;
    the context section is left out when the context is empty. Keep `response_header` ending in a newline: the
    response is tokenized on its own, and a newline is a token boundary, so the prompt's tokens are the same
    whether it is encoded alone (generation) or before a response (training).
    """

    preamble: str = ""
    instruction_header: str = "### Instruction:\n"
    context_header: str = "\n\n### Context:\n"
    response_header: str = "\n\n### Response:\n"


@dataclass
class DataConfig:
    """Where the records come from, how they become token sequences, and how they are split and cached."""

    # A local .jsonl/.json/.parquet file, a local dataset directory, a Hugging Face Hub dataset id
    # (e.g. databricks/databricks-dolly-15k), or `embedded:dolly_sample` (the sample shipped in the package).
    source: str = EMBEDDED_SAMPLE
    revision: Optional[str] = None  # Hub dataset revision (branch, tag or commit); null: the default branch
    hub_split: str = "train"  # the split of the Hub dataset to read
    max_records: Optional[int] = None  # keep only the first N records (quick runs); null: all
    # What a record with a missing or non-string field (or a malformed JSON line) does: error | skip.
    # `skip` drops it, counts it in the report with its reason and location, and goes on.
    invalid_records: str = "error"
    template: TemplateConfig = field(default_factory=TemplateConfig)
    max_seq_len: int = 256  # tokens per training example, BOS and EOS included
    # Tokens per validation example; null: max_seq_len. Fix it in a sweep over max_seq_len so that every trial
    # is scored on the same validation tokens.
    val_max_seq_len: Optional[int] = None
    val_fraction: float = 0.1  # share of records in the validation split
    stratify: bool = True  # split each category in the same proportion
    split_seed: int = 0
    # A tokenizer.model, tokenizer.json, .gguf file or a model directory; null: the model's own (Mistral-7B-v0.1's
    # for random-init models).
    tokenizer_path: Optional[str] = None
    tokenize_threads: int = 0  # SentencePiece threads (tokenizers uses its own pool); 0: one per CPU core
    # Batching: lengths are rounded up to a multiple of this (a few distinct shapes -> few recompilations).
    pad_to_multiple: int = 32
    sort_by_length: bool = True  # batch examples of similar length (within shuffled chunks)
    sort_chunk_batches: int = 64  # batches per chunk that is sorted by length; larger: less padding, less random
    pack: bool = False  # pack several examples per row (segment_ids keep attention inside each example)
    cache_dir: Optional[str] = None  # null: $QLORA_CACHE_DIR, else ~/.cache/mistral-dolly-qlora
