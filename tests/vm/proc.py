"""Running commands with a time bound and visible progress, and timing phases."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from contextlib import contextmanager
from typing import Callable, Iterator, Sequence

HEARTBEAT_SECONDS = 15


def say(message: str) -> None:
    print(f"[vm] {time.strftime('%H:%M:%S')} {message}", file=sys.stderr, flush=True)


class CommandFailed(RuntimeError):
    pass


@contextmanager
def phase(name: str, timings: dict[str, float] | None = None) -> Iterator[None]:
    started = time.monotonic()
    say(f"{name} ...")
    try:
        yield
    finally:
        took = time.monotonic() - started
        if timings is not None:
            timings[name] = round(took, 1)
        say(f"{name}: {took:.1f} s")


def run(
    cmd: Sequence[str],
    *,
    timeout: float,
    label: str | None = None,
    env: dict[str, str] | None = None,
    cwd: str | os.PathLike | None = None,
    echo: Callable[[str], bool] = lambda line: True,
    check: bool = True,
) -> str:
    """Runs cmd, echoing the lines `echo` accepts, a heartbeat while it is silent, and kills its
    whole process group when `timeout` passes. Returns the output (stdout and stderr)."""
    label = label or os.path.basename(cmd[0])
    proc = subprocess.Popen(
        list(cmd), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        env=env, cwd=cwd, start_new_session=True,
    )
    lines: list[str] = []
    last_output = [time.monotonic()]

    def pump() -> None:
        assert proc.stdout is not None
        for line in proc.stdout:
            lines.append(line)
            last_output[0] = time.monotonic()
            if echo(line):
                print(f"    {label}: {line.rstrip()}", file=sys.stderr, flush=True)

    reader = threading.Thread(target=pump, daemon=True)
    reader.start()
    started = time.monotonic()
    deadline = started + timeout
    try:
        while proc.poll() is None:
            if time.monotonic() > deadline:
                raise CommandFailed(f"{label} took longer than {timeout:.0f} s and was stopped: {' '.join(cmd)}")
            if time.monotonic() - last_output[0] > HEARTBEAT_SECONDS:
                say(f"    {label}: still running ({time.monotonic() - started:.0f} s of at most {timeout:.0f} s)")
                last_output[0] = time.monotonic()
            time.sleep(0.5)
    except BaseException:  # the timeout above, Ctrl-C, SIGTERM: nothing of ours keeps running
        _kill_group(proc)
        raise
    reader.join(timeout=5)
    output = "".join(lines)
    if check and proc.returncode != 0:
        tail = "".join(lines[-25:])
        raise CommandFailed(f"{label} failed (exit {proc.returncode}): {' '.join(cmd)}\n{tail}")
    return output


def _kill_group(proc: subprocess.Popen) -> None:
    # The group is the one start_new_session made for this command: only what we started.
    for sig in (signal.SIGTERM, signal.SIGKILL):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(timeout=10)
            return
        except subprocess.TimeoutExpired:
            continue


def wait_until(what: str, probe: Callable[[], bool], *, timeout: float, interval: float = 1.0) -> float:
    """Polls probe until it is true; prints progress; raises after timeout. Returns seconds waited."""
    started = time.monotonic()
    next_report = started + HEARTBEAT_SECONDS
    while True:
        if probe():
            return time.monotonic() - started
        now = time.monotonic()
        if now - started > timeout:
            raise TimeoutError(f"gave up waiting for {what} after {timeout:.0f} s")
        if now >= next_report:
            say(f"    waiting for {what} ({now - started:.0f} s of at most {timeout:.0f} s)")
            next_report = now + HEARTBEAT_SECONDS
        time.sleep(interval)


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    # A zombie child of ours counts as gone.
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(") ", 1)[1][0] != "Z"
    except OSError:
        return False


def process_name(pid: int) -> str | None:
    try:
        with open(f"/proc/{pid}/comm") as f:
            return f.read().strip()
    except OSError:
        return None


def process_cmdline(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return f.read().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


def stop_pid(pid: int, *, name: str, comm: str | None = None, cmdline_has: str | None = None,
             timeout: float = 15) -> None:
    """Stops one process we started (by its recorded PID): TERM, then KILL after timeout.
    With comm or cmdline_has, a recorded PID that now belongs to another program is left alone."""
    if not pid_alive(pid):
        return
    if (comm is not None and process_name(pid) != comm[:15]) or \
            (cmdline_has is not None and cmdline_has not in process_cmdline(pid)):
        say(f"pid {pid} is no longer {name} (it is {process_cmdline(pid)[:80]!r}); leaving it alone")
        return
    os.kill(pid, signal.SIGTERM)
    try:
        wait_until(f"{name} (pid {pid}) to exit", lambda: not pid_alive(pid), timeout=timeout, interval=0.2)
    except TimeoutError:
        say(f"{name} (pid {pid}) ignored SIGTERM; killing it")
        os.kill(pid, signal.SIGKILL)
        wait_until(f"{name} (pid {pid}) to die", lambda: not pid_alive(pid), timeout=10, interval=0.2)
