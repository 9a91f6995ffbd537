"""Fetch a base model from the Hugging Face Hub: `python -m harness.download model=mistral-7b [out_dir=...]`.

Downloads `config.json`, the safetensors weights (with their index) and the tokenizer into a local
directory, with progress bars; train with `model.path=<that directory>`. Set `HF_TOKEN` in the environment
for gated repositories (it is never written anywhere by this project).
"""

from __future__ import annotations

from pathlib import Path

WEIGHT_PATTERNS = [
    "config.json",
    "generation_config.json",
    "*.safetensors",
    "model.safetensors.index.json",
    "tokenizer.model",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
]


class DownloadError(RuntimeError):
    """The model could not be fetched; the message says why and what to do."""


def download_model(repo_id: str, out_dir: str | Path, *, revision: str | None = None) -> Path:
    """Snapshot `repo_id` (safetensors + config + tokenizer only) into `out_dir`; returns it."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError, OfflineModeIsEnabled

    out = Path(out_dir)
    try:
        path = snapshot_download(repo_id, revision=revision, local_dir=out, allow_patterns=WEIGHT_PATTERNS)
    except (OfflineModeIsEnabled, LocalEntryNotFoundError) as err:
        raise DownloadError(
            f"cannot download {repo_id!r}: the Hugging Face Hub is not reachable (offline: HF_HUB_OFFLINE is set "
            f"or there is no network) and {out} holds no copy. Connect and retry, or copy the model there. ({err})"
        ) from err
    except HfHubHTTPError as err:
        raise DownloadError(f"cannot download {repo_id!r}: {err} (gated models need `HF_TOKEN`)") from err
    path = Path(path)
    if not (path / "config.json").is_file() or not any(path.glob("*.safetensors")):
        raise DownloadError(f"{path}: the download has no config.json or safetensors weights")
    return path


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
    path = download_model(cfg.model.path, out, revision=cfg.revision)
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
