"""Training-step benchmark: our stack beside mlx-lm's trainer on the identical shape, in the same run.

    python -m harness.bench                                   # the default run's step: tiny shape, 8 x 256
    python -m harness.bench model=mistral-7b-shape --batch 8 --seq 512 --compare-mlx-lm
    python -m harness.bench experiment=mistral7b_dolly_qlora model=mistral-7b-shape   # the flagship as shipped
    python -m harness.launch -n 2 --backend nccl -- -m harness.bench model=mistral-7b-shape --batch 8 --seq 512
    python -m harness.bench model=smollm2-135m-shape --batch 8 --dolly-lengths --compare-mlx-lm   # real lengths

Overrides are Hydra overrides of the training config (`conf/train.yaml`), so the benchmark builds the model,
quantization, LoRA (rank, dropout) and optimizer exactly as `harness.train` does, and times the trainer's own
step (`harness.step.factory.configured_train_step`) over whole optimizer steps: `--accum` micro-batches of
`--batch` x `--seq` each, by default the config's `optim.grad_accum_steps`, `trainer.batch_size` and
`data.max_seq_len`, so `experiment=...` times what that experiment runs. Each stack runs in a fresh process so its peak memory and time
to first step are its own. Reported per stack: median seconds per optimizer step after warm-up (every step
synchronized as its trainer synchronizes it: ours on the loss, tokens and norm, as `harness.loop` does, the update
then run as the next step reaches it; mlx-lm on its whole state, as its trainer does), tokens/s, model FLOP
utilisation against a matmul rate measured in the same run, the peak memory over the whole optimizer steps (all
micro-batches), time to first step.
Under a distributed launcher (`harness.launch`) the step is the data-parallel one (`harness.distributed`): each
rank takes `--batch` rows of every global micro-batch of `--batch` x ranks rows, tokens/s count all ranks' tokens,
MFU is per device, and rank 0 reports.

`--dolly-lengths` trains instead on `--steps` length-sorted batches of Dolly-profile records
(`harness.bench_lengths`), each stack batching the same records its own way (ours as `harness.train` does,
mlx-lm with its trainer's `iterate_batches`): one untimed pass over the batches (compiling each width), then
one timed pass; tokens/s counts real (non-padding) tokens over the timed pass's total time.
"""

from __future__ import annotations

import time

_PROCESS_START = time.perf_counter()

import argparse  # noqa: E402
import json  # noqa: E402
import platform  # noqa: E402
import statistics  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
from dataclasses import asdict, dataclass  # noqa: E402
from pathlib import Path  # noqa: E402

import models  # noqa: E402,F401  (loads the fast BLAS before MLX)
import mlx.core as mx  # noqa: E402

from harness.bench_timing import build_peak_then_reset, synthetic_tokens, timed_runs  # noqa: E402
from harness.step.cpu_streams import cpu_cores  # noqa: E402
from harness.distributed import launched_rank  # noqa: E402
from models import blas  # noqa: E402
from models.backend import backend_name, compute_dtype, describe  # noqa: E402
from models.mistral import ModelArgs  # noqa: E402

CONF_DIR = Path(__file__).resolve().parent.parent / "conf"


@dataclass
class Result:
    stack: str
    shape: str
    batch: int
    seq: int
    checkpointing: bool
    quant: str
    trainable_params: int
    step_seconds: float
    tokens_per_second: float
    tflops_per_second: float  # model FLOPs (4N + attention + LoRA per token) / step time
    matmul_tflops: float  # dense matmul rate of this device in the compute dtype, measured in this run (ours: before
    # and after the timed steps, averaged)
    mfu: float
    peak_memory_gb: float  # during the training steps (warm-up and compilation included)
    first_step_seconds: float  # process start -> end of the first training step (build, compile included)
    device: str
    dtype: str
    streams: int = 1  # CPU streams sharing each batch's rows (harness/step/cpu_streams.py)
    build_peak_memory_gb: float = float("nan")  # building (and quantizing) the model, before the first step
    grad_accum_steps: int = 1  # micro-batches of batch x seq in each timed optimizer step
    lora_rank: int = 0
    lora_dropout: float = 0.0
    train_step: str = ""  # the step class the trainer chose (TrainStep, LayerwiseTrainStep)
    ranks: int = 1  # data-parallel ranks; `batch` is rows per rank, tokens/s count every rank's tokens
    lengths: str = "fixed"  # "fixed": batch x seq every step; "dolly": length-sorted Dolly-profile batches
    padding_fraction: float = 0.0  # padding tokens / all tokens of the timed steps


