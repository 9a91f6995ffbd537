"""harness.bench: the FLOP count behind MFU, and an end-to-end run of the benchmark command."""

import json

import pytest

from harness.bench import flops_per_token
from models.mistral import ModelArgs

from .conftest import run_cli

SMALL = ["model=tiny", "model.arch.hidden_size=64", "model.arch.intermediate_size=128", "model.arch.num_hidden_layers=2",
         "model.arch.num_attention_heads=4", "model.arch.vocab_size=512"]


def test_flops_per_token_counts_frozen_matmuls_attention_and_adapters():
    args = ModelArgs(vocab_size=100, hidden_size=8, intermediate_size=16, num_hidden_layers=1,
                     num_attention_heads=2, num_key_value_heads=1)  # head_dim 4: q 8 wide, k/v 4 wide
    matmul_weights = 8 * 8 + 8 * 4 + 8 * 4 + 8 * 8 + 3 * 8 * 16 + 8 * 100
    attention = 3 * 2 * 1 * 8 * 10  # seq 10: QK^T and AV, causal half, forward + backward
    lora = 6 * 2 * 1 * ((8 + 8) + (16 + 8))  # rank 2 on q_proj (8 -> 8) and down_proj (16 -> 8)
    assert flops_per_token(args, 10, 2, 1, ["q_proj", "down_proj"]) == 4 * matmul_weights + attention + lora


@pytest.mark.slow
def test_bench_command_times_our_step_and_writes_json(tmp_path, hermetic_env):
    out = tmp_path / "bench.jsonl"
    proc = run_cli("harness.bench", *SMALL, "--batch", "2", "--seq", "32", "--steps", "2", "--warmup", "1",
                   "--json", str(out), env=hermetic_env, cwd=tmp_path)
    assert "tok/s" in proc.stdout and "ours" in proc.stdout
    (result,) = [json.loads(line) for line in out.read_text().splitlines()]
    assert result["stack"] == "ours" and result["trainable_params"] > 0
    assert result["tokens_per_second"] == pytest.approx(2 * 32 / result["step_seconds"])
    assert 0 < result["mfu"] < 1 and result["peak_memory_gb"] > 0



@pytest.mark.slow
def test_bench_times_an_experiment_as_it_trains(tmp_path, hermetic_env):
    """`experiment=` brings its accumulation, rank, dropout, batch size and checkpointing (hence its step)."""
    out = tmp_path / "bench.jsonl"
    run_cli("harness.bench", "experiment=mistral7b_dolly_qlora", "model=tiny", *SMALL, "--seq", "32",
            "--steps", "1", "--warmup", "1", "--json", str(out), env=hermetic_env, cwd=tmp_path)
    (result,) = [json.loads(line) for line in out.read_text().splitlines()]
    assert (result["batch"], result["grad_accum_steps"], result["lora_rank"]) == (4, 4, 16)
    assert result["lora_dropout"] == 0.05 and result["checkpointing"]
    assert result["train_step"] == "LayerwiseTrainStep"
    assert result["tokens_per_second"] == pytest.approx(4 * 32 * 4 / result["step_seconds"])


@pytest.mark.slow
def test_bench_on_dolly_lengths_counts_only_real_tokens(tmp_path, hermetic_env):
    """`--dolly-lengths`: length-sorted batches of Dolly-profile records; tokens/s over real tokens only."""
    out = tmp_path / "bench.jsonl"
    run_cli("harness.bench", *SMALL, "data.max_seq_len=128", "--batch", "2", "--dolly-lengths",
            "--steps", "2", "--json", str(out), env=hermetic_env, cwd=tmp_path)
    (result,) = [json.loads(line) for line in out.read_text().splitlines()]
    assert result["lengths"] == "dolly" and 0 < result["padding_fraction"] < 1
    assert 32 <= result["seq"] <= 128  # mean padded width of the two batches
    padded_tokens_per_second = 2 * result["seq"] / result["step_seconds"]
    assert result["tokens_per_second"] == pytest.approx(padded_tokens_per_second * (1 - result["padding_fraction"]),
                                                        rel=0.05)


def test_mlx_lm_anchor_takes_a_checkpoints_shape_from_the_file(tmp_path):
    """The default model is a GGUF file (`model.arch: null`): mlx-lm's stack builds the file's shape, read from
    its metadata (it crashed on the missing arch before)."""
    from omegaconf import OmegaConf

    from harness.mlx_lm_baseline import model_arch
    from tests.models.test_gguf import make_gguf

    path, reference = make_gguf(tmp_path / "tiny.gguf", tied=True, num_hidden_layers=3)
    arch = model_arch(OmegaConf.create({"model": {"arch": None, "path": str(path)}}))
    config = reference.config
    assert (arch["hidden_size"], arch["num_hidden_layers"], arch["num_attention_heads"], arch["vocab_size"]) == (
        config.hidden_size, config.num_hidden_layers, config.num_attention_heads, config.vocab_size)
    assert arch["tie_word_embeddings"] is True and arch["model_type"] == "llama"
    shape = OmegaConf.create({"model": {"arch": {"hidden_size": 8}, "path": None}})
    assert model_arch(shape) == {"hidden_size": 8}  # a shape's own arch, as before
