"""Two ways of computing the same step, alternating in ONE process on one model build.

    python benchmarks/ab_step.py [--compare dequantize|rope|adapter-layout|dense-copies|norm|update|adapter-casts|
        backward-weights|train-step|gc|memory-limit|lora-scale|threads|eval-set|ahead|by-layer|by-layer-memory]
        [--thread-cpu]
        [--rows 4] [--seq 128] [--accum 1] [--rounds 3] [--steps 8] [--eval-set all|loop] [overrides ...]

`--compare dequantize`: 4-bit weights dequantized by MLX's `mx.dequantize` against our CUDA kernel
(`models.dequantize_kernels`; both the same on other backends). `--compare rope`: queries and keys rotated by
MLX's `mx.fast.rope` on their transposed view against our CUDA kernel that rotates the projection's rows and hands
them on as that view (`models.rope_kernels`). `--compare adapter-layout` (whole-graph step): the adapters and
their optimizer state laid out by rows against by columns, as their gradients come
(`harness.step.standard.lay_out_by_columns`). `--compare dense-copies`: with
CPU streams, the quantized weights dequantized every step against once for the run (`models.dense_copies`).
`--compare norm`: the update's squared norm of each gradient array as a dot product of it flattened (before
session 11), a sum of squares of it flattened, a sum of squares in its own layout (as shipped), and a dot product
of its transpose flattened. `--compare update`: the
optimizer update array by array against on arrays kept stacked by shape (`harness.step.stacked`), in whichever
step the config gives. `--compare adapter-casts`: with stacks, each float32 adapter cast to the compute dtype
where it is used against the stacks cast once a step (the layer-by-layer step; the whole-graph step casts where
used).
`--compare backward-weights` (with checkpointing): the recomputed layer keeps its dense weights for the backward
pass against rebuilding them there. `--compare train-step`: the whole-graph step against the layer-by-layer one
(`harness.step.factory`). `--compare gc`: Python's collector as it is against with the objects alive after the
build frozen (`gc.freeze`). `--compare memory-limit`: MLX's memory limit at 8.0, 7.5 and 7.0 GB (the config's
`trainer.memory_limit_gb` replaced). `--compare lora-scale` (no dropout): the adapters' scale as the GEMM's alpha
against as shipped (`models.lora.LoRALinear`: on B's cast where B is cast) and always multiplied into B.
`--eval-set loop` (default): each timed step evaluates what the training loop evaluates
(`harness.step.run.run_train_step`: loss, tokens, norm; the update's new parameters are then computed as the next
step needs them), `all` the parameters and the optimizer's state as well (as before session 11); `--compare
eval-set` runs both.
`--compare ahead` (whole-graph step): the loop's evaluation against the same with the next step's gradient graph
built after this step's work is queued and before waiting for it, after or before the update's norms are queued.
`--compare by-layer` (whole-graph step, one micro-batch): the loop's evaluation against the step's work queued a
layer at a time, the gradients from the last layer (`by-layer-backward`), and each layer's output first as well.
`--compare by-layer-memory`: where that costs memory: the layer outputs queued one by one and the gradients at once
(`outputs-only`), the gradients in two pieces or in groups of 8 layers, or layer by layer.
`--compare threads` (Linux): every thread free, the main thread alone on one CPU and the rest elsewhere, or all on
one CPU; `--thread-cpu` prints the busiest threads' CPU time a step. `--accum N`: optimizer steps of N
micro-batches. Further comparisons go in `COMPARISONS`: a name for each variant and what it changes (in the model
or the process) before the step is built.

Between processes the host's speed varies by as much as the effect being measured (a small GPU step is bound by the
host: BENCHMARKS.md, "Where a small step's time goes"), so both variants share one process and one model: each
round builds the trainer's step afresh (`harness.step.factory.configured_train_step`, compiled again) for each
variant in turn, runs `--warmup` untimed steps and `--steps` timed ones, and records the median step time and the
peak memory of that variant's steps. Prints one row per variant and round, then the medians over rounds; writes the
table as JSON to $OUT/ab_<compare><tag>.json when OUT is set. Overrides as `harness.bench`'s (default 7B shape).
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import statistics
import sys
import threading
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

import models  # noqa: F401,E402  (fast BLAS before mlx)
import mlx.core as mx  # noqa: E402
from mlx import nn  # noqa: E402
from mlx.utils import tree_flatten, tree_map  # noqa: E402

from harness.bench import compose  # noqa: E402
from harness.bench_timing import synthetic_tokens, timed_runs  # noqa: E402
from harness.build import build_model, build_optimizer  # noqa: E402
from harness.process import set_up_process  # noqa: E402
from harness.step import accumulate, stacked  # noqa: E402
from harness.step.factory import configured_train_step  # noqa: E402
from harness.step.loss import causal_lm_loss  # noqa: E402
from harness.step.run import run_train_step  # noqa: E402
from harness.step.layerwise import LayerwiseTrainStep  # noqa: E402
from harness.step.standard import TrainStep  # noqa: E402
from models.dense_copies import weight_modules  # noqa: E402
from models.lora import LoRALinear  # noqa: E402
from models.mistral import MistralDecoderLayer  # noqa: E402
from models.quant import dense_weights_shared  # noqa: E402


def dequantize_with(how: str):
    def apply(model):
        os.environ["QLORA_DEQUANTIZE"] = how  # read when the step is traced (models.dequantize_kernels)

    return apply


def rope_with(how: str):
    """"mlx" or "kernel" (`QLORA_ROPE`, read when the step is traced)."""
    def apply(model):
        os.environ["QLORA_ROPE"] = how

    return apply


def adapter_layout(by_columns: bool):
    def apply(model):
        TrainStep.adapters_by_columns = by_columns  # read when the whole-graph step is built
        if not by_columns:  # the last variant left them by columns: back to rows, as a fresh model has them
            model.update(tree_map(mx.contiguous, model.trainable_parameters()))
    return apply


def dense_copies(kept: bool):
    def apply(model):
        # per step: no kept copies; the shared block builds its own each time it is entered (`dense_weights_shared`)
        accumulate.kept_dense_weights = _build_kept if kept else (lambda *args: {})
        accumulate.multiplying_by_kept_dense_weights = _kept if kept else _per_step

    return apply


_build_kept, _kept = accumulate.kept_dense_weights, accumulate.multiplying_by_kept_dense_weights


def _per_step(model):
    return dense_weights_shared(weight_modules(model), model.dtype)


def squared_norm_by(how: str):
    def dot(array):  # before session 11: a gradient laid out by columns is copied to rows to be flattened
        flat = array.reshape(-1).astype(mx.float32)
        return flat @ flat

    def sum_of_squares(array):
        flat = array.reshape(-1).astype(mx.float32)
        return (flat * flat).sum()

    def dot_of_transpose(array):  # a transposed gradient's transpose is laid out by rows: flat without a copy
        flat = (array.T if array.ndim == 2 else array).reshape(-1).astype(mx.float32)
        return flat @ flat

    def apply(model):
        accumulate.squared_norm = {"dot": dot, "sum": sum_of_squares, "in-place": _IN_PLACE,
                                   "dot-of-transpose": dot_of_transpose}[how]

    return apply


_IN_PLACE = accumulate.squared_norm  # as shipped: a square and a sum in the gradient's own layout


def update_on(how: str):
    def apply(model):
        # read when the layer-by-layer step is built (`harness.step.stacked.AdapterStacks.build`)
        stacked.AdapterStacks.supports = staticmethod(_element_wise if how == "stacks" else lambda *args: False)

    return apply


_element_wise = stacked.AdapterStacks.supports


def adapter_casts(how: str):
    def apply(model):
        # "per-use": the views keep the stacks' float32 and each adapter is cast where the model uses it
        stacked.AdapterStacks.compute_views = _compute_views if how == "once" else _float32_views

    return apply


_compute_views = stacked.AdapterStacks.compute_views


def _float32_views(self, dtype):
    return _compute_views(self, mx.float32)


STEP_KIND: dict[str, str] = {}  # set by `--compare train-step`, else the config's trainer.train_step
EVAL_SET: dict[str, str] = {}  # set by `--compare eval-set`, else `--eval-set`


def add_eval_set_option(parser: argparse.ArgumentParser) -> None:
    """`--eval-set loop|all` (default loop), the choice `evaluate_step` takes."""
    parser.add_argument("--eval-set", choices=("loop", "all"), default="loop",
                        help="what each timed step evaluates: the training loop's (loss, tokens, norm), or also "
                             "the parameters and the optimizer's state (the update then inside the step)")


_PENDING: dict[int, tuple] = {}  # `--compare ahead`: each step's gradient graph, built during the step before


def _run_ahead(step, batches, before_norm: bool) -> None:
    """A whole-graph step (`TrainStep`) evaluated as the loop does, with the next step's gradient graph built
    (replayed) after this step's work is queued and before waiting for it: the device runs this step's last
    kernels while the host builds the next graph. `before_norm`: built before the update's norms are queued (the
    backward pass's last kernels still queued), else after."""
    pending = _PENDING.pop(id(step), None)
    loss_sum, n_tokens, grads = pending or accumulate.accumulate_gradients(step._gradients, batches)
    mx.async_eval(loss_sum, n_tokens, grads)
    norm = step._update(grads, n_tokens)
    if not before_norm:
        mx.async_eval(norm)
    _PENDING[id(step)] = accumulate.accumulate_gradients(step._gradients, batches)
    mx.eval(loss_sum, n_tokens, norm)


