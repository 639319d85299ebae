#!/usr/bin/env python3
"""The GC thresholds' effect on a Python process that allocates like Dify: CPython's default
against the thresholds edgefit's plan sets (edgefit.plan make_plan(...).dify.gc_threshold, read
for every preset), side by side in one run. This file's one job is that comparison.

Each configuration runs in a fresh Python subprocess (this interpreter, `--child`), several
repetitions, interleaved so drift in the machine's load spreads over all of them. The workload
is request-shaped like Dify's api under gevent: a window of requests in flight at once, each a
graph of dicts, lists and small objects with reference cycles (a node pointing back at its
request, a caught exception whose traceback holds the frame that holds the request), built up
step by step while other requests progress, then dropped, so its cycles are garbage only the
collector frees; a long-lived LRU cache keeps part of each result (the old generation grows, as
an app's caches and loaded modules do). Per run: peak RSS (ru_maxrss) and the workload's wall
time; the table gives the median and the range, and a verdict line says whether the plan's
setting helps on this machine.

    .venv/bin/python bench/gc_thresholds.py [--quick | --full] [--json FILE]

No servers and no network; only the child processes started here, each with a timeout.
"""

from __future__ import annotations

import gc
import json
import random
import resource
import statistics
import subprocess
import sys
import time
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path

if __name__ == "__main__" and "--child" in sys.argv:
    CHILD = True  # the child imports nothing of edgefit or the bench: a bare interpreter
else:
    CHILD = False
    from common import Deadline, Profile, main, table

    from edgefit.plan import PRESETS, HostSize, Options, make_plan

DEFAULT = "default"  # the interpreter's own thresholds, not set by anyone


if not CHILD:
    @dataclass(frozen=True)
    class GcProfile(Profile):
        requests: int = 0  # requests per child run
        repetitions: int = 0  # runs of each configuration

    PROFILES = {
        "quick": GcProfile("quick", 90, requests=3000, repetitions=3),
        "default": GcProfile("default", 200, requests=6000, repetitions=5),
        "full": GcProfile("full", 290, requests=12000, repetitions=7),
    }

# The workload's shape (the same in every run; a fixed seed).
IN_FLIGHT = 48  # requests served at once (gevent greenlets in one api worker)
PARTS = 60  # workflow-node results per request, added a few at a time
STEP = 6  # parts added to one request per step
CACHE_ENTRIES = 4000  # long-lived LRU entries (an app-level cache)
EXCEPTION_EVERY = 7  # one request in N raises and keeps the caught exception


# =============================================================================================
# The child: one run of the workload under one setting

class Node:
    """A workflow node's result, pointing back at its request (a cycle, as ORM objects and
    parent links make them)."""

    def __init__(self, request: dict, index: int):
        self.request = request
        self.index = index
        self.inputs = {f"var_{k}": f"value {index}-{k} " * 3 for k in range(6)}
        self.outputs = {"text": f"answer {index} " * 8, "tokens": [index, index + 1, index + 2],
                        "metadata": {"node": self, "usage": {"prompt": index, "completion": 2 * index}}}


def failing_step(request: dict) -> None:
    raise ValueError(f"node failed in request {request['id']}")


def new_request(rid: int) -> dict:
    request = {"id": rid, "headers": {f"x-header-{k}": f"{rid}-{k}" * 4 for k in range(16)},
               "args": [{"name": f"arg{k}", "value": str(rid * k)} for k in range(8)], "nodes": []}
    request["context"] = {"request": request, "trace": []}  # cycle through a context dict
    return request


def advance(request: dict) -> None:
    start = len(request["nodes"])
    for index in range(start, start + STEP):
        node = Node(request, index)
        request["nodes"].append(node)
        request["context"]["trace"].append((index, node.outputs))


