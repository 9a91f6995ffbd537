"""Mistral's SentencePiece tokenizer: one loader, a small wrapper with batched encoding and exact decoding."""

from __future__ import annotations

import hashlib
import importlib.resources
import os
from pathlib import Path

import sentencepiece as spm
from sentencepiece import sentencepiece_model_pb2

from harness.data.errors import DataError

# sha256 of Mistral-7B-v0.1's tokenizer.model (the Hub file's LFS oid); mistral_common ships the same bytes.
MISTRAL_7B_V01_TOKENIZER_SHA256 = "dadfd56d766715c61d2ef780a525ab43b8e6da4de6865bda3d95fdef5e134055"
PAD_ID = 0  # the batch contract pads with id 0 (`<unk>`); padded positions never carry a label


def default_tokenizer_path() -> Path:
    """`tokenizer.model.v1` inside the `mistral_common` package: Mistral-7B-v0.1's tokenizer (32000 pieces)."""
    return Path(str(importlib.resources.files("mistral_common") / "data" / "tokenizer.model.v1"))


class Tokenizer:
    """A SentencePiece model with Mistral's conventions: BOS=1, EOS=2, padding id 0.

    Two encodings: `encode(text)` is SentencePiece's usual one (a leading "▁" is added to the text, as when a
    prompt starts a sequence); `encode(text, continuation=True)` encodes text that continues earlier text (no
    added "▁"), so `decode(ids, continuation=True)` gives back exactly `text`. Responses are continuations of
    their prompt.
    """

    def __init__(self, model_bytes: bytes, path: str | None = None):
        self.path = path
        self.fingerprint = hashlib.sha256(model_bytes).hexdigest()
        self._sp = spm.SentencePieceProcessor(model_proto=model_bytes)
        proto = sentencepiece_model_pb2.ModelProto()
        proto.ParseFromString(model_bytes)
        proto.normalizer_spec.add_dummy_prefix = False
        self._sp_continuation = spm.SentencePieceProcessor(model_proto=proto.SerializeToString())
        self.bos_id = self._sp.bos_id()
        self.eos_id = self._sp.eos_id()
        self.pad_id = PAD_ID
        self.vocab_size = self._sp.vocab_size()

    def encode(
        self, text: str | list[str], *, continuation: bool = False, num_threads: int = 0
    ) -> list[int] | list[list[int]]:
        """Token ids of `text` (a string -> list of ids; a list of strings -> list of lists, encoded in
        parallel with `num_threads` threads, 0 = one per CPU core). No BOS/EOS is added."""
        sp = self._sp_continuation if continuation else self._sp
        if isinstance(text, str):
            return sp.encode(text)
        return sp.encode(text, num_threads=num_threads or os.cpu_count() or 1)

    def decode(self, ids: list[int], *, continuation: bool = False) -> str:
        """Text of token ids; BOS/EOS/padding are dropped. `continuation=True` keeps a leading space."""
        sp = self._sp_continuation if continuation else self._sp
        # Padding id 0 is `<unk>`, which SentencePiece would render as " ⁇ "; byte fallback never emits it.
        return sp.decode([int(i) for i in ids if int(i) != self.pad_id])

    def id_to_piece(self, token_id: int) -> str:
        return self._sp.id_to_piece(int(token_id))

    def __repr__(self) -> str:
        return f"Tokenizer(path={self.path!r}, vocab_size={self.vocab_size}, sha256={self.fingerprint[:12]}…)"


def load_tokenizer(path: str | os.PathLike | None = None) -> Tokenizer:
    """Load a SentencePiece tokenizer.

    `path`: a `tokenizer.model` file, or a model directory holding one; None: Mistral-7B-v0.1's tokenizer from
    the `mistral_common` package (checked against its known sha256). Raises `DataError` when there is none.
    """
    if path is None:
        file = default_tokenizer_path()
    else:
        file = Path(path).expanduser()
        if file.is_dir():
            file = file / "tokenizer.model"
    if not file.is_file():
        raise DataError(f"tokenizer file {str(file)!r} not found (give a tokenizer.model or a model directory)")
    model_bytes = file.read_bytes()
    try:
        tokenizer = Tokenizer(model_bytes, str(file))
    except Exception as error:  # sentencepiece raises RuntimeError/DecodeError on a corrupt model
        raise DataError(f"{file}: not a SentencePiece model ({error})") from None
    if path is None and tokenizer.fingerprint != MISTRAL_7B_V01_TOKENIZER_SHA256:
        raise DataError(f"{file}: expected Mistral-7B-v0.1's tokenizer (sha256 {MISTRAL_7B_V01_TOKENIZER_SHA256})")
    return tokenizer
