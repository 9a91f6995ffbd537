"""What re-quantizing a pretrained base costs: its validation loss before fine-tuning, per quantization scheme.

    python benchmarks/quant_cost.py                       # the default run's model and validation set
    python benchmarks/quant_cost.py model=smollm2-135m data.max_records=null --schemes none rowwise4 nf4

Each scheme builds the base exactly as `harness.train` does (`harness.build.build_base_model`, no adapters) and
scores the same validation examples with the trainer's evaluation step: mean loss per response token (nats),
the number the default run reports as its first validation loss. Prints a table.
"""

from __future__ import annotations

import argparse
import math
import time

import models  # noqa: F401  (fast BLAS before MLX)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("overrides", nargs="*", help="Hydra overrides of conf/train.yaml")
    parser.add_argument("--schemes", nargs="+", default=["none", "rowwise4", "group4", "nf4"])
    args = parser.parse_args(argv)

    from hydra import compose, initialize_config_dir

    import harness.schema  # noqa: F401
    from harness import build
    from harness.data import validation_batches
    from harness.cli import CONFIG_DIR
    from harness.train import prepare_data
    from harness.step.factory import make_eval_step
    from harness.loop import evaluate

    rows = []
    for scheme in args.schemes:
        with initialize_config_dir(config_dir=CONFIG_DIR, version_base=None):
            cfg = compose("train", overrides=[*args.overrides, f"quant={scheme}", "trainer.progress=false"])
        tokenizer, data = prepare_data(cfg)
        validation = data.validation[: cfg.trainer.max_eval_examples] if cfg.trainer.max_eval_examples else data.validation
        start = time.perf_counter()
        model = build.build_base_model(cfg, progress=False)
        built = time.perf_counter() - start
        batches = validation_batches(
            validation,
            cfg.trainer.eval_batch_size,
            pad_to_multiple=cfg.data.pad_to_multiple,
            max_seq_len=cfg.data.val_max_seq_len or cfg.data.max_seq_len,
            pad_id=tokenizer.pad_id,
        )
        loss, tokens = evaluate(model, batches, make_eval_step(model, compile=False))
        rows.append((scheme, loss, tokens, built))
        print(f"{scheme}: {loss:.4f} nats/token over {tokens} tokens (build {built:.1f} s)", flush=True)
    print(f"\nmodel {cfg.model.name}, {len(validation)} validation examples ({cfg.data.source}), dtype {cfg.model.dtype}")
    print("| quant | validation loss (nats/token) | perplexity | response tokens | build s |")
    print("|---|---|---|---|---|")
    for scheme, loss, tokens, built in rows:
        print(f"| {scheme} | {loss:.4f} | {math.exp(loss):.2f} | {tokens} | {built:.1f} |")


if __name__ == "__main__":
    main()
