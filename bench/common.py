"""What every bench command shares: the run's size (Profile) and time limit (Deadline), PSS
sampling of the server processes a bench started, plain-text tables, the machine and program
versions a result was measured on, and the command-line frame (--quick | --full, --json FILE,
exit code 77 for a missing program, SIGTERM unwinding like Ctrl-C).

Not a bench itself: bench/postgres_pool.py, bench/redis_policy.py and bench/gc_thresholds.py
each run one comparison on top of it.
"""

from __future__ import annotations

import argparse
import json
import platform
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

REPO = Path(__file__).resolve().parents[1]
for _path in (str(REPO), str(REPO / "tests")):
    if _path not in sys.path:
        sys.path.insert(0, _path)

import psutil  # noqa: E402  (an edgefit dependency)

from edgefit.plan import Plan  # noqa: E402
from edgefit.secrets import Secrets  # noqa: E402
from edgefit.render import StackFile  # noqa: E402
from servers_helpers import PG_BIN, parse_env, preset_plan, render_files  # noqa: E402

PRESET = "2C4G"  # the plan the server benches render: the smallest size edgefit targets
START_TIMEOUT_S = 30
EXIT_MISSING_TOOL = 77  # what automake/ctest call "skipped"


@dataclass(frozen=True)
class Profile:
    """How big one run is: `name` (quick, default or full) and the deadline of the whole run.
    Each bench subclasses it with its own sizes."""
    name: str
    deadline_s: float


@dataclass(frozen=True)
class RenderedStack:
    """The PRESET plan and its files as a deploy renders them, with freshly generated secrets."""
    plan: Plan
    files: dict[str, StackFile]
    env: dict[str, str]  # the rendered .env


def rendered_stack(preset: str = PRESET) -> RenderedStack:
    plan = preset_plan(preset)
    files = render_files(plan, Secrets.generate())
    return RenderedStack(plan, files, parse_env(files[".env"].content))


class Deadline:
    def __init__(self, seconds: float):
        self.end = time.monotonic() + seconds

    def left(self) -> float:
        return self.end - time.monotonic()


def mib(value_bytes: int) -> float:
    return round(value_bytes / 1024 / 1024, 1)


# =============================================================================================
# Memory: PSS of the server processes started here

def tree_pss(root_pid: int) -> tuple[int, int]:
    """PSS in bytes of a process and all its descendants (a postmaster and its backends), and
    how many of them are TCP client backends (Postgres titles them "postgres: user db
    127.0.0.1(port) ..."). Processes that exit between listing and reading are skipped."""
    try:
        root = psutil.Process(root_pid)
        procs = [root, *root.children(recursive=True)]
    except psutil.NoSuchProcess:
        return 0, 0
    total = backends = 0
    for proc in procs:
        try:
            total += proc.memory_full_info().pss
            if proc.pid != root_pid and "127.0.0.1(" in " ".join(proc.cmdline()):
                backends += 1
        except (psutil.NoSuchProcess, psutil.ZombieProcess, psutil.AccessDenied):
            pass
    return total, backends


class PssSampler:
    """Samples the summed PSS of named process trees in a thread; keeps the peak of the sum
    and each tree's value at that peak."""

    def __init__(self, roots: dict[str, int], interval: float = 0.25):
        self.roots = roots
        self.interval = interval
        self.peak = 0
        self.peak_parts: dict[str, int] = {}
        self.peak_backends = 0  # client backends of the trees, at their own peak
        self.samples = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def sample(self) -> None:
        measured = {name: tree_pss(pid) for name, pid in self.roots.items()}
        parts = {name: pss for name, (pss, _) in measured.items()}
        self.peak_backends = max(self.peak_backends, sum(backends for _, backends in measured.values()))
        self.samples += 1
        if sum(parts.values()) > self.peak:
            self.peak = sum(parts.values())
            self.peak_parts = parts

    def _run(self) -> None:
        while not self._stop.is_set():
            self.sample()
            self._stop.wait(self.interval)

    def __enter__(self):
        self.sample()
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join(timeout=30)
        self.sample()


# =============================================================================================
# Output

def table(headers: list[str], rows: list[list]) -> str:
    cells = [[str(c) for c in headers]] + [["-" if c is None else str(c) for c in row] for row in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(headers))]
    lines = []
    for n, row in enumerate(cells):
        lines.append("  ".join(c.rjust(w) if n and c.replace(".", "").replace("-", "").isdigit() else c.ljust(w)
                               for c, w in zip(row, widths)).rstrip())
        if n == 0:
            lines.append("  ".join("-" * w for w in widths))
    return "\n".join(lines)


