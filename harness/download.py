"""Fetch a base model from the Hugging Face Hub: `python -m harness.download model=mistral-7b [out_dir=...]`.

Downloads `config.json`, the safetensors weights (with their index) and the tokenizer into a local
directory, with progress bars (`models.checkpoint.download_model`: never pickled weights, never remote code);
train with `model.path=<that directory>`. Set `HF_TOKEN` in the environment
for gated repositories (it is never written anywhere by this project).
"""

from __future__ import annotations

from pathlib import Path

from models.checkpoint import CheckpointError, download_model


class DownloadError(RuntimeError):
    """The model could not be fetched; the message says why and what to do."""


def run(cfg) -> Path:
    if not cfg.model.path:
        raise DownloadError(
            f"model={cfg.model.name} has no `path` (it is built with random weights): nothing to "
            "download; try model=mistral-7b"
        )
    if Path(cfg.model.path).is_dir():
        print(f"{cfg.model.path} is already a local directory")
        return Path(cfg.model.path)
    out = Path(cfg.out_dir or Path(cfg.paths.models) / cfg.model.path.split("/")[-1])
    try:
        path = download_model(cfg.model.path, out, revision=cfg.revision)
    except CheckpointError as err:
        raise DownloadError(str(err)) from err
    print(
        f"downloaded {cfg.model.path} to {path}\ntrain with: python -m harness.train model={cfg.model.name} "
        f"model.path={path}"
    )
    return path


def main() -> None:
    """Console entry point (`qlora-download`)."""
    import hydra

    import harness.schema  # noqa: F401
    from harness.train import CONFIG_DIR, TRUSTED_TARGETS

    hydra.main(config_path=CONFIG_DIR, config_name="download", execution_whitelist=TRUSTED_TARGETS)(run)()


if __name__ == "__main__":
    main()
