"""Progress bars that stay readable where nobody watches a terminal.

On a terminal, tqdm redraws one line in place. In a batch log (SLURM's, a pipe, a file) those
redraws are a stream of carriage returns that becomes one huge line; there, each refresh is a
line of its own, at most every ``BATCH_LOG_INTERVAL_S`` seconds.
"""

from __future__ import annotations

import sys
from typing import Any, TextIO

from tqdm.auto import tqdm

BATCH_LOG_INTERVAL_S = 30.0


class _LineStream:
    """A file for tqdm that writes each refresh as a line instead of redrawing it."""

    def __init__(self, stream: TextIO):
        self.stream = stream

    def write(self, text: str) -> None:
        text = text.replace("\r", "").strip()  # the redraw's cursor returns and blanking
        if text:
            self.stream.write(text + "\n")

    def flush(self) -> None:
        self.stream.flush()


def progress(iterable: Any = None, **kwargs: Any) -> tqdm:
    """``tqdm(iterable, **kwargs)`` on a terminal; elsewhere a line per refresh, every
    ``BATCH_LOG_INTERVAL_S`` seconds at most (``mininterval`` may set another)."""
    stream = kwargs.pop("file", None) or sys.stderr
    if stream.isatty():
        return tqdm(iterable, file=stream, **kwargs)
    kwargs.setdefault("mininterval", BATCH_LOG_INTERVAL_S)
    return tqdm(iterable, file=_LineStream(stream), ascii=True, **kwargs)