def finish(request: dict, cache: OrderedDict) -> None:
    if request["id"] % EXCEPTION_EVERY == 0:
        try:
            failing_step(request)
        except ValueError as error:  # the traceback's frames hold `request`: another cycle
            request["error"] = error
    cache[request["id"]] = {"answer": request["nodes"][-1].outputs["text"],
                            "inputs": dict(request["nodes"][0].inputs)}
    cache.move_to_end(request["id"])
    while len(cache) > CACHE_ENTRIES:
        cache.popitem(last=False)


def child(setting: str, requests: int) -> dict:
    if setting != DEFAULT:
        gc.set_threshold(*map(int, setting.split(",")))
    threshold = gc.get_threshold()
    rss_start_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    rng = random.Random(12)
    cache: OrderedDict = OrderedDict()
    in_flight: list[dict] = []
    started = time.perf_counter()
    next_id = done = 0
    while done < requests:
        while len(in_flight) < IN_FLIGHT and next_id < requests:
            in_flight.append(new_request(next_id))
            next_id += 1
        slot = rng.randrange(len(in_flight))
        request = in_flight[slot]
        advance(request)
        if len(request["nodes"]) >= PARTS:
            finish(request, cache)
            in_flight[slot] = in_flight[-1]
            in_flight.pop()
            done += 1
        del request
    seconds = time.perf_counter() - started
    stats = gc.get_stats()
    return {"setting": setting, "threshold": list(threshold), "seconds": round(seconds, 3),
            "rss_start_mib": round(rss_start_kib / 1024, 1),
            "peak_rss_mib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
            "collections": [generation["collections"] for generation in stats],
            "collected": sum(generation["collected"] for generation in stats)}


# =============================================================================================
# The parent: every configuration, several times, side by side

def configurations() -> dict[str, dict]:
    """label -> setting and what it is: the interpreter's default, each distinct threshold the
    plan sets (with the presets that get it), and a higher gen-0 threshold for reference."""
    default = tuple(gc.get_threshold())
    by_threshold: dict[tuple, list[str]] = {}
    for preset, (cores, memory_mib) in PRESETS.items():
        threshold = tuple(make_plan(HostSize(cores, memory_mib), Options()).dify.gc_threshold)
        by_threshold.setdefault(threshold, []).append(preset)
    configs = {DEFAULT: {"setting": DEFAULT, "threshold": list(default),
                         "note": f"this interpreter's default, {','.join(map(str, default))}, set by nobody"}}
    for threshold, presets in by_threshold.items():
        label = f"edgefit {'/'.join(presets)}"
        text = ",".join(map(str, threshold))
        if threshold == default:
            configs[DEFAULT]["note"] += f"; also what the plan sets for {'/'.join(presets)} ({text})"
            continue
        configs[label] = {"setting": text, "threshold": list(threshold), "presets": presets,
                          "note": f"the plan's gc_threshold for {'/'.join(presets)}: {text}"}
    configs["gen-0 2000"] = {"setting": "2000,10,10", "threshold": [2000, 10, 10],
                             "note": "reference: a higher gen-0 threshold (2000, the young threshold of newer "
                                     "CPython collectors) on this interpreter's collector"}
    return configs


def run_child(setting: str, requests: int, timeout: float) -> dict:
    argv = [sys.executable, str(Path(__file__).resolve()), "--child", setting, str(requests)]
    started = time.monotonic()
    result = subprocess.run(argv, capture_output=True, text=True, timeout=timeout, check=True)
    return {**json.loads(result.stdout), "process_seconds": round(time.monotonic() - started, 2)}