def _first_line(argv: list[str]) -> str | None:
    try:
        return subprocess.run(argv, capture_output=True, text=True, timeout=10).stdout.splitlines()[0]
    except (OSError, IndexError, subprocess.SubprocessError):
        return None


def machine() -> dict:
    """The machine a result was measured on: cores, memory, CPU model, kernel, OS, Python."""
    cpu_model = None
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu_model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    os_release = {}
    try:
        for line in Path("/etc/os-release").read_text().splitlines():
            key, _, value = line.partition("=")
            os_release[key] = value.strip('"')
    except OSError:
        pass
    return {"cpus": psutil.cpu_count(), "cpu_model": cpu_model,
            "memory_mib": psutil.virtual_memory().total // 1024 // 1024,
            "kernel": platform.release(), "os": os_release.get("PRETTY_NAME"),
            "python": f"{platform.python_implementation()} {platform.python_version()}",
            "load_1m": round(psutil.getloadavg()[0], 2)}


def server_versions() -> dict:
    return {"postgres": _first_line([str(PG_BIN / "postgres"), "--version"]),
            "pgbouncer": _first_line(["pgbouncer", "--version"]),
            "redis": " ".join((_first_line(["redis-server", "--version"]) or "").split()[:3]) or None}


def describe_machine(meta: dict) -> str:
    m = meta["machine"]
    line = (f"{m['cpus']} CPUs ({m['cpu_model']}), {m['memory_mib']} MiB, {m['os']}, kernel {m['kernel']}, "
            f"{m['python']}, load {m['load_1m']} at start")
    versions = ", ".join(v for v in (meta.get("versions") or {}).values() if v)
    return line + (f"; {versions}" if versions else "")


# =============================================================================================
# The command line

def main(doc: str, profiles: dict[str, Profile], run: Callable[[Profile, Deadline, Callable], dict],
         report: Callable[[dict], str], *, versions: Callable[[], dict] = dict,
         argv: list[str] | None = None) -> int:
    """Parse --quick | --full and --json FILE, run one bench within its profile's deadline,
    print its report and write its JSON. `run` returns the bench's results, merged under
    "meta" (profile, machine, versions, seconds) into the JSON."""
    parser = argparse.ArgumentParser(description=doc.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    size = parser.add_mutually_exclusive_group()
    size.add_argument("--quick", action="store_true", help=f"the smallest run (limit {profiles['quick'].deadline_s:g} s)")
    size.add_argument("--full", action="store_true", help=f"the largest run (limit {profiles['full'].deadline_s:g} s)")
    parser.add_argument("--json", metavar="FILE", help="also write the results as JSON to FILE ('-': stdout)")
    args = parser.parse_args(argv)
    profile = profiles["quick" if args.quick else "full" if args.full else "default"]
    deadline = Deadline(profile.deadline_s)
    started = time.monotonic()
    quiet = args.json == "-"

    def log(message: str) -> None:
        print(message, file=sys.stderr if quiet else sys.stdout, flush=True)

    # A SIGTERM unwinds like Ctrl-C, so every server started here is stopped and every
    # temporary directory removed.
    def on_term(signum, frame):
        raise KeyboardInterrupt
    signal.signal(signal.SIGTERM, on_term)

    import pytest  # servers_helpers reports a missing program as a pytest skip
    meta = {"profile": profile.name, "command": " ".join(["bench/" + Path(sys.argv[0]).name, *sys.argv[1:]]),
            "machine": machine(), "versions": versions()}
    try:
        result = {"meta": meta, **run(profile, deadline, log)}
    except pytest.skip.Exception as missing:
        print(f"cannot run the bench: {missing.msg}", file=sys.stderr)
        return EXIT_MISSING_TOOL
    meta["seconds"] = round(time.monotonic() - started, 1)
    text = report(result) + f"\n\n{profile.name} profile, {meta['seconds']} s in all; {describe_machine(meta)}"
    print(text, file=sys.stderr if quiet else sys.stdout)
    if args.json == "-":
        json.dump(result, sys.stdout, indent=2)
        print()
    elif args.json:
        Path(args.json).write_text(json.dumps(result, indent=2) + "\n")
    return 0
