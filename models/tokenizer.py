"""The tokenizer that comes with a model, behind one interface: `load_tokenizer(source)`.

Three sources, one `Tokenizer` interface (`encode`, `decode`, `bos_id`, `eos_id`, `pad_id`, `add_bos`,
`vocab_size`, `identity`, `save`):
- a SentencePiece `tokenizer.model` (Mistral): `SentencePieceTokenizer`;
- a Hugging Face `tokenizer.json` (with `tokenizer_config.json` / `special_tokens_map.json` for the special
  tokens and whether BOS is added): `HFTokenizer`, through the `tokenizers` library;
- the `tokenizer.ggml.*` metadata of a GGUF file: a byte-level BPE (`tokenizer.ggml.model = gpt2`) built with
  the `tokenizers` library from the file's tokens and merges, also an `HFTokenizer`.

Two encodings: `encode(text)` encodes text that starts a sequence (SentencePiece adds its leading "▁");
`encode(text, continuation=True)` encodes text that continues earlier text, so that
`decode(encode(x, continuation=True), continuation=True) == x`. Responses are continuations of their prompt.
Neither adds BOS or EOS: the caller adds BOS when `add_bos` says the model expects it.
"""

from __future__ import annotations

import hashlib
import importlib.resources
import json
import os
from pathlib import Path

from models.atomic_files import atomic_write_bytes
from models.json_files import read_json_object

# sha256 of Mistral-7B-v0.1's tokenizer.model (the Hub file's LFS oid); mistral_common ships the same bytes.
MISTRAL_7B_V01_TOKENIZER_SHA256 = "dadfd56d766715c61d2ef780a525ab43b8e6da4de6865bda3d95fdef5e134055"
SENTENCEPIECE_PAD_ID = 0  # Mistral has no pad token: pad with `<unk>` (0); padded positions never carry a label

# llama.cpp's token types (`tokenizer.ggml.token_type`).
GGUF_TOKEN_NORMAL, GGUF_TOKEN_CONTROL, GGUF_TOKEN_USER_DEFINED = 1, 3, 4


class TokenizerError(ValueError):
    """A tokenizer that cannot be found or read; the message names the file and, where one is at fault, the key."""


def default_tokenizer_path() -> Path:
    """`tokenizer.model.v1` inside the `mistral_common` package: Mistral-7B-v0.1's tokenizer (32000 pieces)."""
    return Path(str(importlib.resources.files("mistral_common") / "data" / "tokenizer.model.v1"))


class Tokenizer:
    """What every tokenizer gives: ids of text and text of ids, the model's special ids and conventions.

    Attributes: `bos_id`, `eos_id`, `pad_id` (int), `add_bos` (whether sequences start with BOS),
    `vocab_size` (ids are in `[0, vocab_size)`), `path` (the file it came from), `identity` (a digest of
    everything that decides the ids: equal identities give equal token sequences).
    """

    bos_id: int
    eos_id: int
    pad_id: int
    add_bos: bool
    vocab_size: int
    path: str | None
    identity: str

    def encode(
        self, text: str | list[str], *, continuation: bool = False, num_threads: int = 0
    ) -> list[int] | list[list[int]]:
        """Token ids of `text` (a string -> list of ids; a list of strings -> list of lists). No BOS/EOS added."""
        raise NotImplementedError

    def decode(self, ids: list[int], *, continuation: bool = False) -> str:
        """Text of token ids; special tokens (BOS, EOS, padding) are dropped."""
        raise NotImplementedError

    def starts_word(self, token_id: int) -> bool:
        """Whether text may be cut just before `token_id` without splitting a word (or a character)."""
        raise NotImplementedError

    def save(self, out_dir: str | os.PathLike) -> list[Path]:
        """Write files that `transformers.AutoTokenizer.from_pretrained(out_dir)` loads alone; returns them."""
        raise NotImplementedError

    def __repr__(self) -> str:
        return f"{type(self).__name__}(path={self.path!r}, vocab_size={self.vocab_size}, identity={self.identity[:24]}…)"


