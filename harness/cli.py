"""What the command-line tools (`harness.train`, `.generate`, `.export`, `.prepare`, `.download`) share: where
their Hydra configs live and which Python targets a config may instantiate."""

from __future__ import annotations

from pathlib import Path

CONFIG_DIR = str(Path(__file__).resolve().parent.parent / "conf")
# Python targets a config may instantiate (Hydra 1.4's execution whitelist): our callback, the sweeper and
# launcher plugins, Optuna's samplers, and the logging handlers of Hydra's job logging.
TRUSTED_TARGETS = ["harness.*", "hydra_plugins.*", "optuna.samplers.*", "logging.*"]