def run(profile: "GcProfile", deadline: Deadline, log) -> dict:
    configs = configurations()
    runs: list[dict] = []
    skipped = 0
    slowest = 10.0  # seconds one child may take before the first has run
    for repetition in range(profile.repetitions):
        order = list(configs)
        if repetition % 2:  # alternate who goes first
            order.reverse()
        for label in order:
            if deadline.left() < slowest * 1.5 + 2:
                skipped += 1
                continue
            child_run = run_child(configs[label]["setting"], profile.requests, timeout=max(30.0, slowest * 4))
            slowest = max(slowest if runs else 0.0, child_run["process_seconds"])
            runs.append({"config": label, "repetition": repetition, **child_run})
            log(f"  {label:<22} run {repetition + 1}: peak RSS {child_run['peak_rss_mib']} MiB, "
                f"{child_run['seconds']} s, collections {child_run['collections']}")
    summary = {}
    for label in configs:
        mine = [r for r in runs if r["config"] == label]
        if not mine:
            continue
        rss = [r["peak_rss_mib"] for r in mine]
        secs = [r["seconds"] for r in mine]
        summary[label] = {"runs": len(mine), "threshold": configs[label]["threshold"],
                          "peak_rss_mib_median": round(statistics.median(rss), 1),
                          "peak_rss_mib_range": [min(rss), max(rss)],
                          "seconds_median": round(statistics.median(secs), 3),
                          "seconds_range": [min(secs), max(secs)],
                          "collections_median": [int(statistics.median(c)) for c in zip(*(r["collections"] for r in mine))]}
    return {"python": sys.version.split()[0], "requests": profile.requests, "repetitions": profile.repetitions,
            "workload": {"in_flight": IN_FLIGHT, "parts": PARTS, "step": STEP, "cache_entries": CACHE_ENTRIES,
                         "exception_every": EXCEPTION_EVERY},
            "configs": configs, "runs": runs, "summary": summary, "skipped_runs": skipped,
            "verdicts": verdicts(summary)}


def verdicts(summary: dict) -> list[str]:
    """One plain sentence per plan setting against the default: does it help here?"""
    base = summary.get(DEFAULT)
    out = []
    for label, row in summary.items():
        if not label.startswith("edgefit") or not base:
            continue
        rss = row["peak_rss_mib_median"] / base["peak_rss_mib_median"]
        secs = row["seconds_median"] / base["seconds_median"]
        if rss <= 0.95:
            memory = f"lowers peak RSS to {rss:.2f}x the default"
        elif rss >= 1.05:
            memory = f"RAISES peak RSS to {rss:.2f}x the default: it does not help"
        else:
            memory = f"does not measurably change peak RSS ({rss:.2f}x the default, within 5%)"
        out.append(f"{label} ({','.join(map(str, row['threshold']))}): {memory}; wall time {secs:.2f}x the default.")
    return out


def report(result: dict) -> str:
    out = [f"GC thresholds: {result['requests']} Dify-shaped requests per run ({IN_FLIGHT} in flight, "
           f"cycles + a {CACHE_ENTRIES}-entry cache), each setting in a fresh Python {result['python']}, "
           f"{result['repetitions']} repetitions interleaved"]
    for label, config in result["configs"].items():
        out.append(f"  {label}: {config['note']}")
    rows = []
    base = result["summary"].get(DEFAULT)
    for label, row in result["summary"].items():
        rows.append([label, ",".join(map(str, row["threshold"])), row["runs"], row["peak_rss_mib_median"],
                     f"{row['peak_rss_mib_range'][0]}-{row['peak_rss_mib_range'][1]}",
                     round(row["peak_rss_mib_median"] / base["peak_rss_mib_median"], 2) if base else None,
                     row["seconds_median"], f"{row['seconds_range'][0]}-{row['seconds_range'][1]}",
                     round(row["seconds_median"] / base["seconds_median"], 2) if base else None,
                     "/".join(map(str, row["collections_median"]))])
    out.append(table(["config", "thresholds", "runs", "peak RSS MiB", "range", "x default", "seconds",
                      "range", "x default", "collections gen0/1/2"], rows))
    out += [f"  {line}" for line in result["verdicts"]]
    if result["skipped_runs"]:
        out.append(f"  skipped: {result['skipped_runs']} runs, out of time")
    return "\n".join(out)


if __name__ == "__main__":
    if CHILD:
        print(json.dumps(child(sys.argv[2], int(sys.argv[3]))))
        sys.exit(0)
    sys.exit(main(__doc__, PROFILES, run, report))
