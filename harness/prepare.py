"""Tokenize, split and cache a dataset, then print its report: `python -m harness.prepare [data=dolly]`.

Training reuses the cached splits when the data settings match (the cache key covers source, tokenizer,
template, lengths and split), so running this first only moves the work ahead of time.
"""

from __future__ import annotations

from harness import build


def run(cfg):
    from harness.config_checks import check_data_config
    from harness.data import load_tokenizer, prepare_dataset, print_report

    check_data_config(cfg)

    tokenizer = load_tokenizer(build.tokenizer_path(cfg))
    prepared = prepare_dataset(cfg.data, tokenizer, cache_dir=build.data_cache_dir(cfg))
    print_report(prepared)
    return prepared


def main() -> None:
    """Console entry point (`qlora-prepare`)."""
    import hydra

    import harness.schema  # noqa: F401
    from harness.cli import CONFIG_DIR, TRUSTED_TARGETS

    from harness.command_outcome import hydra_task, run_command

    task = hydra.main(config_path=CONFIG_DIR, config_name="prepare", execution_whitelist=TRUSTED_TARGETS)
    run_command(task(hydra_task(run)))


if __name__ == "__main__":
    main()