_LAYER_OUTPUTS: list = []  # `--compare by-layer`: each decoder layer's output, collected while a graph is traced
_DECODER_CALL = MistralDecoderLayer.__call__


def _collecting_call(self, *args, **kwargs):
    out = _DECODER_CALL(self, *args, **kwargs)
    _LAYER_OUTPUTS.append(out)
    return out


_BY_LAYER_GRADIENTS: dict[int, object] = {}  # per step: its compiled gradients that also return the layer outputs


def _gradients_with_layer_outputs(step):
    """`step`'s gradients (`TrainStep`), compiled to return each decoder layer's output as well: the arrays the
    forward pass computes anyway, handed out so that they can be queued one by one."""
    if id(step) not in _BY_LAYER_GRADIENTS:
        model, optimizer = step.model, step.optimizer
        loss_and_grad = nn.value_and_grad(model, causal_lm_loss)

        def gradients(batch):
            _LAYER_OUTPUTS.clear()
            MistralDecoderLayer.__call__ = _collecting_call
            try:
                (loss_sum, n_tokens), grads = loss_and_grad(model, batch)
            finally:
                MistralDecoderLayer.__call__ = _DECODER_CALL
            # outputs of the first trace only: the value_and_grad trace calls each layer once
            return loss_sum, n_tokens, grads, list(_LAYER_OUTPUTS)

        state = [model.state, optimizer.state, mx.random.state]
        _BY_LAYER_GRADIENTS.clear()
        _BY_LAYER_GRADIENTS[id(step)] = mx.compile(gradients, inputs=state, outputs=state)
    return _BY_LAYER_GRADIENTS[id(step)]


