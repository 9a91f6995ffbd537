"""One rank of a run that `harness.train` started on several ranks (`distributed.ranks_per_host` > 1):

    python -m harness.train_rank RANKS_CONFIG RUN_DIR      # under harness.launch, which starts every rank

RANKS_CONFIG is the run's composed config (`harness.launch.train_on_ranks` writes it); rank 0 writes the run to
RUN_DIR. Not meant to be typed: `python -m harness.launch ... -- -m harness.train [overrides]` is the
hand-launched way.
"""

from __future__ import annotations

import sys

from omegaconf import OmegaConf

from harness.train import train


def main(argv: list[str] | None = None) -> None:
    config_file, run_dir = sys.argv[1:] if argv is None else argv
    train(OmegaConf.load(config_file), run_dir=run_dir)


if __name__ == "__main__":
    main()
