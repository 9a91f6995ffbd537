"""The project's Hydra sweeper plugin (`hydra/sweeper=qlora_optuna`); Hydra finds it in the `hydra_plugins`
namespace package."""

from hydra_plugins.qlora_sweeper import config as config  # noqa: F401  (registers the config)