# `--compare by-layer` and `--compare by-layer-memory`: what each way queues, as (layer outputs one by one, gradients
# in groups of this many layers from the last; 0: all gradients in one evaluation, as the loop does)
BY_LAYER = {"by-layer-backward": (False, 1), "by-layer": (True, 1), "outputs-only": (True, 0),
            "by-layer-groups-of-8": (True, 8), "by-layer-halves": (True, 16)}


def _run_by_layer(step, batches, forward: bool, group: int) -> None:
    """A whole-graph step (`TrainStep`, one micro-batch) evaluated as the loop does, its work queued in pieces: MLX
    walks the whole graph before it encodes the first kernel of an evaluation, so queued piece by piece the GPU
    starts after the first piece's walk. `forward`: each layer's output queued first (the compiled gradients hand
    them out); then the gradients in groups of `group` layers from the last (0: all at once)."""
    (batch,) = batches
    if forward:
        loss_sum, n_tokens, grads, outputs = _gradients_with_layer_outputs(step)(batch)
        for output in outputs:
            mx.async_eval(output)
        del outputs
    else:
        loss_sum, n_tokens, grads = step._gradients(batch)
    if group:
        layers: dict[int, list] = {}
        for name, gradient in tree_flatten(grads):
            parts = name.split(".")
            index = int(parts[2]) // group if parts[:2] == ["model", "layers"] else -1
            layers.setdefault(index, []).append(gradient)
        for index in sorted(layers, reverse=True):
            mx.async_eval(*layers[index])
    mx.async_eval(loss_sum, n_tokens, grads)
    norm = step._update(grads, n_tokens)
    mx.eval(loss_sum, n_tokens, norm)