def compose(overrides: list[str]):
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    import harness.schema  # noqa: F401  (registers the structured configs)

    with initialize_config_dir(config_dir=str(CONF_DIR)):
        return hydra_compose(config_name="train", overrides=overrides)


def flops_per_token(args: ModelArgs, seq: int, lora_rank: int, lora_layers: int, lora_modules: list[str]) -> float:
    """Model FLOPs of one LoRA training token: 4N for the frozen matmuls (forward, and backward to the
    activations; no weight gradients), causal attention forward+backward, and the adapters (6 r (in + out))."""
    q_dim, kv_dim = args.num_attention_heads * args.head_dim, args.num_key_value_heads * args.head_dim
    shapes = {
        "q_proj": (args.hidden_size, q_dim), "k_proj": (args.hidden_size, kv_dim),
        "v_proj": (args.hidden_size, kv_dim), "o_proj": (q_dim, args.hidden_size),
        "gate_proj": (args.hidden_size, args.intermediate_size),
        "up_proj": (args.hidden_size, args.intermediate_size),
        "down_proj": (args.intermediate_size, args.hidden_size),
    }
    layer_params = sum(i * o for i, o in shapes.values())
    n = args.num_hidden_layers * layer_params + args.hidden_size * args.vocab_size
    attention = 3 * 2 * args.num_hidden_layers * q_dim * seq  # QK^T and AV, causal (half), fwd + 2x bwd
    lora = 6 * lora_rank * lora_layers * sum(sum(shapes[m]) for m in lora_modules)
    return 4 * n + attention + lora


def matmul_tflops(dtype: mx.Dtype) -> float:
    """Dense matmul rate (TFLOP/s) of the default device in `dtype`, median of a few synchronized runs."""
    size = 2048 if backend_name() == "cpu" else 8192
    a = mx.random.normal((size, size)).astype(dtype)
    b = mx.random.normal((size, size)).astype(dtype)
    mx.eval(a, b)
    with blas.blas_threads_within(cpu_cores()):  # every core, whatever the training step used
        times = timed_runs(lambda: mx.eval(a @ b), warmup=1, repeat=3 if backend_name() == "cpu" else 10)
    return 2 * size**3 / statistics.median(times) / 1e12


def make_result(stack, cfg, args, batch, seq, ckpt, trainable, times, first_step, dtype, quant: str,
                streams: int = 1, build_peak: float = float("nan"), accum: int = 1, train_step: str = "",
                ranks: int = 1, real_tokens: int | None = None, padding: float = 0.0,
                ceiling_before: float | None = None) -> Result:
    """A `Result` from the optimizer-step times of one stack (`accum` micro-batches of batch x seq each on each
    of `ranks` ranks), with FLOPs and the matmul ceiling measured now (and averaged with `ceiling_before`, the
    one measured right before the timed steps, when given: a CPU's clocks drift). `real_tokens`: with batches of
    real lengths (`seq` their mean width), the non-padding tokens of all timed steps; tokens/s is then those over
    the steps' total time."""
    step = statistics.median(times)
    tokens = batch * seq * accum * ranks
    if real_tokens is not None:
        step, tokens = statistics.fmean(times), real_tokens / len(times)
    lora_layers = len(cfg.lora.layers) if cfg.lora.layers is not None else args.num_hidden_layers
    flops = flops_per_token(args, seq, cfg.lora.rank, lora_layers, list(cfg.lora.target_modules))
    achieved = flops * tokens / step / 1e12
    ceiling = matmul_tflops(compute_dtype("auto"))  # the device's best dense rate, the same for every stack
    if ceiling_before is not None:
        ceiling = (ceiling + ceiling_before) / 2
    return Result(
        stack=stack, shape=cfg.model.name, batch=batch, seq=seq, checkpointing=ckpt,
        quant=quant, trainable_params=trainable, step_seconds=step,
        tokens_per_second=tokens / step, tflops_per_second=achieved, matmul_tflops=ceiling,
        mfu=achieved / (ceiling * ranks), peak_memory_gb=mx.get_peak_memory() / 1e9, first_step_seconds=first_step,
        device=describe()["device"] + f" ({platform.processor() or platform.machine()})",
        dtype=str(dtype).replace("mlx.core.", ""), streams=streams, build_peak_memory_gb=build_peak,
        grad_accum_steps=accum, lora_rank=cfg.lora.rank, lora_dropout=cfg.lora.dropout, train_step=train_step,
        ranks=ranks,
        lengths="fixed" if real_tokens is None else "dolly", padding_fraction=padding,
    )


