#!/usr/bin/env python3
"""Deploy and verify speed on the Vagrant test hosts, against pyinfra's own floor, in one run.

The floor is pyinfra with a single `server.shell("true")` operation against the same host in
the same run: connecting, one fact-less operation, disconnecting. Against it: a deploy from bare,
a no-op re-deploy (the host already at its plan), a one-value change (edgefit_domain, which
restarts nginx only), and `edgefit verify` for one host and for both hosts in parallel. Each
repeated timing is the median of --repeat runs; ratios are to the floor's median.

    .venv/bin/python bench/deploy_speed.py [--repeat 3] [--window 10] [--json FILE] [--keep-up]

It boots edge-small and edge-medium (tests/vm; software emulation, minutes) unless they are
already up, deploys them from bare when they have no plan of record, and tears down only the
hosts it booted (unless --keep-up). Only the project's own test hosts are contacted.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

PYINFRA = REPO / ".venv" / "bin" / "pyinfra"
EDGEFIT = REPO / ".venv" / "bin" / "edgefit"
INVENTORY = REPO / "inventory" / "vagrant.py"
HOSTS = ("edge-small", "edge-medium")
DEPLOY_TIMEOUT_S = 2400
STEP_TIMEOUT_S = 600
FLOOR_DEPLOY = 'from pyinfra.operations import server\n\nserver.shell(name="true", commands=["true"])\n'


def timed(argv: list[str], timeout: float = STEP_TIMEOUT_S) -> tuple[float, subprocess.CompletedProcess]:
    started = time.monotonic()
    done = subprocess.run(argv, cwd=REPO, capture_output=True, text=True, timeout=timeout)
    return time.monotonic() - started, done


def must(label: str, seconds: float, done: subprocess.CompletedProcess, codes=(0,)) -> float:
    if done.returncode not in codes:
        raise SystemExit(f"bench/deploy_speed.py: {label} failed (exit {done.returncode}):\n"
                         f"{(done.stderr + done.stdout)[-3000:]}")
    print(f"  {label}: {seconds:.1f} s", flush=True)
    return seconds


def operations_run(done: subprocess.CompletedProcess, host: str) -> int | None:
    """Operations pyinfra ran on host (its --json output), changed or not."""
    start = done.stdout.find("{")
    try:
        results = json.loads(done.stdout[start:])["results"]
    except (ValueError, KeyError):
        return None
    return sum(1 for op in results.get("operations", []) if host in op.get("success", []) + op.get("error", []) + op.get("no_change", []))


def deploy(*extra: str, limit: str = "edge-small", timeout: float = STEP_TIMEOUT_S):
    return timed([str(PYINFRA), "-y", "--json", str(INVENTORY), "deploy.py", "--limit", limit, *extra], timeout)


def has_record(host: str) -> bool:
    from tests.vm import harness
    from tests.vm.ssh import run_ssh
    entry = harness.read_hosts()[host]
    return run_ssh(entry, "test -s /etc/edgefit/plan.json", check=False).returncode == 0


def measure(args) -> dict:
    from tests.images.build import build_images
    from tests.vm import harness

    build_images()
    already = set(harness.read_hosts())
    print(f"boot {', '.join(h for h in HOSTS if h not in already) or 'nothing (both up)'}", flush=True)
    harness.up(HOSTS, wait_for_docker=True)
    booted = [h for h in HOSTS if h not in already]
    figures: dict = {"machine": {"python": platform.python_version(), "kernel": platform.release()}}
    try:
        for host in HOSTS:
            if not has_record(host):
                seconds, done = deploy(limit=host, timeout=DEPLOY_TIMEOUT_S)
                figures[f"deploy_from_bare_{host}_s"] = must(f"deploy {host} from bare", seconds, done)

        with tempfile.TemporaryDirectory() as scratch:
            floor_file = Path(scratch) / "floor.py"
            floor_file.write_text(FLOOR_DEPLOY)
            floors, noops, noop_ops = [], [], []
            for _ in range(args.repeat):  # interleaved: load on the machine hits both alike
                seconds, done = timed([str(PYINFRA), "-y", str(INVENTORY), str(floor_file), "--limit", "edge-small"])
                floors.append(must("floor: pyinfra server.shell('true')", seconds, done))
                seconds, done = deploy()
                noops.append(must("no-op deploy", seconds, done))
                noop_ops.append(operations_run(done, "edge-small"))
        seconds, done = deploy("--data", "edgefit_domain=bench.invalid")
        change = must("one-value change (edgefit_domain)", seconds, done)
        seconds, done = deploy()
        must("the value back", seconds, done)
        verify_one, verify_both, verify_exits = [], [], []
        for _ in range(args.repeat):  # its time is the figure; a verdict of 1 or 2 is kept beside it
            seconds, done = timed([str(EDGEFIT), "verify", str(INVENTORY), "--limit", "edge-small",
                                   "--window", str(args.window)])
            verify_one.append(must("verify edge-small", seconds, done, codes=(0, 1, 2)))
            verify_exits.append(done.returncode)
            if len(HOSTS) > 1:
                seconds, done = timed([str(EDGEFIT), "verify", str(INVENTORY), "--window", str(args.window)])
                verify_both.append(must("verify both hosts", seconds, done, codes=(0, 1, 2)))
                verify_exits.append(done.returncode)
    finally:
        if booted and not args.keep_up:
            harness.destroy(booted)

    floor = statistics.median(floors)
    figures.update({
        "repeat": args.repeat, "window_s": args.window,
        "floor_s": round(floor, 2), "floor_runs_s": [round(x, 2) for x in floors],
        "noop_deploy_s": round(statistics.median(noops), 2), "noop_runs_s": [round(x, 2) for x in noops],
        "noop_operations": noop_ops,
        "noop_ratio": round(statistics.median(noops) / floor, 2),
        "one_value_change_s": round(change, 2), "one_value_change_ratio": round(change / floor, 2),
        "verify_exit_codes": verify_exits,
        "verify_one_host_s": round(statistics.median(verify_one), 2),
        "verify_both_hosts_s": round(statistics.median(verify_both), 2) if verify_both else None,
    })
    for host in HOSTS:
        key = f"deploy_from_bare_{host}_s"
        if key in figures:
            figures[key.replace("_s", "_ratio")] = round(figures[key] / floor, 1)
    return figures


def report(f: dict) -> str:
    rows = [("pyinfra floor: one `server.shell(\"true\")`", f["floor_s"], 1.0),
            ("no-op re-deploy (host at its plan)", f["noop_deploy_s"], f["noop_ratio"]),
            ("one-value change (edgefit_domain: nginx restarts)", f["one_value_change_s"], f["one_value_change_ratio"])]
    for host in HOSTS:
        if f"deploy_from_bare_{host}_s" in f:
            rows.append((f"deploy {host} from bare", f[f"deploy_from_bare_{host}_s"], f[f"deploy_from_bare_{host}_ratio"]))
    lines = ["| step | seconds | x floor |", "|---|---:|---:|"]
    lines += [f"| {name} | {seconds:.1f} | {ratio:g} |" for name, seconds, ratio in rows]
    lines += [f"| verify edge-small, {f['window_s']} s window | {f['verify_one_host_s']:.1f} | - |",
              *([f"| verify both hosts in parallel, {f['window_s']} s window | {f['verify_both_hosts_s']:.1f} | - |"]
                if f["verify_both_hosts_s"] is not None else []),
              "", f"Medians of {f['repeat']} runs (no-op runs: {f['noop_runs_s']} s; floor runs: {f['floor_runs_s']} s). "
              f"Operations pyinfra ran in each no-op deploy: {f['noop_operations']}. "
              f"verify's exit codes, in run order: {f['verify_exit_codes']}."]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=3, help="runs per repeated timing (default 3)")
    parser.add_argument("--window", type=int, default=10, help="verify's window in seconds (default 10)")
    parser.add_argument("--json", metavar="FILE", help="also write the figures as JSON")
    parser.add_argument("--keep-up", action="store_true", help="leave hosts this run booted running")
    parser.add_argument("--small-only", action="store_true",
                        help="edge-small only (no verify of both hosts): half the boot and deploy time")
    args = parser.parse_args(argv)
    if not 1 <= args.repeat <= 10 or not 2 <= args.window <= 120:
        parser.error("--repeat 1-10 and --window 2-120")
    global HOSTS
    if args.small_only:
        HOSTS = ("edge-small",)
    figures = measure(args)
    print(report(figures))
    if args.json:
        Path(args.json).write_text(json.dumps(figures, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
