"""Load Mistral and Llama checkpoints into MLX: Hugging Face directories, Hub repos or GGUF files, one decoder
layer at a time.

A checkpoint directory holds `config.json`, the weights as one `model.safetensors` or as shards listed in
`model.safetensors.index.json`, and `tokenizer.model`. Weights are only ever read from safetensors (never
pickled `*.bin`), and no code from the checkpoint is run. A `.gguf` file (llama.cpp's format, llama
architecture) is read by `models.gguf`, which ends in the same Hugging Face names; from there both formats
take the same path (quantization, the cache).

Memory: `mx.load` on a safetensors file is lazy (a tensor is read when it is evaluated), so the loader walks
the model layer by layer, reads that layer's tensors, casts them to the compute dtype, quantizes the layer
when asked, evaluates it and lets the source arrays go. Peak memory stays near the final model's size plus
one layer in the compute dtype; the whole model is never held in float32 (or in the file's dtype). A GGUF
file is read whole by `mx.load` (MLX has no lazy GGUF reader), in its own compact types, and each block is
dequantized only when the walk reaches it.

Quantized bases can be cached with `cache_dir`: the quantized model is saved as safetensors under a key made
of the checkpoint's identity, the `QuantSpec`, the dtype and `CACHE_FORMAT_VERSION`, and reloaded later
without quantizing again.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import re
import shutil
import time
import warnings
from pathlib import Path

import mlx.core as mx
from mlx.utils import tree_flatten

from models import gguf
from models.atomic_files import atomic_save_safetensors, make_temp_dir
from models.backend import compute_dtype, dtype_name
from models.json_files import read_json_object
from models.mistral import MistralForCausalLM, ModelArgs

INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"
# What a Hub download fetches: config, safetensors weights, tokenizer. Never pickles (*.bin, *.pt) and never
# Mistral's own consolidated format, which would double the download.
DOWNLOAD_PATTERNS = (
    "config.json",
    "generation_config.json",
    "model.safetensors",
    "model-*.safetensors",
    INDEX_FILE,
    "tokenizer.model",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
)
# Buffers some exporters save beside the weights; the model recomputes them.
IGNORED_TENSOR_SUFFIXES = ("rotary_emb.inv_freq",)
# Bump when the layout of cached quantized bases changes, so stale entries are never reused.
CACHE_FORMAT_VERSION = 1
CACHE_WEIGHTS = "model.safetensors"
CACHE_META = "quantized_base.json"
_FINGERPRINT_BYTES = 1 << 16  # bytes hashed from the start and the end of each weight file
_REPO_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


class PretrainedWeightsError(ValueError):
    """A checkpoint that cannot be loaded: missing or corrupt files, wrong tensors, unreachable repo."""


# ---------------------------------------------------------------------------------------------------------
# Finding the checkpoint directory (local, or a Hugging Face Hub repo)


def resolve_model_dir(
    path_or_repo_id: str | os.PathLike, *, revision: str | None = None, progress: bool = True
) -> Path:
    """Where a checkpoint is: `path_or_repo_id` itself when it is a directory or a `.gguf` file, else the
    directory of the Hugging Face Hub snapshot of that repo id (downloaded into the HF cache unless there).

    Raises `PretrainedWeightsError` when the path does not exist and is not a repo id, or when the repo cannot be
    fetched (offline and not cached, gated, not found).
    """
    path = Path(path_or_repo_id).expanduser()
    if path.is_dir() or (path.is_file() and is_gguf(path)):
        return path
    if path.exists():
        raise PretrainedWeightsError(
            f"{path} is a file; pass the checkpoint directory that holds config.json, or a .gguf file"
        )
    repo_id = str(path_or_repo_id)
    if not _REPO_ID.match(repo_id):
        raise PretrainedWeightsError(f"{repo_id}: no such directory, and not a Hugging Face repo id (owner/name)")
    return _snapshot(repo_id, revision=revision, local_dir=None, progress=progress)


def download_model(
    repo_id: str,
    local_dir: str | os.PathLike | None = None,
    *,
    revision: str | None = None,
    progress: bool = True,
) -> Path:
    """Download a Hub checkpoint's config, safetensors weights and tokenizer; return its directory.

    With `local_dir` the files are written there (a plain directory to pass to `load_pretrained`); without it
    they go to the Hugging Face cache (`HF_HOME`). Pickled weights are never downloaded.
    """
    if not _REPO_ID.match(repo_id):
        raise PretrainedWeightsError(f"{repo_id!r} is not a Hugging Face repo id (owner/name)")
    return _snapshot(repo_id, revision=revision, local_dir=local_dir, progress=progress)


def _snapshot(repo_id: str, *, revision: str | None, local_dir, progress: bool) -> Path:
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import GatedRepoError, LocalEntryNotFoundError, RepositoryNotFoundError
    from tqdm.auto import tqdm

    class _Quiet(tqdm):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **{**kwargs, "disable": True})

    try:
        path = snapshot_download(
            repo_id,
            revision=revision,
            local_dir=local_dir,
            allow_patterns=list(DOWNLOAD_PATTERNS),
            **({} if progress else {"tqdm_class": _Quiet}),
        )
    except GatedRepoError as err:
        raise PretrainedWeightsError(
            f"{repo_id} is gated: accept its license on https://huggingface.co/{repo_id} and log in "
            f"(`hf auth login` or HF_TOKEN)"
        ) from err
    except RepositoryNotFoundError as err:
        raise PretrainedWeightsError(f"{repo_id}: no such repo on the Hugging Face Hub (or it is private)") from err
    except LocalEntryNotFoundError as err:
        from huggingface_hub import constants

        offline = constants.is_offline_mode()
        why = "HF_HUB_OFFLINE=1 is set" if offline else "the Hugging Face Hub could not be reached"
        raise PretrainedWeightsError(
            f"{repo_id} is not in the local Hugging Face cache and {why}. Download it once while online "
            f"(`qlora-download`, or `models.loading.download_model({repo_id!r}, <dir>)`) and pass that "
            f"directory, or unset HF_HUB_OFFLINE."
        ) from err
    return Path(path)


# ---------------------------------------------------------------------------------------------------------
# Reading a checkpoint directory


def checkpoint_args(model_path: str | Path) -> ModelArgs:
    """`ModelArgs` of a local checkpoint: a directory's `config.json`, or a `.gguf` file's metadata (its header
    only, no tensor read). Errors name the file."""
    model_path = Path(model_path)
    if is_gguf(model_path):
        return _gguf_call(gguf.model_args, _gguf_call(gguf.read_header, model_path))
    return read_model_args(model_path)


def read_model_args(model_dir: Path) -> ModelArgs:
    """`ModelArgs` from `model_dir/config.json`; errors name the file (and the line for broken JSON)."""
    config_path = model_dir / "config.json"
    if not config_path.is_file():
        raise PretrainedWeightsError(f"{config_path}: missing; a checkpoint directory needs config.json")
    config = read_json_object(config_path, PretrainedWeightsError, "a model config")
    return ModelArgs.from_hf_config(config, source=str(config_path))


def is_gguf(path: Path) -> bool:
    return path.suffix.lower() == ".gguf"


def _gguf_call(function, *args):
    """Run a `models.gguf` reader; its errors become `PretrainedWeightsError`s (they already name the file)."""
    try:
        return function(*args)
    except gguf.GGUFError as err:
        raise PretrainedWeightsError(str(err)) from None


def weight_map(model_dir: Path) -> dict[str, Path]:
    """Tensor name -> the safetensors file that holds it, from the index or the single weights file."""
    index_path = model_dir / INDEX_FILE
    if index_path.is_file():
        names = read_json_object(index_path, PretrainedWeightsError, "a weights index").get("weight_map")
        if not isinstance(names, dict):
            raise PretrainedWeightsError(f"{index_path}: no 'weight_map' object")
        files = {name: model_dir / shard for name, shard in names.items()}
        missing = sorted({path.name for path in files.values() if not path.is_file()})
        if missing:
            raise PretrainedWeightsError(
                f"{model_dir}: shard {', '.join(missing)} listed in {INDEX_FILE} is missing "
                f"(incomplete download? fetch the checkpoint again)"
            )
        return files
    single = model_dir / SINGLE_FILE
    if single.is_file():
        return {name: single for name in _open_safetensors(single)}
    pickles = sorted(p.name for p in model_dir.iterdir() if p.suffix in (".bin", ".pt", ".pth"))
    hint = (
        f" (found {', '.join(pickles)}: pickled weights are not loaded, convert them to safetensors)"
        if pickles
        else ""
    )
    raise PretrainedWeightsError(f"{model_dir}: no {SINGLE_FILE} and no {INDEX_FILE}{hint}")


def _open_safetensors(path: Path) -> dict[str, mx.array]:
    """Lazily open a safetensors file (no tensor data is read); errors name the file."""
    try:
        return mx.load(str(path), format="safetensors")
    except (RuntimeError, ValueError, OSError) as err:
        raise PretrainedWeightsError(
            f"{path}: not a readable safetensors file, probably truncated or corrupt ({err}); download it again"
        ) from err


def _open_tensors(files: dict[str, Path]) -> dict[str, mx.array]:
    """Tensor name -> lazy array, for every name in `files`; checks each file holds what the index says."""
    opened: dict[Path, dict[str, mx.array]] = {}
    tensors = {}
    for name, path in files.items():
        if path not in opened:
            opened[path] = _open_safetensors(path)
        try:
            tensors[name] = opened[path][name]
        except KeyError:
            raise PretrainedWeightsError(
                f"{path}: has no tensor {name!r}, though {INDEX_FILE} says it does"
            ) from None
    return tensors


def _check_tensors(
    model_dir: Path,
    tensors: dict[str, mx.array],
    files: dict[str, Path],
    expected: dict[str, tuple[int, ...]],
    config_name: str = "config.json",
) -> None:
    """Raise `PretrainedWeightsError` for missing, unexpected, misshapen or non-float tensors, before reading data.

    `config_name` says, in the messages, what described the model (config.json, or a GGUF file's metadata).
    """
    extra = sorted(k for k in tensors.keys() - expected.keys() if not _ignored(k, expected))
    missing = sorted(expected.keys() - tensors.keys())
    if missing:
        raise PretrainedWeightsError(
            f"{model_dir}: {len(missing)} tensors that {config_name} implies are missing from the weights: "
            f"{_some(missing)}"
        )
    if extra:
        where = sorted({files[k].name for k in extra})
        raise PretrainedWeightsError(
            f"{model_dir}: {len(extra)} unexpected tensors in {', '.join(where)}, not part of the model "
            f"{config_name} describes: {_some(extra)}"
        )
    for name, shape in expected.items():
        found = tuple(tensors[name].shape)
        if found != shape:
            raise PretrainedWeightsError(
                f"{files[name]}: tensor {name} has shape {found}, but {config_name} implies {shape}"
            )
        if not mx.issubdtype(tensors[name].dtype, mx.floating):
            raise PretrainedWeightsError(
                f"{files[name]}: tensor {name} is {tensors[name].dtype}; expected float weights "
                f"(pre-quantized checkpoints are not supported, load the full-precision one)"
            )


def _ignored(name: str, expected) -> bool:
    """Tensors a checkpoint may carry that the model rebuilds: RoPE buffers, a tied lm_head's copy."""
    return name.endswith(IGNORED_TENSOR_SUFFIXES) or (
        name == "lm_head.weight" and "lm_head.weight" not in expected
    )


def _some(names: list[str], limit: int = 5) -> str:
    return ", ".join(names[:limit]) + (f", … ({len(names) - limit} more)" if len(names) > limit else "")


# ---------------------------------------------------------------------------------------------------------
# Loading


def load_pretrained(
    path_or_repo_id: str | os.PathLike,
    *,
    dtype: mx.Dtype | str | None = None,
    quant=None,
    cache_dir: str | os.PathLike | None = None,
    progress: bool = True,
    revision: str | None = None,
) -> MistralForCausalLM:
    """Load a Mistral or Llama checkpoint as an MLX `MistralForCausalLM`.

    path_or_repo_id: a local checkpoint directory, a Hub repo id such as "mistralai/Mistral-7B-v0.1", or a
        `.gguf` file (llama architecture; tensors F32, F16, BF16, Q4_0, Q4_1 or Q8_0, dequantized to float
        before `quant` applies).
    dtype: compute dtype of every dense parameter (None / "auto": `models.backend.compute_dtype("auto")`).
    quant: a `models.quant.QuantSpec`; its decoder projections are quantized layer by layer while loading.
        None (or method "none") keeps full precision.
    cache_dir: where quantized bases are cached; a later call with the same checkpoint, spec and dtype
        reloads the cached base instead of quantizing again.
    Returns the model, evaluated, in inference mode (`model.eval()`).
    """
    dtype = compute_dtype(dtype) if dtype is None or isinstance(dtype, str) else dtype
    quant = quant if quant is not None and quant.enabled else None
    model_dir = resolve_model_dir(path_or_repo_id, revision=revision, progress=progress)
    if is_gguf(model_dir):
        header = _gguf_call(gguf.read_header, model_dir)
        args = _gguf_call(gguf.model_args, header)
        files = {name: model_dir for name in header.tensors}
    else:
        args = read_model_args(model_dir)
        files = weight_map(model_dir)

    cache_path = None
    if quant is not None and cache_dir is not None:
        key = cache_key(model_dir, files, quant, dtype, args)
        name = model_dir.stem if is_gguf(model_dir) else model_dir.name  # a directory's "v0.1" is no suffix
        cache_path = Path(cache_dir) / f"{name}-{quant.method}{quant.bits}-{dtype_name(dtype)}-{key[:16]}"
        model = _load_cached(cache_path, key, args, quant)
        if model is not None:
            return model

    if is_gguf(model_dir):
        tensors = _gguf_call(gguf.read_tensors, header, args)
        files, config_name = dict.fromkeys(tensors, model_dir), "its GGUF metadata"
    else:
        tensors, config_name = _open_tensors(files), "config.json"
    model = MistralForCausalLM(args)  # parameters are lazy: never evaluated, replaced below
    expected = {name: tuple(value.shape) for name, value in tree_flatten(model.parameters())}
    _check_tensors(model_dir, tensors, files, expected, config_name)
    _fill(model, tensors, dtype, quant, desc=f"load {model_dir.name}", progress=progress)
    if cache_path is not None:
        _save_cached(model, cache_path, key, model_dir, quant, dtype)
    return model.eval()


def _fill(
    model: MistralForCausalLM, tensors: dict[str, mx.array], dtype, quant, desc: str, progress: bool
) -> None:
    """Move checkpoint tensors into `model` one block at a time, quantizing each decoder layer after it loads."""
    from tqdm.auto import tqdm

    from models import quant as quantization

    def take(module, prefix: str) -> None:
        # pop() so that no reference to a read tensor outlives its block: the file's bytes can be freed.
        weights = [
            (name[len(prefix) :], tensors.pop(name).astype(dtype))
            for name in list(tensors)
            if name.startswith(prefix)
        ]
        module.load_weights(weights, strict=False)

    blocks = [(f"model.layers.{i}.", layer) for i, layer in enumerate(model.model.layers)]
    blocks = [("model.embed_tokens.", model.model.embed_tokens), *blocks, ("model.norm.", model.model.norm)]
    if "lm_head" in model:
        blocks.append(("lm_head.", model.lm_head))
    suffix = f" + quantize {quant.method}" if quant is not None else ""
    for prefix, module in tqdm(blocks, desc=desc + suffix, unit="block", disable=not progress):
        take(module, prefix)
        if quant is not None and prefix.startswith("model.layers."):
            # One projection per call (each call evaluates): the quantization temporaries of the seven
            # projections never coexist. On 7B NF4 this lowers the peak by ~1.4 GB.
            for name in quant.modules:
                quantization.quantize_layer(module, dataclasses.replace(quant, modules=(name,)))
        mx.eval(module.parameters())
        mx.clear_cache()  # return the block's freed buffers, so RSS tracks what the model holds
    if quant is not None and (quant.quantize_embeddings or quant.quantize_lm_head):
        quantization.quantize_model(model, quant)  # layers are already quantized: only embeddings / lm_head
        mx.clear_cache()


# ---------------------------------------------------------------------------------------------------------
# The cache of quantized bases


def cache_key(model_dir: Path, files: dict[str, Path], quant, dtype, args: ModelArgs) -> str:
    """Hex digest identifying (checkpoint, quant spec, dtype, cache format).

    The checkpoint's identity is its `ModelArgs`, the index, and each weight file's name, size and a hash of
    its first and last 64 KiB (the header with every name, shape and offset, and samples of the data): cheap
    to compute for a 14 GB checkpoint, and changed by any re-export of it. `model_dir` is a directory, or
    the `.gguf` file itself.
    """
    digest = hashlib.sha256()
    identity = {
        "format": CACHE_FORMAT_VERSION,
        "config": dataclasses.asdict(args),
        "quant": quant.to_dict(),
        "dtype": dtype_name(dtype),
        "files": [_file_fingerprint(path) for path in sorted(set(files.values()))],
    }
    if model_dir.is_dir() and (model_dir / INDEX_FILE).is_file():
        identity["index"] = hashlib.sha256((model_dir / INDEX_FILE).read_bytes()).hexdigest()
    digest.update(json.dumps(identity, sort_keys=True).encode())
    return digest.hexdigest()


def _file_fingerprint(path: Path) -> dict:
    size = path.stat().st_size
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        digest.update(f.read(_FINGERPRINT_BYTES))
        f.seek(max(0, size - _FINGERPRINT_BYTES))
        digest.update(f.read(_FINGERPRINT_BYTES))
    return {"name": path.name, "size": size, "sha256_head_tail": digest.hexdigest()}


def _load_cached(cache_path: Path, key: str, args: ModelArgs, quant) -> MistralForCausalLM | None:
    """The cached quantized base at `cache_path`, or None when there is none or it is unusable (warns)."""
    meta_path, weights_path = cache_path / CACHE_META, cache_path / CACHE_WEIGHTS
    if not meta_path.is_file():
        return None
    from models.quant import quantized_shell

    try:
        meta = json.loads(meta_path.read_text())
        if meta.get("key") != key:
            raise PretrainedWeightsError(f"{meta_path}: key {meta.get('key')!r} does not match {key!r}")
        model = MistralForCausalLM(args)
        quantized_shell(model, quant)
        model.load_weights(str(weights_path), strict=True)
        mx.eval(model.parameters())
        # Bytes overwritten under an intact header load without complaint; NaN scales would train as NaN.
        for name, value in tree_flatten(model.parameters()):
            if mx.issubdtype(value.dtype, mx.inexact) and not mx.all(mx.isfinite(value)).item():
                raise PretrainedWeightsError(f"{weights_path}: tensor {name!r} holds NaN or inf values")
    except (OSError, RuntimeError, ValueError) as err:
        warnings.warn(
            f"ignoring unusable quantized-base cache {cache_path} ({err}); quantizing again", stacklevel=3
        )
        shutil.rmtree(cache_path, ignore_errors=True)
        return None
    return model.eval()


def _save_cached(model, cache_path: Path, key: str, model_dir: Path, quant, dtype) -> None:
    """Write the quantized base atomically: into a temporary directory renamed into place when complete."""
    cache_path.parent.mkdir(parents=True, exist_ok=True)
    tmp = make_temp_dir(cache_path.parent, f".{cache_path.name}.")
    try:
        atomic_save_safetensors(tmp / CACHE_WEIGHTS, dict(tree_flatten(model.parameters())))
        meta = {
            "key": key,
            "format": CACHE_FORMAT_VERSION,
            "source": str(model_dir.resolve()),
            "quant": quant.to_dict(),
            "dtype": dtype_name(dtype),
            "mlx": mx.__version__,
            "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        }
        (tmp / CACHE_META).write_text(json.dumps(meta, indent=2) + "\n", encoding="utf-8")
        shutil.rmtree(cache_path, ignore_errors=True)  # an unusable entry left by a failed reload
        os.replace(tmp, cache_path)
    except OSError:
        if cache_path.is_dir():  # another process wrote the same entry first
            return
        raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
