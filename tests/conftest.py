"""Shared fixtures. `models` is imported first so the fast BLAS is loaded before MLX (see models/blas.py)."""

import os

# Float32 matmuls stay float32 (newer Macs default to TF32, `MLX_ENABLE_TF32=1`): tests compare float32 results
# with tight tolerances. Set before MLX is imported, and inherited by the commands tests start.
os.environ.setdefault("MLX_ENABLE_TF32", "0")

import models  # noqa: E402,F401  (must come before anything that imports mlx)
import shutil
import tempfile
from pathlib import Path

import mlx.core as mx
import pytest
from hypothesis import settings

# Hermetic: Hypothesis keeps no example database, and its other files go to a temporary directory, not into
# `.hypothesis/` in the checkout.
os.environ.setdefault("HYPOTHESIS_STORAGE_DIRECTORY", tempfile.mkdtemp(prefix="hypothesis-"))
settings.register_profile("hermetic", database=None)
settings.load_profile("hermetic")

# MLX reads its evaluation order (MLX_BFS_MAX_WIDTH) once per process, at its first evaluation. Evaluating once now
# fixes MLX's default order in every test process, whatever a test's CPU streams later set: a wide order defeats
# `mx.checkpoint`, so memory measured in-process would depend on which test a worker ran first. Tests of the wide
# order start processes of their own.
mx.eval(mx.array(0) + 1)


@pytest.fixture(autouse=True)
def _restore_cpu_stream_settings():
    """Training in-process may set the BLAS's threads and MLX's evaluation order for its CPU streams
    (harness/step/cpu_streams.py): undo both, so no test (or subprocess it starts) inherits them."""
    from models import blas

    threads = blas.blas_threads()
    order = os.environ.get("MLX_BFS_MAX_WIDTH")
    yield
    if threads is not None:
        blas.set_blas_threads(threads)
    if order is None:
        os.environ.pop("MLX_BFS_MAX_WIDTH", None)
    else:
        os.environ["MLX_BFS_MAX_WIDTH"] = order


# Hermetic: no test may reach the network or a real W&B account.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("WANDB_MODE", "offline")

# A Mistral small enough for CPU tests, with GQA (4 query heads share 2 key/value heads) and a sliding
# window short enough that test sequences exceed it. The vocabulary matches the real Mistral-7B tokenizer
# shipped with the checkpoint, so encoded text can be fed to the model.
TINY_MISTRAL_CONFIG = dict(
    vocab_size=32000,
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=16,
    max_position_embeddings=512,
    sliding_window=16,
    rms_norm_eps=1e-5,
    rope_theta=10000.0,
    tie_word_embeddings=False,
)


def mistral_tokenizer_path() -> Path:
    """The real Mistral-7B-v0.1 `tokenizer.model` that `mistral_common` ships (vocabulary of 32000)."""
    from models.tokenizer import default_tokenizer_path

    return default_tokenizer_path()


def random_hf_model(config, seed: int = 0):
    """A `transformers` causal LM for `config` (MistralConfig, LlamaConfig) with random weights, drawn with a
    larger spread than transformers' init (std 0.1, RMSNorm weights around 1) so that logits vary enough for
    numerical comparisons to mean something."""
    import torch
    import transformers

    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(config).eval()
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("norm.weight"):
                param.uniform_(0.5, 1.5)
            else:
                param.normal_(0.0, 0.1)
    return model


def write_hf_mistral(
    out_dir: Path,
    *,
    seed: int = 0,
    max_shard_size: str | None = None,
    tokenizer: bool = True,
    **config_overrides,
) -> Path:
    """Write a random-weight `transformers.MistralForCausalLM` (`random_hf_model`) with `save_pretrained`
    into `out_dir`. `max_shard_size` (e.g. "100KB") splits the safetensors into shards with
    `model.safetensors.index.json`. Returns `out_dir`.
    """
    import transformers

    model = random_hf_model(transformers.MistralConfig(**{**TINY_MISTRAL_CONFIG, **config_overrides}), seed)
    kwargs = {} if max_shard_size is None else {"max_shard_size": max_shard_size}
    model.save_pretrained(out_dir, **kwargs)
    if tokenizer:
        shutil.copyfile(mistral_tokenizer_path(), Path(out_dir) / "tokenizer.model")
    return Path(out_dir)


def write_hf_llama(out_dir: Path, *, seed: int = 0, **config_overrides) -> Path:
    """Write a random-weight `transformers.LlamaForCausalLM` (`random_hf_model`) with `save_pretrained` into
    `out_dir`; the tiny Mistral's shape without its sliding window. Returns `out_dir`."""
    import transformers

    config = {k: v for k, v in TINY_MISTRAL_CONFIG.items() if k != "sliding_window"}
    random_hf_model(transformers.LlamaConfig(**{**config, **config_overrides}), seed).save_pretrained(out_dir)
    return Path(out_dir)


# The real SmolLM2-135M-Instruct GGUF where `python -m harness.download model=smollm2-135m` puts it. Read at
# import, before any hermetic fixture points QLORA_CACHE_DIR at a temporary directory.
_MODEL_CACHE = Path(os.environ.get("QLORA_CACHE_DIR") or Path.home() / ".cache" / "mistral-dolly-qlora")
SMOLLM2_GGUF = _MODEL_CACHE / "models" / "smollm2-135m" / "SmolLM2-135M-Instruct.Q4_1.gguf"


def smollm2_gguf() -> Path:
    """The real SmolLM2-135M-Instruct GGUF file; skips the calling test when it has not been downloaded."""
    if not SMOLLM2_GGUF.is_file():
        pytest.skip(
            f"{SMOLLM2_GGUF} is absent: run `python -m harness.download model=smollm2-135m` "
            f"(or set QLORA_CACHE_DIR to where it is) to run the tests on the real model"
        )
    return SMOLLM2_GGUF


def smollm2_gguf_path() -> Path | None:
    """The real SmolLM2-135M-Instruct GGUF, or None when it has not been downloaded."""
    return SMOLLM2_GGUF if SMOLLM2_GGUF.is_file() else None


@pytest.fixture
def make_mistral_checkpoint(tmp_path):
    """Factory: `make_mistral_checkpoint(name="ckpt", **write_hf_mistral kwargs) -> Path` under tmp_path."""

    def make(name: str = "ckpt", **kwargs) -> Path:
        return write_hf_mistral(tmp_path / name, **kwargs)

    return make


@pytest.fixture
def tiny_mistral_dir(make_mistral_checkpoint) -> Path:
    """A tiny random-weight Hugging Face Mistral checkpoint directory (config.json, model.safetensors,
    tokenizer.model), written by `transformers` into tmp_path."""
    return make_mistral_checkpoint("tiny-mistral")