def dolly_batches(cfg, batch: int, count: int, vocab_size: int) -> list[dict]:
    """`count` length-sorted batches of `batch` Dolly-profile records each, as training batches them."""
    from harness.bench_lengths import dolly_profile_examples, length_sorted_batches

    examples = dolly_profile_examples(cfg, batch * count, vocab_size)
    return [{k: mx.array(v) for k, v in b.items()} for b in length_sorted_batches(examples, batch, cfg.data)]


def bench_ours(cfg, batch: int, seq: int, steps: int, warmup: int, accum: int = 1,
               dolly_lengths: bool = False) -> Result:
    """Time the trainer's step (`harness.step.factory.configured_train_step`) on the model `harness.build`
    makes from `cfg`: optimizer steps of `accum` micro-batches (different tokens each) of `batch` x `seq`; with
    `dolly_lengths`, `steps` steps of one length-sorted Dolly-profile batch each (module docstring)."""
    from harness.build import build_model, build_optimizer
    from harness.distributed import world
    from harness.process import set_up_process
    from harness.step.factory import configured_train_step
    from harness.step.run import run_train_step
    from models.lora import trainable_parameter_count

    # Before the model is built: memory policy; the streams' plan may set MLX's evaluation order (read once).
    streams, _ = set_up_process(cfg.trainer, batch_size=batch)
    model = build_model(cfg, progress=False)
    optimizer = build_optimizer(cfg.optim, model, total_steps=steps + warmup)
    step = configured_train_step(model, optimizer, cfg, streams=streams, micro_batch_tokens=batch * seq)
    ranks = world()  # several under a distributed launcher: the step takes this rank's rows of each global batch
    if dolly_lengths:
        accum = 1
        steps_batches = [[b] for b in dolly_batches(cfg, batch * ranks.size, steps, model.args.vocab_size)]
    else:
        micro_batches = []
        for index in range(accum):
            tokens = synthetic_tokens(batch * ranks.size, seq, model.args.vocab_size, seed=index)
            micro_batches.append({"input_ids": tokens, "labels": tokens, "attention_mask": mx.ones_like(tokens)})
        steps_batches = [micro_batches]
    model.train()
    build_peak = build_peak_then_reset(model.parameters(), optimizer.state, steps_batches)
    steps_run = 0

    def run():
        nonlocal steps_run
        mx.random.seed(cfg.trainer.seed * 1_000_003 + steps_run)  # dropout keyed by (seed, step), as in training
        micro_batches = steps_batches[steps_run % len(steps_batches)]
        steps_run += 1
        run_train_step(step, micro_batches)  # evaluated as the training loop evaluates it

    run()
    first_step = time.perf_counter() - _PROCESS_START
    ceiling_before = matmul_tflops(compute_dtype("auto"))
    real_tokens = padding = None
    if dolly_lengths:  # the rest of an untimed pass (one compilation per width), then one timed pass
        times = timed_runs(run, warmup=len(steps_batches) - 1, repeat=len(steps_batches))
        real_tokens = sum(int(b[0]["attention_mask"].sum()) for b in steps_batches)
        total = sum(b[0]["input_ids"].size for b in steps_batches)
        seq, padding = round(total / batch / len(steps_batches)), 1 - real_tokens / total
    else:
        times = timed_runs(run, warmup=max(warmup - 1, 0), repeat=steps)
    return make_result("ours", cfg, model.args, batch, seq, cfg.trainer.gradient_checkpointing,
                   trainable_parameter_count(model), times, first_step, compute_dtype(cfg.model.dtype),
                   f"{cfg.quant.method}{cfg.quant.bits if cfg.quant.method != 'none' else ''}", streams, build_peak,
                   accum=accum, train_step=type(step).__name__, ranks=ranks.size, real_tokens=real_tokens,
                   padding=padding or 0.0, ceiling_before=ceiling_before)


