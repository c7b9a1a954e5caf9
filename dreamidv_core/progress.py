"""The progress and cancel protocol of every long-running function in dreamidv_core.

* ``progress(stage, done, total)``: called as work advances; ``stage`` names the part of the work
  ("encode", "sample", "window", "decode", "pose", "segment", "recompose", "write", "frames", ...),
  ``done`` of ``total`` units of that stage are finished. ``None``: nobody listens.
* ``cancel() -> bool``: polled between units of work; returning True stops the work with
  :class:`~dreamidv_core.errors.Cancelled` (a host may also raise its own interruption from it).

Hosts adapt these to their own progress bars (the ComfyUI nodes: ``nodes/common.py``).
"""
from __future__ import annotations

from typing import Callable, Optional

from .errors import Cancelled

ProgressFn = Callable[[str, int, int], None]
Progress = Optional[ProgressFn]
Cancel = Optional[Callable[[], bool]]

__all__ = ["Progress", "ProgressFn", "Cancel", "check_cancel", "reporter"]


def check_cancel(cancel: Cancel, what: str) -> None:
    """Raise :class:`Cancelled` ("cancelled <what>") when ``cancel()`` says so."""
    if cancel is not None and cancel():
        raise Cancelled(f"cancelled {what}")


def _silent(stage: str, done: int, total: int) -> None:
    return None


def reporter(progress: Progress) -> ProgressFn:
    """``progress`` itself, or a function that does nothing when it is ``None``."""
    return progress if progress is not None else _silent
