"""Applies PYTHON_GC_THRESHOLD, and in the Celery worker bounds its memory (installed by
edgefit, mounted read-only).

CPython reads no environment variable for its GC thresholds (python/cpython#124742 was closed
unmerged), so `PYTHON_GC_THRESHOLD=700,10,10` alone does nothing. Python imports this module at
start-up from PYTHONPATH (/opt/edgefit/python) in every process of api, worker and beat, and
calls gc.set_threshold itself. The plan's value for this host: 500,10,10.

The worker's gevent pool never gives memory back and ignores --max-tasks-per-child (measured),
so in the `celery worker` process only, and only where EDGEFIT_WORKER_RESTART_ANON_MIB is set
(the plan's 2295 MiB for this host), a thread reads the container's cgroup v2
files every EDGEFIT_WORKER_WATCHDOG_INTERVAL_S seconds and sends the process SIGTERM once its
anonymous memory passes that threshold: Celery's warm shutdown lets running tasks finish, and
the container's restart policy starts a fresh worker, before the limit's OOM killer would stop it.
"""

import gc
import os
import signal
import sys
import time

_sleep = time.sleep  # the real one: gevent patches time.sleep after this module has run
_CGROUP_DIR = "/sys/fs/cgroup"


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


def read_cgroup_memory(cgroup_dir=_CGROUP_DIR):
    """(anon, current, max) in bytes from cgroup v2 files; max is None when unlimited."""
    anon = None
    with open(os.path.join(cgroup_dir, "memory.stat")) as stat:
        for line in stat:
            key, _, value = line.partition(" ")
            if key == "anon":
                anon = int(value)
                break
    if anon is None:
        raise ValueError(f"no anon line in {cgroup_dir}/memory.stat")
    with open(os.path.join(cgroup_dir, "memory.current")) as current:
        used = int(current.read().strip())
    with open(os.path.join(cgroup_dir, "memory.max")) as limit:
        raw = limit.read().strip()
    return anon, used, (None if raw == "max" else int(raw))


def is_celery_worker(argv):
    """True for `celery ... worker ...` (the entrypoint's command) and `python -m celery ...
    worker`, not for `celery inspect`, beat or any other process of the container."""
    if argv[:1] == ["-m"]:  # `python -m celery`: sys.argv names no module yet at this point
        orig = list(getattr(sys, "orig_argv", []))
        argv = orig[orig.index("-m") + 1:] if "-m" in orig else []
    return bool(argv) and os.path.basename(argv[0]).startswith("celery") and "worker" in argv[1:]


def _watch(threshold_mib, interval_s, cgroup_dir, pid):
    threshold = threshold_mib * 1024 * 1024
    while True:
        try:
            anon, used, limit = read_cgroup_memory(cgroup_dir)
        except (OSError, ValueError) as error:
            print(f"edgefit watchdog: stopped, cannot read {cgroup_dir}: {error}", file=sys.stderr, flush=True)
            return
        if anon > threshold:
            limit_text = "no limit" if limit is None else f"limit {limit >> 20} MiB"
            print(f"edgefit watchdog: anonymous memory {anon >> 20} MiB passed {threshold_mib} MiB "
                  f"(charged {used >> 20} MiB, {limit_text}): warm shutdown (SIGTERM to {pid}), "
                  "running tasks finish, the container restarts", file=sys.stderr, flush=True)
            os.kill(pid, signal.SIGTERM)
            return  # once: a second SIGTERM would not make Celery's warm shutdown any colder
        _sleep(interval_s)


def start_worker_watchdog(env=None, cgroup_dir=None):
    """Start the watchdog thread for this process; returns False when not configured."""
    env = os.environ if env is None else env
    raw = env.get("EDGEFIT_WORKER_RESTART_ANON_MIB", "").strip()
    if not raw:
        return False
    try:
        threshold_mib = int(raw)
        interval_s = float(env.get("EDGEFIT_WORKER_WATCHDOG_INTERVAL_S", "2") or 2)
        if threshold_mib <= 0 or not 0.1 <= interval_s <= 60:
            raise ValueError
    except ValueError:
        print("edgefit watchdog: not started, EDGEFIT_WORKER_RESTART_ANON_MIB must be a positive "
              "integer and EDGEFIT_WORKER_WATCHDOG_INTERVAL_S between 0.1 and 60", file=sys.stderr)
        return False
    import _thread  # a real OS thread, started before gevent patches threading
    _thread.start_new_thread(_watch, (threshold_mib, interval_s, cgroup_dir or env.get("EDGEFIT_CGROUP_DIR")
                                      or _CGROUP_DIR, os.getpid()))
    return True


_apply_gc_threshold()
if is_celery_worker(sys.argv):
    start_worker_watchdog()