def stack_command(stack: str, overrides: list[str], options: argparse.Namespace) -> list[str]:
    """The command line that times one stack in a child process."""
    sizes = [f"--{name}={value}" for name in ("batch", "seq", "accum")
             if (value := getattr(options, name)) is not None]
    return [sys.executable, "-m", "harness.bench", "--stack", stack, *sizes, "--steps", str(options.steps),
            "--warmup", str(options.warmup), *(["--checkpointing"] if options.checkpointing else []),
            *(["--dolly-lengths"] if options.dolly_lengths else []), *overrides]


def run_stack(stack: str, overrides: list[str], options: argparse.Namespace) -> dict | None:
    """Run one stack in a fresh process; returns its result, or None (with the error shown) if it failed."""
    proc = subprocess.run(stack_command(stack, overrides, options), capture_output=True, text=True)
    for line in proc.stdout.splitlines():
        if line.startswith("RESULT "):
            return json.loads(line[len("RESULT "):])
    sys.stderr.write(f"{stack} failed (exit {proc.returncode}):\n{proc.stderr[-4000:]}\n")
    return None


def print_table(results: list[dict]) -> None:
    columns = [("stack", "{}"), ("shape", "{}"), ("ranks", "{}"), ("batch", "{}"), ("seq", "{}"),
               ("grad_accum_steps", "{}"),
               ("checkpointing", "{}"), ("lora_rank", "{}"), ("lora_dropout", "{:g}"), ("train_step", "{}"),
               ("quant", "{}"), ("dtype", "{}"), ("streams", "{}"), ("lengths", "{}"), ("padding_fraction", "{:.0%}"),
               ("tokens_per_second", "{:,.0f}"),
               ("step_seconds", "{:.3f}"), ("tflops_per_second", "{:.3g}"), ("mfu", "{:.1%}"),
               ("peak_memory_gb", "{:.2f}"), ("build_peak_memory_gb", "{:.2f}"), ("first_step_seconds", "{:.1f}")]
    headers = ["stack", "shape", "dp ranks", "batch", "seq", "accum", "ckpt", "rank", "dropout", "step", "quant",
               "dtype", "streams", "lengths", "padding", "tok/s", "s/step", "TFLOP/s", "MFU", "peak GB", "build GB",
               "1st step s"]
    # results of older versions lack some fields
    defaults = {"streams": 1, "build_peak_memory_gb": float("nan"), "grad_accum_steps": 1, "lora_rank": 0,
                "lora_dropout": 0.0, "train_step": "", "ranks": 1, "lengths": "fixed", "padding_fraction": 0.0}
    rows = [[fmt.format(r.get(key, defaults.get(key))) for key, fmt in columns] for r in results]
    widths = [max(len(h), *(len(row[i]) for row in rows)) for i, h in enumerate(headers)]
    print(" | ".join(h.ljust(w) for h, w in zip(headers, widths)))
    print("-|-".join("-" * w for w in widths))
    for row in rows:
        print(" | ".join(cell.ljust(w) for cell, w in zip(row, widths)))
    if results:
        r = results[0]
        print(f"\ndevice: {r['device']}; matmul ceiling {r['matmul_tflops']:.3g} TFLOP/s ({r['dtype']}); "
              f"trainable params {r['trainable_params']:,}")
        ours = next((x for x in results if x["stack"] == "ours"), None)
        for other in results:
            if ours and other is not ours:
                print(f"ours / {other['stack']}: {ours['tokens_per_second'] / other['tokens_per_second']:.1f}x "
                      f"tokens/s, {ours['peak_memory_gb'] / max(other['peak_memory_gb'], 1e-9):.2f}x peak memory")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Time compiled QLoRA training steps (ours, optionally mlx-lm).")
    parser.add_argument("overrides", nargs="*", help="Hydra overrides of conf/train.yaml, e.g. model=mistral-7b-shape")
    parser.add_argument("--batch", type=int, help="rows per micro-batch (default: trainer.batch_size)")
    parser.add_argument("--seq", type=int, help="tokens per row (default: data.max_seq_len)")
    parser.add_argument("--accum", type=int, help="micro-batches per optimizer step (default: optim.grad_accum_steps)")
    parser.add_argument("--steps", type=int, default=5, help="timed optimizer steps (median reported)")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps first (compilation)")
    parser.add_argument("--checkpointing", action="store_true", help="gradient checkpointing on")
    parser.add_argument("--dolly-lengths", action="store_true",
                        help="train on --steps length-sorted batches of Dolly-profile records; real tokens/s")
    parser.add_argument("--compare-mlx-lm", action="store_true", help="also time mlx-lm's trainer")
    parser.add_argument("--json", type=Path, help="append the results (one JSON object per line) to this file")
    parser.add_argument("--stack", choices=["ours", "mlx-lm"], help=argparse.SUPPRESS)  # child process
    options = parser.parse_intermixed_args(argv)

    overrides = list(options.overrides)
    if options.checkpointing:
        overrides.append("trainer.gradient_checkpointing=true")
    if options.stack:
        cfg = compose(overrides)
        batch = options.batch or cfg.trainer.batch_size
        seq = options.seq or cfg.data.max_seq_len
        if options.stack == "ours":
            accum = options.accum or cfg.optim.grad_accum_steps
            result = bench_ours(cfg, batch, seq, options.steps, options.warmup, accum, options.dolly_lengths)
        else:  # one micro-batch per step (mlx-lm's own step)
            from harness.mlx_lm_baseline import bench_mlx_lm

            timed = bench_mlx_lm(cfg, batch, seq, options.steps, options.warmup, process_start=_PROCESS_START,
                                 dolly_lengths=options.dolly_lengths)
            result = make_result("mlx-lm", cfg, timed.args, batch, timed.seq or seq, timed.checkpointing,
                                 timed.trainable, timed.times, timed.first_step, timed.dtype, timed.quant,
                                 build_peak=timed.build_peak, real_tokens=timed.real_tokens, padding=timed.padding)
        if launched_rank() in (None, 0):
            print("RESULT " + json.dumps(asdict(result)), flush=True)
        return

    if launched_rank() not in (None, 0):  # this rank's child joins rank 0's, which reports
        sys.exit(subprocess.run(stack_command("ours", options.overrides, options)).returncode)
    results = [r for r in [run_stack("ours", options.overrides, options)] if r]
    if options.compare_mlx_lm and launched_rank() is not None:
        print("--compare-mlx-lm is skipped under a distributed launcher (mlx-lm runs on one device here)",
              file=sys.stderr)
    elif options.compare_mlx_lm:
        try:
            import mlx_lm  # noqa: F401
        except ImportError:
            print("mlx-lm is not installed (pip install -e '.[bench]'); skipping the comparison", file=sys.stderr)
        else:
            results += [r for r in [run_stack("mlx-lm", options.overrides, options)] if r]
    print_table(results)
    if options.json:
        with options.json.open("a") as f:
            for r in results:
                f.write(json.dumps({**r, "date": time.strftime("%Y-%m-%d")}) + "\n")
    if not results:
        sys.exit(1)


if __name__ == "__main__":
    main()