class SentencePieceTokenizer(Tokenizer):
    """A SentencePiece model with Mistral's conventions: BOS and EOS from the model, BOS added, padding id 0.

    `encode(text)` is SentencePiece's usual encoding (a leading "▁" is added to the text); the continuation
    encoding uses a copy of the model with that dummy prefix turned off, so it round-trips exactly.
    """

    def __init__(self, model_bytes: bytes, path: str | None = None):
        import sentencepiece as spm
        from sentencepiece import sentencepiece_model_pb2

        self.path = path
        self._model_bytes = model_bytes
        self.sha256 = hashlib.sha256(model_bytes).hexdigest()
        self.identity = f"sentencepiece:{self.sha256}"
        self._sp = spm.SentencePieceProcessor(model_proto=model_bytes)
        proto = sentencepiece_model_pb2.ModelProto()
        proto.ParseFromString(model_bytes)
        proto.normalizer_spec.add_dummy_prefix = False
        self._sp_continuation = spm.SentencePieceProcessor(model_proto=proto.SerializeToString())
        self.bos_id = self._sp.bos_id()
        self.eos_id = self._sp.eos_id()
        self.pad_id = SENTENCEPIECE_PAD_ID
        self.add_bos = True
        self.vocab_size = self._sp.vocab_size()

    def encode(self, text, *, continuation=False, num_threads=0):
        """As `Tokenizer.encode`; a list is encoded on `num_threads` threads (0: one per CPU core)."""
        sp = self._sp_continuation if continuation else self._sp
        if isinstance(text, str):
            return sp.encode(text)
        return sp.encode(text, num_threads=num_threads or os.cpu_count() or 1)

    def decode(self, ids, *, continuation=False):
        """As `Tokenizer.decode`; `continuation=True` keeps a leading space."""
        sp = self._sp_continuation if continuation else self._sp
        # Padding id 0 is `<unk>`, which SentencePiece would render as " ⁇ "; byte fallback never emits it.
        return sp.decode([int(i) for i in ids if int(i) != self.pad_id])

    def id_to_piece(self, token_id: int) -> str:
        return self._sp.id_to_piece(int(token_id))

    def starts_word(self, token_id: int) -> bool:
        piece = self.id_to_piece(token_id)
        if self._sp.is_byte(int(token_id)):  # a byte of a character SentencePiece has no piece for
            return not 0x80 <= int(piece[3:5], 16) <= 0xBF  # not a UTF-8 continuation byte
        return piece.startswith("▁")

    def save(self, out_dir):
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        model_file, config_file = out / "tokenizer.model", out / "tokenizer_config.json"
        atomic_write_bytes(model_file, self._model_bytes)
        config = {
            "tokenizer_class": "LlamaTokenizer",
            "bos_token": self.id_to_piece(self.bos_id),
            "eos_token": self.id_to_piece(self.eos_id),
            "unk_token": self.id_to_piece(self._sp.unk_id()),
            "add_bos_token": self.add_bos,
            "add_eos_token": False,
            "clean_up_tokenization_spaces": False,
        }
        atomic_write_bytes(config_file, (json.dumps(config, indent=2) + "\n").encode())
        return [model_file, config_file]


