"""Out-of-range config values fail when the command starts, one line per key naming the allowed range,
before any model or data work."""

import pytest

from harness.config_checks import ConfigError, check_generate_config, check_train_config
from tests.harness.conftest import FAST, run_cli

BAD_VALUES = [
    ("optim.lr=-1", "optim.lr=-1.0", "> 0"),
    ("optim.lr=nan", "optim.lr=nan", "finite"),
    ("optim.lr=inf", "optim.lr=inf", "finite"),
    ("lora.alpha=nan", "lora.alpha=nan", "finite"),
    ("lora.rank=0", "lora.rank=0", ">= 1"),
    ("lora.dropout=1.0", "lora.dropout=1.0", "[0, 1)"),
    ("trainer.max_steps=0", "trainer.max_steps=0", ">= 1"),
    ("trainer.eval_every=-1", "trainer.eval_every=-1", ">= 0"),
    ("trainer.batch_size=0", "trainer.batch_size=0", ">= 1"),
    ("trainer.log_every=0", "trainer.log_every=0", ">= 1"),
    ("trainer.epochs=0", "trainer.epochs=0.0", "> 0"),
    ("optim.warmup_steps=-5", "optim.warmup_steps=-5", ">= 0"),
    ("optim.grad_accum_steps=0", "optim.grad_accum_steps=0", ">= 1"),
    ("optim.betas=[0.9,1.5]", "optim.betas=[0.9, 1.5]", "[0, 1)"),
    ("data.max_seq_len=1", "data.max_seq_len=1", ">= 16"),
    ("data.val_fraction=1.0", "data.val_fraction=1.0", "[0, 1)"),
    ("lora.target_modules=[q_proj,qkv_proj]", "lora.target_modules", "'qkv_proj'"),
    ("lora.layers=[0,7]", "lora.layers=[0, 7]", "layer 7 does not exist"),
    ("trainer.max_eval_examples=0", "trainer.max_eval_examples=0", ">= 1"),
    ("model.arch.num_key_value_heads=3", "model.arch.num_attention_heads=4", "multiple of num_key_value_heads=3"),
    ("trainer.seed=-1", "trainer.seed=-1", "[0, 4294967295]"),
    ("model.init_seed=-1", "model.init_seed=-1", "[0, 4294967295]"),
    ("data.split_seed=-1", "data.split_seed=-1", "[0, 4294967295]"),
    ("trainer.exact_match_examples=-1", "trainer.exact_match_examples=-1", ">= 0"),
    ("distributed.ranks_per_host=0", "distributed.ranks_per_host=0", ">= 1"),
    ("quant.group_size=48", "quant.group_size=48", "32, 64 or 128"),
    ("model.dtype=fp8", "model.dtype=fp8", "auto | float32 | bfloat16 | float16"),
    ("trainer.train_step=fast", "trainer.train_step=fast", "auto | standard | layerwise"),
]


@pytest.mark.parametrize("override,key,allowed", BAD_VALUES)
def test_out_of_range_value_names_the_key_and_the_range(compose_train, override, key, allowed):
    cfg = compose_train(*FAST, "model=tiny", override)
    with pytest.raises(ConfigError) as error:
        check_train_config(cfg)
    message = str(error.value)
    assert len(message.splitlines()) == 1 and message.startswith(key) and allowed in message, message


def test_the_shipped_configs_pass(compose_train):
    check_train_config(compose_train())
    check_train_config(compose_train(*FAST, "model=tiny"))
    check_train_config(compose_train("experiment=mistral7b_dolly_qlora"))


def test_generate_values_are_checked(compose_train):
    cfg = compose_train("run_dir=x", "top_p=1.5", "temperature=-1", "seed=-1", config_name="generate")
    with pytest.raises(ConfigError) as error:
        check_generate_config(cfg)
    assert [line.split("=")[0] for line in str(error.value).splitlines()] == ["temperature", "top_p", "seed"]


@pytest.mark.slow
def test_generate_and_export_report_bad_values_in_one_line_each(tmp_path, hermetic_env):
    """Before the model is loaded: no run directory is needed to be told."""
    proc = run_cli("harness.generate", "prompt=Hi", "seed=-1", env=hermetic_env, cwd=tmp_path, check=False)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    lines = [line.removeprefix("error: ") for line in proc.stderr.strip().splitlines()[-2:]]
    assert lines[0].startswith("seed=-1: must be an integer in [0, ") and lines[1].startswith("run_dir and model_dir")
    proc = run_cli(
        "harness.export", f"run_dir={tmp_path}/none", "dtype=fp8", "adapters=last", env=hermetic_env, cwd=tmp_path,
        check=False,
    )
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    lines = [line.removeprefix("error: ") for line in proc.stderr.strip().splitlines()[-2:]]
    assert lines == ["adapters=last: must be best or latest", "dtype=fp8: must be auto | float32 | bfloat16 | float16"]


@pytest.mark.slow
def test_the_command_reports_every_bad_value_in_one_line_each_before_any_work(tmp_path, hermetic_env):
    overrides = ["optim.lr=-1", "trainer.batch_size=0", "lora.alpha=nan", "trainer.log_every=0", "trainer.seed=-1",
                 "quant.group_size=7"]
    proc = run_cli(
        "harness.train", *FAST, "model=tiny", *overrides, f"hydra.run.dir={tmp_path}/run",
        env=hermetic_env, cwd=tmp_path, check=False,
    )
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    lines = proc.stderr.strip().splitlines()
    for key in ("optim.lr=-1.0", "trainer.batch_size=0", "lora.alpha=nan", "trainer.log_every=0", "trainer.seed=-1",
                "quant.group_size=7"):
        assert any(line.removeprefix("error: ").startswith(key) for line in lines), (key, lines)
    assert not (tmp_path / "run" / "run_config.yaml").exists() and not (tmp_path / "run" / "metrics.jsonl").exists()
