"""Console logging for the command-line tools (train.py, sample.py, `python -m mmjax.evaluate`).

By default a user sees mmjax's own INFO lines and everyone's warnings: JAX, absl, Orbax and
Grain log at INFO what a user does not act on (which accelerator plugins failed to load, each
file a checkpoint writes). `-v` shows every library's INFO lines, `-vv` everything at DEBUG.

Lines go through `tqdm.write`, so that a line logged during training lands above the
progress bar instead of inside it.
"""

from __future__ import annotations

import argparse
import logging
import sys

from tqdm import tqdm

FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
DATE_FORMAT = "%Y-%m-%d %H:%M:%S"
# Loggers whose INFO lines are shown by default: the package's, and a script's own.
OWN = ("mmjax", "__main__")


class TqdmHandler(logging.Handler):
    """Writes records with `tqdm.write`, which clears the progress bars on the same stream,
    writes the line and redraws them. `stream=None` means whatever `sys.stderr` is when a
    record is written (where tqdm draws its bars)."""

    def __init__(self, stream=None, level=logging.NOTSET):
        super().__init__(level)
        self.stream = stream

    def emit(self, record: logging.LogRecord) -> None:
        try:
            tqdm.write(self.format(record), file=self.stream or sys.stderr)
        except Exception:  # as logging.StreamHandler does: never let a log line end the program
            self.handleError(record)


class OwnInfoFilter(logging.Filter):
    """Passes mmjax's records at INFO and above, and every other library's at WARNING and above."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno >= logging.WARNING:
            return True
        return record.levelno >= logging.INFO and any(
            record.name == own or record.name.startswith(own + ".") for own in OWN)


def add_verbose_flag(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("-v", "--verbose", action="count", default=0,
                        help="also show other libraries' INFO lines (JAX, Orbax, Grain); -vv: DEBUG")


def setup_logging(verbosity: int = 0, stream=None) -> logging.Handler:
    """Replaces the root logger's handlers with one console handler; returns it.

    verbosity 0: mmjax's INFO lines and every warning; 1: INFO from every library; 2 or more:
    DEBUG from every library. The root logger's level is set too, because a level on the
    handler alone cannot show records that the loggers never create.
    """
    handler = TqdmHandler(stream)
    handler.setFormatter(logging.Formatter(FORMAT, DATE_FORMAT))
    if verbosity <= 0:
        handler.addFilter(OwnInfoFilter())
    root = logging.getLogger()
    for old in root.handlers[:]:
        root.removeHandler(old)
        old.close()
    root.addHandler(handler)
    root.setLevel(logging.DEBUG if verbosity >= 2 else logging.INFO)
    # Levels that an earlier setup (or a library) put on these loggers would hide what -v asks
    # for, or show what the default hides: the root's level and the filter decide instead.
    for name in ("absl", "jax", "orbax", "grain", *OWN):
        logging.getLogger(name).setLevel(logging.NOTSET)
    return handler