class HFTokenizer(Tokenizer):
    """A `tokenizers.Tokenizer` (from a `tokenizer.json` or built from GGUF metadata) and its special tokens.

    `encode` never runs the post-processor (no special tokens added); special tokens written in the text
    (`<|im_start|>`) are matched as such, as `transformers` does. A list is encoded in parallel by the
    `tokenizers` library (its own thread pool: `RAYON_NUM_THREADS`), so `num_threads` is not used.
    """

    def __init__(
        self,
        backend,
        *,
        bos_id: int,
        eos_id: int,
        pad_id: int | None,
        add_bos: bool,
        path: str | None = None,
        chat_template: str | None = None,
        unk_id: int | None = None,
    ):
        from tokenizers import Tokenizer as Backend, processors

        self.bos_id, self.eos_id = int(bos_id), int(eos_id)
        self.add_bos = bool(add_bos)
        # `encode` never runs the post-processor; `transformers` does (after `save`): BOS exactly when the
        # model wants it. Set here, so that a saved and reloaded tokenizer has the same identity.
        bos = backend.id_to_token(self.bos_id)
        backend.post_processor = processors.TemplateProcessing(
            single=f"{bos} $A" if self.add_bos else "$A",
            pair=f"{bos} $A {bos} $B" if self.add_bos else "$A $B",
            special_tokens=[(bos, self.bos_id)],
        )
        self._tokenizer = backend
        spec = backend.to_str()
        continuation = _without_prefix_space(backend)
        self._continuation = backend if continuation is None else Backend.from_str(continuation)
        self.path = path
        self.pad_id = int(pad_id) if pad_id is not None else self.eos_id  # no pad token: pad with EOS
        self.unk_id = unk_id
        self.chat_template = chat_template
        self.vocab_size = backend.get_vocab_size(with_added_tokens=True)
        self._starts_word: dict[int, bool] = {}
        conventions = {"bos_id": self.bos_id, "eos_id": self.eos_id, "pad_id": self.pad_id, "add_bos": self.add_bos}
        digest = hashlib.sha256(spec.encode())
        digest.update(json.dumps(conventions, sort_keys=True).encode())
        self.identity = f"tokenizers:{digest.hexdigest()}"

    def encode(self, text, *, continuation=False, num_threads=0):
        backend = self._continuation if continuation else self._tokenizer
        if isinstance(text, str):
            return backend.encode(text, add_special_tokens=False).ids
        encode_batch = getattr(backend, "encode_batch_fast", backend.encode_batch)  # _fast: no character offsets
        return [e.ids for e in encode_batch(list(text), add_special_tokens=False)]

    def decode(self, ids, *, continuation=False):
        backend = self._continuation if continuation else self._tokenizer
        return backend.decode([int(i) for i in ids], skip_special_tokens=True)

    def id_to_piece(self, token_id: int) -> str:
        return self._tokenizer.id_to_token(int(token_id))

    def starts_word(self, token_id: int) -> bool:
        token_id = int(token_id)
        if token_id not in self._starts_word:  # a byte fragment of a character decodes to "\ufffd": no cut there
            # The continuation decoder keeps a token's leading space (a Metaspace decoder strips it).
            text = self._continuation.decode([token_id], skip_special_tokens=False)
            self._starts_word[token_id] = text[:1].isspace()
        return self._starts_word[token_id]

    def _token(self, token_id: int | None) -> str | None:
        return None if token_id is None else self._tokenizer.id_to_token(token_id)

    def save(self, out_dir):
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        tokenizer_file, config_file = out / "tokenizer.json", out / "tokenizer_config.json"
        atomic_write_bytes(tokenizer_file, self._tokenizer.to_str().encode())
        config = {
            "tokenizer_class": "PreTrainedTokenizerFast",
            "bos_token": self._token(self.bos_id),
            "eos_token": self._token(self.eos_id),
            "pad_token": self._token(self.pad_id),
            "add_bos_token": self.add_bos,
            "add_eos_token": False,
            "clean_up_tokenization_spaces": False,
        }
        if self.unk_id is not None:
            config["unk_token"] = self._token(self.unk_id)
        if self.chat_template:
            config["chat_template"] = self.chat_template
        atomic_write_bytes(config_file, (json.dumps(config, indent=2, ensure_ascii=False) + "\n").encode())
        return [tokenizer_file, config_file]


