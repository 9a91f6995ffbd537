"""Lines for the person running a command: printed to stderr and appended to the Hydra job's log file
(`<run dir>/train.log`), so the log holds what the terminal showed."""

from __future__ import annotations

import logging
import sys


def note(message: str) -> None:
    """Print `message` to stderr, and write it to the file handlers of the root logger (Hydra's job log)."""
    print(message, file=sys.stderr, flush=True)
    record = logging.LogRecord("harness", logging.INFO, __file__, 0, message, None, None)
    # A log file the disk cannot take (full) must not bury the line just printed under logging's traceback.
    raise_exceptions, logging.raiseExceptions = logging.raiseExceptions, False
    try:
        for handler in logging.getLogger().handlers:
            if isinstance(handler, logging.FileHandler):
                handler.handle(record)
    finally:
        logging.raiseExceptions = raise_exceptions
