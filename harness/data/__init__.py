"""The data pipeline: Dolly-shaped records -> prompts -> token sequences with response-only labels ->
seeded splits cached on disk -> padded (or packed) MLX batches.

Modules, one job each: `config` (DataConfig), `records` (load and validate sources), `prompt` (the one prompt
formatter), `encode` (labels and truncation), `split`, `examples` (flat storage of a split),
`cache`, `dataset` (prepare_dataset), `report`, `batching`. The embedded sample is written by
`tools/make_dolly_sample.py`.
The tokenizer comes with the model: `models.tokenizer` (re-exported here as `load_tokenizer`, `Tokenizer`).
"""

from harness.data.batching import (
    batch_iterator,
    batching_options,
    num_batches,
    padding_fraction,
    plan_batches,
    validation_batches,
)
from harness.data.config import EMBEDDED_SAMPLE, DataConfig, TemplateConfig
from harness.data.dataset import PreparedData, prepare_dataset
from harness.data.encode import IGNORE_INDEX, encode_example, encode_records
from harness.data.errors import DataError
from harness.data.examples import EncodedSplit
from harness.data.prompt import DEFAULT_TEMPLATE, format_prompt
from harness.data.records import load_records
from harness.data.report import format_report, print_report
from models.tokenizer import Tokenizer, load_tokenizer  # the model's tokenizer (SentencePiece, tokenizer.json, GGUF)

__all__ = [
    "DEFAULT_TEMPLATE",
    "EMBEDDED_SAMPLE",
    "IGNORE_INDEX",
    "DataConfig",
    "DataError",
    "EncodedSplit",
    "PreparedData",
    "TemplateConfig",
    "Tokenizer",
    "batch_iterator",
    "batching_options",
    "encode_example",
    "encode_records",
    "format_prompt",
    "format_report",
    "load_records",
    "load_tokenizer",
    "num_batches",
    "padding_fraction",
    "plan_batches",
    "prepare_dataset",
    "print_report",
    "validation_batches",
]