def _without_prefix_space(backend) -> str | None:
    """The JSON of the same tokenizer with every added leading space turned off (ByteLevel's
    `add_prefix_space`, Metaspace's prepend scheme, a normalizer that prepends "▁", and the decoder's
    `Strip` of that space), for encoding and decoding continuations; None when it adds none (byte-level BPE
    without a prefix space encodes continuations like any text)."""

    def strip(node, decoder: bool = False):
        if isinstance(node, dict):
            kind = node.get("type")
            if kind == "Prepend" or (kind == "Strip" and decoder and node.get("start")):
                return None
            if kind == "ByteLevel" and node.get("add_prefix_space") and not decoder:  # the decoder ignores it
                node = {**node, "add_prefix_space": False}
            if kind == "Metaspace":
                node = {**node, "prepend_scheme": "never", "add_prefix_space": False}
            return {key: strip(value, decoder) for key, value in node.items()}
        if isinstance(node, list):
            return [kept for kept in (strip(value, decoder) for value in node) if kept is not None]
        return node

    # Only the small parts are parsed (the model's vocabulary is large), and the whole only when one changes.
    parts = {
        name: json.loads(getattr(backend, name).__getstate__())
        for name in ("normalizer", "pre_tokenizer", "decoder")
        if getattr(backend, name) is not None
    }
    changed = {name: strip(part, decoder=name == "decoder") for name, part in parts.items()}
    if changed == parts:
        return None
    spec = json.loads(backend.to_str())
    spec.update(changed)
    return json.dumps(spec)


# ---- Hugging Face tokenizer.json ------------------------------------------------------------------------

def _special_token_content(value) -> str | None:
    """`"<s>"` or `{"content": "<s>", ...}` (both spellings appear in tokenizer_config.json) -> `"<s>"`."""
    if isinstance(value, dict):
        return value.get("content")
    return value if isinstance(value, str) else None


def _read_json(file: Path) -> dict:
    return read_json_object(file, TokenizerError, "a tokenizer file")


def load_hf_tokenizer(file: Path) -> HFTokenizer:
    """A `tokenizer.json`, with special tokens and `add_bos_token` from `tokenizer_config.json` and
    `special_tokens_map.json` beside it (config first). Without `add_bos_token`, whether BOS is added is
    read from the tokenizer's own post-processor."""
    from tokenizers import Tokenizer as Backend

    try:
        backend = Backend.from_file(str(file))
    except Exception as error:  # tokenizers raises a bare Exception on bad JSON or an unknown model
        raise TokenizerError(f"{file}: not a Hugging Face tokenizer.json ({error})") from None
    settings: dict = {}
    for name in ("special_tokens_map.json", "tokenizer_config.json"):  # the config's values win
        if (file.parent / name).is_file():
            settings.update(_read_json(file.parent / name))

    def token_id(key: str) -> int | None:
        content = _special_token_content(settings.get(key))
        if content is None:
            return None
        found = backend.token_to_id(content)
        if found is None:
            raise TokenizerError(f"{file.parent}: {key} {content!r} is not in the vocabulary of {file.name}")
        return found

    bos_id, eos_id, pad_id, unk_id = (token_id(k) for k in ("bos_token", "eos_token", "pad_token", "unk_token"))
    if eos_id is None:
        raise TokenizerError(f"{file.parent}: no eos_token in tokenizer_config.json or special_tokens_map.json")
    if "add_bos_token" in settings:
        add_bos = bool(settings["add_bos_token"])
    else:
        with_specials = backend.encode("a", add_special_tokens=True).ids
        add_bos = bos_id is not None and with_specials[:1] == [bos_id]
    if bos_id is None:
        if add_bos:
            raise TokenizerError(f"{file.parent}: add_bos_token is true but there is no bos_token")
        bos_id = eos_id  # never added; generation prompts of a model without BOS start without one
    return HFTokenizer(
        backend, bos_id=bos_id, eos_id=eos_id, pad_id=pad_id, add_bos=add_bos, path=str(file),
        chat_template=settings.get("chat_template") if isinstance(settings.get("chat_template"), str) else None,
        unk_id=unk_id,
    )


# ---- GGUF metadata ----------------------------------------------------------------------------------------

def _gpt2_pre_tokenizer():
    from tokenizers import pre_tokenizers

    return pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)


def _digits_then_gpt2_pre_tokenizer():
    """llama.cpp's `smollm` family: every digit on its own, then GPT-2's split (the same as SmolLM2's own
    tokenizer.json: `Digits(individual_digits=True)` then `ByteLevel`)."""
    from tokenizers import pre_tokenizers

    return pre_tokenizers.Sequence(
        [pre_tokenizers.Digits(individual_digits=True), pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)]
    )


