"""Named crash points: kill -9 the process at a named stage of a long command, so tests reach every interruption.

Long writers call `crash_point("<area>.<event>")` between the steps they make durable (index edits,
index builds, feature builds, `link --input`, the atomic-write helpers). Nothing happens unless one
of two environment variables is set, so in normal use a crash point costs two dictionary lookups:

    MMEL_CRASH_AT=<stage>      SIGKILL this process the first time <stage> is reached
    MMEL_CRASH_AT=<stage>#<n>  ... the n-th time (stages inside loops, e.g. one per chunk)
    MMEL_CRASH_TRACE=<file>    append every stage reached to <file>, one per line

SIGKILL, not an exception or `sys.exit`: no `finally`, `except` or `atexit` code runs, exactly as
when the machine or the OOM killer stops the process. The crash harness (`bench/crash_harness.py`)
runs a command once with MMEL_CRASH_TRACE to list its stages, then once per stage with MMEL_CRASH_AT.
"""

from __future__ import annotations

import os
import signal
from collections import Counter

CRASH_AT_VARIABLE = "MMEL_CRASH_AT"
TRACE_VARIABLE = "MMEL_CRASH_TRACE"

_reached: Counter[str] = Counter()   # stage -> times reached, counted only while a variable is set


def crash_point(stage: str) -> None:
    """Record `stage` in the trace, and kill this process here if MMEL_CRASH_AT names this occurrence of it."""
    target = os.environ.get(CRASH_AT_VARIABLE)
    trace = os.environ.get(TRACE_VARIABLE)
    if target is None and trace is None:
        return
    _reached[stage] += 1
    if trace:
        with open(trace, "a", encoding="utf-8") as handle:
            handle.write(stage + "\n")
    if target is not None and _names_occurrence(target, stage, _reached[stage]):
        os.kill(os.getpid(), signal.SIGKILL)


def _names_occurrence(target: str, stage: str, occurrence: int) -> bool:
    """Whether `target` ('<stage>' or '<stage>#<n>') means this `occurrence` of `stage`."""
    name, separator, count = target.rpartition("#")
    if separator and count.isdigit():
        return name == stage and int(count) == occurrence
    return target == stage and occurrence == 1


__all__ = ["CRASH_AT_VARIABLE", "TRACE_VARIABLE", "crash_point"]
