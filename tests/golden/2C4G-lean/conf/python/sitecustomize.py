"""Applies PYTHON_GC_THRESHOLD and reports it (installed by edgefit, mounted read-only).

CPython reads no environment variable for its GC thresholds (python/cpython#124742 was closed
unmerged), so `PYTHON_GC_THRESHOLD=700,10,10` alone does nothing. Python imports this module at
start-up from PYTHONPATH (/opt/edgefit/python) in every process of api, worker and beat, and
calls gc.set_threshold itself. The plan's value for this host: 700,10,10.
"""

import gc
import os
import sys


def _apply_gc_threshold():
    raw = os.environ.get("PYTHON_GC_THRESHOLD", "").strip()
    if not raw:
        return
    try:
        values = [int(part) for part in raw.split(",")]
        if not 1 <= len(values) <= 3 or any(value < 0 for value in values):
            raise ValueError
    except ValueError:
        print(f"edgefit sitecustomize: ignoring PYTHON_GC_THRESHOLD={raw!r}: expected up to "
              "three non-negative integers, e.g. 700,10,10", file=sys.stderr)
        return
    gc.set_threshold(*values)


_apply_gc_threshold()