# `tokenizer.ggml.pre` -> pre-tokenizer, for the names whose split llama.cpp defines as one of these two.
GGUF_PRE_TOKENIZERS = {
    "gpt-2": _gpt2_pre_tokenizer,
    "gpt2": _gpt2_pre_tokenizer,
    "smollm": _digits_then_gpt2_pre_tokenizer,
    "starcoder": _digits_then_gpt2_pre_tokenizer,
    "refact": _digits_then_gpt2_pre_tokenizer,
    "command-r": _digits_then_gpt2_pre_tokenizer,
    "codeshell": _digits_then_gpt2_pre_tokenizer,
    "exaone": _digits_then_gpt2_pre_tokenizer,
    "minerva-7b": _digits_then_gpt2_pre_tokenizer,
}
GGUF_TOKENIZER_MODELS = ("gpt2",)  # byte-level BPE


def _scalar(value):
    """A GGUF metadata value as a Python scalar (MLX gives numbers as 0-d arrays)."""
    return value.item() if hasattr(value, "item") else value


def read_gguf_metadata(file: Path) -> dict:
    """The metadata of a GGUF file (tensors are not kept); `TokenizerError` naming the file if unreadable."""
    import mlx.core as mx

    try:
        _, metadata = mx.load(str(file), return_metadata=True)
    except Exception as error:  # MLX raises ValueError/RuntimeError on a file that is not GGUF
        raise TokenizerError(f"{file}: not a readable GGUF file ({error})") from None
    return metadata


def load_gguf_tokenizer(file: Path) -> HFTokenizer:
    """The byte-level BPE described by a GGUF file's `tokenizer.ggml.*` metadata, built with `tokenizers`:
    `models.BPE` from the tokens and merges, the pre-tokenizer `tokenizer.ggml.pre` names, the ByteLevel
    decoder, control tokens (token type 3) as special tokens and user-defined ones (4) as added tokens.
    BOS/EOS/pad/unknown ids and `add_bos_token` come from the metadata."""
    from tokenizers import AddedToken, Tokenizer as Backend, decoders, models

    metadata = read_gguf_metadata(file)

    def key(name: str, default=None, required: bool = True):
        full = f"tokenizer.ggml.{name}"
        if full not in metadata:
            if required:
                raise TokenizerError(f"{file}: metadata key {full!r} is missing")
            return default
        return metadata[full]

    kind = key("model")
    if kind not in GGUF_TOKENIZER_MODELS:
        raise TokenizerError(
            f"{file}: tokenizer.ggml.model = {kind!r} is not supported (supported: {', '.join(GGUF_TOKENIZER_MODELS)})"
        )
    pre = key("pre")
    if pre not in GGUF_PRE_TOKENIZERS:
        raise TokenizerError(
            f"{file}: tokenizer.ggml.pre = {pre!r} is not supported (supported: {', '.join(sorted(GGUF_PRE_TOKENIZERS))})"
        )
    tokens = list(key("tokens"))
    vocab = {token: index for index, token in enumerate(tokens)}
    if len(vocab) != len(tokens):
        raise TokenizerError(f"{file}: tokenizer.ggml.tokens holds {len(tokens) - len(vocab)} duplicate tokens")
    merges = []
    for line in key("merges"):
        pair = line.split(" ")
        if len(pair) != 2:
            raise TokenizerError(f"{file}: tokenizer.ggml.merges has a malformed entry {line!r}")
        merges.append((pair[0], pair[1]))
    types = key("token_type", required=False)
    types = [GGUF_TOKEN_NORMAL] * len(tokens) if types is None else [int(t) for t in types.tolist()]
    if len(types) != len(tokens):
        raise TokenizerError(f"{file}: tokenizer.ggml.token_type has {len(types)} entries for {len(tokens)} tokens")

    backend = Backend(models.BPE(vocab=vocab, merges=merges, fuse_unk=False, byte_fallback=False))
    backend.pre_tokenizer = GGUF_PRE_TOKENIZERS[pre]()
    backend.decoder = decoders.ByteLevel()
    special = [AddedToken(t, special=True, normalized=False) for t, k in zip(tokens, types) if k == GGUF_TOKEN_CONTROL]
    added = [AddedToken(t, special=False, normalized=False) for t, k in zip(tokens, types) if k == GGUF_TOKEN_USER_DEFINED]
    backend.add_special_tokens(special)
    backend.add_tokens(added)

    def token_id(name: str) -> int | None:
        value = key(name, required=False)
        if value is None:
            return None
        value = int(_scalar(value))
        if not 0 <= value < len(tokens):
            raise TokenizerError(f"{file}: tokenizer.ggml.{name} = {value} is outside the {len(tokens)} tokens")
        return value

    eos_id = token_id("eos_token_id")
    if eos_id is None:
        raise TokenizerError(f"{file}: metadata key 'tokenizer.ggml.eos_token_id' is missing")
    bos_id = token_id("bos_token_id")
    add_bos = bool(_scalar(key("add_bos_token", default=False, required=False)))
    if bos_id is None:
        if add_bos:
            raise TokenizerError(f"{file}: tokenizer.ggml.add_bos_token is true but there is no bos_token_id")
        bos_id = eos_id
    template = metadata.get("tokenizer.chat_template")
    return HFTokenizer(
        backend, bos_id=bos_id, eos_id=eos_id, pad_id=token_id("padding_token_id"), add_bos=add_bos,
        path=str(file), chat_template=template if isinstance(template, str) else None,
        unk_id=token_id("unknown_token_id"),
    )


