"""The experiment harness: data pipeline, training loop, tracking and command-line tools around `models`."""

import models  # noqa: F401  (first: preloads the fast BLAS before anything imports mlx; see models/blas.py)
