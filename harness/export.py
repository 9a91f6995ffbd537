"""Export a training run: `python -m harness.export run_dir=<run> [out_dir=...] [dtype=bfloat16]`.

Writes `<out_dir>/peft/` (adapters in PEFT's format, for `peft.PeftModel.from_pretrained` on the
full-precision base) and `<out_dir>/merged/` (a Hugging Face directory whose weights are the dequantized base
plus the merged adapters, loadable by `transformers` and by `harness.generate model_dir=`). The merged weights
are computed shard by shard (`models.export.export_merged`): the peak is the quantized model plus one shard.
`dtype=auto` (the default) writes bfloat16 for 7B-sized models and float32 for small ones.
"""

from __future__ import annotations

import shutil
from pathlib import Path

from harness import build


def export_run(
    run_dir: str | Path,
    out_dir: str | Path | None = None,
    *,
    which: str = "best",
    dtype: str = "auto",
    merged: bool = True,
    peft: bool = True,
) -> dict[str, Path]:
    """Export the `which` adapters of `run_dir`; returns the written directories by kind."""
    from harness.process import set_up_process
    from harness.run_state import checkpoint_dir
    from models.adapters import save_peft_adapters
    from models.atomic_files import DiskWriteError
    from models.export import export_merged

    checkpoint_dir(run_dir, which)  # a run directory with those adapters, before anything is created
    out = Path(out_dir) if out_dir else Path(run_dir) / "export"
    created = not out.exists()
    try:  # before the model is loaded (minutes for 7B): a folder that cannot be made is said at once
        out.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise DiskWriteError.from_error(out, err) from err
    written = {}
    try:
        set_up_process()
        cfg, model, tokenizer = build.load_trained(run_dir, which, progress=True)
        if peft:
            written["peft"] = save_peft_adapters(
                model, out / "peft", build.lora_spec(cfg.lora), build.base_model_id(cfg.model)
            )
        if merged:
            written["merged"] = export_merged(model, out / "merged", tokenizer=tokenizer, dtype=dtype)
    except BaseException:
        if created and not written:  # nothing exported: no empty folder left behind
            shutil.rmtree(out, ignore_errors=True)
        raise
    for kind, path in written.items():
        print(f"{kind:7s} {path}")
    return written


def run(cfg) -> dict[str, Path]:
    from harness.config_checks import check_export_config

    check_export_config(cfg)
    return export_run(
        cfg.run_dir, cfg.out_dir, which=cfg.adapters, dtype=cfg.dtype, merged=cfg.merged, peft=cfg.peft
    )


def main() -> None:
    """Console entry point (`qlora-export`)."""
    import hydra

    import harness.schema  # noqa: F401
    from harness.cli import CONFIG_DIR, TRUSTED_TARGETS

    from harness.command_outcome import hydra_task, run_command

    task = hydra.main(config_path=CONFIG_DIR, config_name="export", execution_whitelist=TRUSTED_TARGETS)
    run_command(task(hydra_task(run)))


if __name__ == "__main__":
    main()