# ---- one entry point --------------------------------------------------------------------------------------

def load_sentencepiece_tokenizer(file: Path) -> SentencePieceTokenizer:
    model_bytes = file.read_bytes()
    try:
        return SentencePieceTokenizer(model_bytes, str(file))
    except Exception as error:  # sentencepiece raises RuntimeError/DecodeError on a corrupt model
        raise TokenizerError(f"{file}: not a SentencePiece model ({error})") from None


def tokenizer_file(source: str | os.PathLike) -> Path:
    """The file a tokenizer source names: the file itself, or a directory's `tokenizer.model`, else its
    `tokenizer.json` (SentencePiece first: Mistral directories hold both, and it keeps continuations exact)."""
    path = Path(source).expanduser()
    if path.is_dir():
        for name in ("tokenizer.model", "tokenizer.json"):
            if (path / name).is_file():
                return path / name
        raise TokenizerError(f"tokenizer: {str(path)!r} holds neither tokenizer.model nor tokenizer.json")
    if not path.is_file():
        raise TokenizerError(
            f"tokenizer file {str(path)!r} not found (give a .gguf file, a tokenizer.json, a tokenizer.model "
            "or a model directory holding one)"
        )
    return path


def load_tokenizer(source: str | os.PathLike | None = None) -> Tokenizer:
    """The tokenizer of `source`: a `.gguf` file (its metadata), a `tokenizer.json` or `tokenizer.model`
    file, or a model directory holding one; None: Mistral-7B-v0.1's SentencePiece model from the
    `mistral_common` package (checked against its known sha256). Raises `TokenizerError` naming the file."""
    if source is None:
        file = default_tokenizer_path()
        if not file.is_file():
            raise TokenizerError(f"tokenizer file {str(file)!r} not found (is mistral_common installed?)")
        tokenizer = load_sentencepiece_tokenizer(file)
        if tokenizer.sha256 != MISTRAL_7B_V01_TOKENIZER_SHA256:
            raise TokenizerError(
                f"{file}: expected Mistral-7B-v0.1's tokenizer (sha256 {MISTRAL_7B_V01_TOKENIZER_SHA256})"
            )
        return tokenizer
    file = tokenizer_file(source)
    if file.suffix == ".gguf":
        return load_gguf_tokenizer(file)
    if file.suffix == ".json":
        return load_hf_tokenizer(file)
    return load_sentencepiece_tokenizer(file)