def evaluate_step(step, batches, model, optimizer, eval_set: str) -> None:
    """One step, evaluated as the training loop evaluates it (`eval_set="loop"`: `run_train_step`), with the model's
    trainable parameters and the optimizer's state as well (`"all"`), as the loop does with the next step's graph
    built before waiting (`"ahead"`, `"ahead-before-norm"`: `_run_ahead`), or with the step's work queued in
    pieces (`BY_LAYER`'s names: `_run_by_layer`)."""
    if eval_set == "loop":
        run_train_step(step, batches)
    elif eval_set in BY_LAYER:
        _run_by_layer(step, batches, *BY_LAYER[eval_set])
    elif eval_set in ("ahead", "ahead-before-norm"):
        _run_ahead(step, batches, before_norm=eval_set == "ahead-before-norm")
    else:
        mx.eval(step(batches), model.trainable_parameters(), optimizer.state)


def eval_set(which: str):
    """How each timed step is evaluated (`evaluate_step`); the graphs kept by another variant are let go first."""
    def apply(model):
        _PENDING.clear()
        _BY_LAYER_GRADIENTS.clear()
        EVAL_SET["set"] = which

    return apply


def train_step_kind(kind: str):
    def apply(model):
        STEP_KIND["kind"] = kind

    return apply


_LORA_CALL = LoRALinear.__call__


def _lora_scale_as_alpha(self, x):
    """`LoRALinear.__call__` without dropout as before session 10: the scale as the GEMM's alpha."""
    y = self.base_layer(x)
    down = x @ self.lora_A.astype(x.dtype).T
    return mx.addmm(y, down, self.lora_B.astype(x.dtype).T, alpha=self.scale)


def _lora_scale_on_b(self, x):
    """`LoRALinear.__call__` without dropout, the scale always multiplied into B (also where no cast is needed)."""
    y = self.base_layer(x)
    down = x @ self.lora_A.astype(x.dtype).T
    return mx.addmm(y, down, (self.scale * self.lora_B).astype(x.dtype).T)


def lora_scale(how: str):
    def apply(model):
        LoRALinear.__call__ = {"alpha": _lora_scale_as_alpha, "on-b": _lora_scale_on_b}.get(how, _LORA_CALL)

    return apply


def backward_weights(kept: bool):
    def apply(model):
        # the checkpointed step's default (`harness.step.layerwise.LayerwiseTrainStep(keep_dense=...)`)
        LayerwiseTrainStep.__init__.__kwdefaults__["keep_dense"] = kept

    return apply


def python_gc(how: str):
    def apply(model):
        # "frozen": the objects alive now (the model's modules and arrays) leave Python's collected generations
        gc.collect()
        gc.freeze() if how == "frozen" else gc.unfreeze()

    return apply


def _threads() -> dict[int, str]:
    """This process's threads (Linux): id -> name."""
    found = {}
    for tid in os.listdir("/proc/self/task"):
        try:
            found[int(tid)] = Path(f"/proc/self/task/{tid}/comm").read_text().strip()
        except FileNotFoundError:  # the thread ended
            pass
    return found


def _siblings(cpu: int) -> set[int]:
    """`cpu` and the logical CPUs that share its core, as the (possibly virtual) machine reports them."""
    text = Path(f"/sys/devices/system/cpu/cpu{cpu}/topology/thread_siblings_list").read_text().strip()
    found = set()
    for part in text.split(","):
        low, _, high = part.partition("-")
        found.update(range(int(low), int(high or low) + 1))
    return found


# the CPUs the process started on (Linux), read before any variant narrows a thread's
PROCESS_CPUS = os.sched_getaffinity(0) if hasattr(os, "sched_getaffinity") else set()


def thread_placement(how: str):
    """Where the threads run: "free" on any of the process's CPUs; "apart" the main (kernel-encoding) thread alone
    on one CPU and every other thread (MLX's completion worker, the CUDA driver's, BLAS's) on the rest but its
    core's siblings; "shared" all of them on the main thread's one CPU, the worst contention."""
    def apply(model):
        cpus = sorted(PROCESS_CPUS)
        main_cpu = cpus[len(cpus) // 2]
        main = threading.get_native_id()
        for tid in _threads():
            if how == "free":
                cpu_set = set(cpus)
            elif how == "shared":
                cpu_set = {main_cpu}
            else:
                cpu_set = {main_cpu} if tid == main else (set(cpus) - _siblings(main_cpu) or set(cpus) - {main_cpu})
            try:
                os.sched_setaffinity(tid, cpu_set or set(cpus))
            except ProcessLookupError:  # the thread ended
                pass

    return apply


def thread_cpu_seconds() -> dict[int, tuple[str, float, float, int, int]]:
    """Each thread's name, user and system CPU seconds so far, minor page faults so far and the CPU it last ran on
    (/proc, Linux)."""
    ticks = os.sysconf("SC_CLK_TCK")
    found = {}
    for tid, name in _threads().items():
        try:
            fields = Path(f"/proc/self/task/{tid}/stat").read_text().rpartition(")")[2].split()
        except FileNotFoundError:  # the thread ended
            continue
        found[tid] = (name, int(fields[11]) / ticks, int(fields[12]) / ticks, int(fields[7]), int(fields[36]))
    return found


def report_thread_cpu(before: dict, after: dict, steps: int) -> str:
    """The busiest threads between two `thread_cpu_seconds` readings: ms of user and system CPU a step, minor page
    faults a step, and where each ran last."""
    rows = []
    for tid, (name, user, system, faults, cpu) in after.items():
        _, user0, system0, faults0, _ = before.get(tid, (name, 0.0, 0.0, 0, cpu))
        rows.append(((user - user0) / steps * 1e3, (system - system0) / steps * 1e3, (faults - faults0) / steps,
                     tid, name, cpu))
    rows.sort(key=lambda row: -(row[0] + row[1]))
    return "; ".join(f"{name}[{tid}] user {user:.1f} sys {system:.1f} ms/step, {faults:.0f} faults/step, cpu {cpu}"
                     for user, system, faults, tid, name, cpu in rows[:4] if user + system > 0)


def memory_limit(gb: float):
    def apply(model):
        mx.set_memory_limit(int(gb * 1e9))  # read as MLX allocates: it can change between variants of a process

    return apply


COMPARISONS = {
    "dequantize": {"mlx": dequantize_with("mlx"), "kernel": dequantize_with("kernel")},
    "dense-copies": {"per-step": dense_copies(False), "kept": dense_copies(True)},
    "rope": {"mlx": rope_with("mlx"), "kernel": rope_with("kernel")},
    "adapter-layout": {"rows": adapter_layout(False), "columns": adapter_layout(True)},
    "norm": {"dot": squared_norm_by("dot"), "sum-of-squares": squared_norm_by("sum"),
             "in-place": squared_norm_by("in-place"), "dot-of-transpose": squared_norm_by("dot-of-transpose")},
    "update": {"per-array": update_on("per-array"), "stacks": update_on("stacks")},
    "eval-set": {"all": eval_set("all"), "loop": eval_set("loop")},
    "ahead": {"loop": eval_set("loop"), "ahead": eval_set("ahead"),
              "ahead-before-norm": eval_set("ahead-before-norm")},
    "by-layer": {"loop": eval_set("loop"), "by-layer-backward": eval_set("by-layer-backward"),
                 "by-layer": eval_set("by-layer")},
    "by-layer-memory": {name: eval_set(name) for name in ("loop", "outputs-only", "by-layer-halves",
                                                          "by-layer-groups-of-8", "by-layer")},
    "adapter-casts": {"per-use": adapter_casts("per-use"), "once": adapter_casts("once")},
    "backward-weights": {"kept": backward_weights(True), "rebuilt": backward_weights(False)},
    "train-step": {"standard": train_step_kind("standard"), "layerwise": train_step_kind("layerwise")},
    "gc": {"default": python_gc("default"), "frozen": python_gc("frozen")},
    "memory-limit": {"8.0": memory_limit(8.0), "7.5": memory_limit(7.5), "7.0": memory_limit(7.0)},
    "lora-scale": {"alpha": lora_scale("alpha"), "on-cast": lora_scale("on-cast"), "on-b": lora_scale("on-b")},
    "threads": {"free": thread_placement("free"), "apart": thread_placement("apart"),
                "shared": thread_placement("shared")},
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("overrides", nargs="*", default=["model=mistral-7b-shape"])
    parser.add_argument("--compare", choices=sorted(COMPARISONS), default="dequantize")
    parser.add_argument("--rows", type=int, default=4)
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--accum", type=int, default=1, help="micro-batches per optimizer step")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--tag", default="", help="appended to the JSON file's name")
    add_eval_set_option(parser)
    parser.add_argument("--thread-cpu", action="store_true",
                        help="print the busiest threads' CPU time a step for each variant (Linux)")
    options = parser.parse_args()
    cfg = compose(options.overrides)
    streams, _ = set_up_process(cfg.trainer, batch_size=options.rows)
    model = build_model(cfg, progress=False)
    batches = []
    for index in range(options.accum):  # the micro-batches of one optimizer step, different tokens each
        tokens = synthetic_tokens(options.rows, options.seq, model.args.vocab_size, seed=index)
        batches.append({"input_ids": tokens, "labels": tokens, "attention_mask": mx.ones_like(tokens)})
    model.train()
    print(f"device {mx.default_device()}, {options.overrides}, {options.rows}x{options.seq}, "
          f"checkpointing {cfg.trainer.gradient_checkpointing}", flush=True)
    variants = COMPARISONS[options.compare]
    rows = []
    for round_ in range(options.rounds):
        for name, apply in variants.items():
            apply(model)
            optimizer = build_optimizer(cfg.optim, model, total_steps=1000)
            cfg.trainer.train_step = STEP_KIND.get("kind", cfg.trainer.train_step)
            step = configured_train_step(model, optimizer, cfg, streams=streams,
                                         micro_batch_tokens=options.rows * options.seq)

            def run():
                evaluate_step(step, batches, model, optimizer, EVAL_SET.get("set", options.eval_set))

            mx.reset_peak_memory()
            before = thread_cpu_seconds() if options.thread_cpu else None
            seconds = statistics.median(timed_runs(run, warmup=options.warmup, repeat=options.steps))
            if before is not None:
                print(f"  threads, {name}: "
                      f"{report_thread_cpu(before, thread_cpu_seconds(), options.warmup + options.steps)}", flush=True)
            row = {"round": round_ + 1, "variant": name, "ms": seconds * 1e3,
                   "tokens_per_second": options.accum * options.rows * options.seq / seconds,
                   "peak_gb": mx.get_peak_memory() / 1e9, "step": type(step).__name__}
            rows.append(row)
            print(f"round {row['round']} {name:<9} {row['ms']:8.1f} ms {row['tokens_per_second']:9,.0f} tok/s "
                  f"peak {row['peak_gb']:.2f} GB ({row['step']})", flush=True)
            # the variant's step and optimizer (its stacks, moments, compiled graphs) gone before the next is built:
            # left for the collector, they stayed alive and each later variant's peak counted them
            step = optimizer = run = None
            gc.collect()
            mx.clear_cache()
    summary = {}
    for name in variants:
        mine = [r for r in rows if r["variant"] == name]
        summary[name] = {"ms": statistics.median(r["ms"] for r in mine),
                         "tokens_per_second": statistics.median(r["tokens_per_second"] for r in mine),
                         "peak_gb": max(r["peak_gb"] for r in mine)}
        print(f"median {name:<9} {summary[name]['ms']:8.1f} ms {summary[name]['tokens_per_second']:9,.0f} tok/s "
              f"peak {summary[name]['peak_gb']:.2f} GB", flush=True)
    out = os.environ.get("OUT")
    if out:
        Path(out, f"ab_{options.compare}{options.tag}.json").write_text(json.dumps(
            {"device": str(mx.default_device()), "overrides": options.overrides, "rows": options.rows,
             "seq": options.seq, "runs": rows, "median": summary}, indent=1))


if __name__ == "__main__":
    main()
