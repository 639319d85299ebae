"""The project's own network namespace with its own virtlogd and libvirtd.

libvirt's management network (a bridge, dnsmasq, iptables rules) then exists only inside the
namespace and never touches the machine's own network. The daemons' PIDs are recorded in the
state directory so that `down` in another process stops exactly them.
"""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from . import config
from .proc import pid_alive, process_cmdline, process_name, run, say, stop_pid, wait_until

LIBVIRT_SOCKET = Path("/run/libvirt/libvirt-sock")
LIBVIRT_URI = "qemu:///system"
DAEMONS = ("virtlogd", "libvirtd")  # start order; stopped in reverse
REAPER_MODULE = "tests.vm.reaper"  # each daemon runs under one (see there why)


def netns_exec(*cmd: str) -> list[str]:
    return ["ip", "netns", "exec", config.NETNS, *cmd]


def virsh(*args: str, timeout: float = 60, check: bool = True) -> str:
    return run(netns_exec("virsh", "-q", "-c", LIBVIRT_URI, *args), timeout=timeout,
               label="virsh", echo=lambda line: False, check=check)


def _pids_file() -> Path:
    return config.state_dir() / "daemons.json"


def _recorded_pids() -> dict[str, int]:
    try:
        return json.loads(_pids_file().read_text())
    except (OSError, ValueError):
        return {}


def netns_exists() -> bool:
    return Path("/run/netns", config.NETNS).exists()


def daemons_running() -> dict[str, int]:
    return {name: pid for name, pid in _recorded_pids().items()
            if pid_alive(pid) and process_name(pid) == name}


def foreign_libvirtd_pids() -> list[int]:
    """Live libvirtd processes that are not ours (one would own the machine-wide socket).
    A zombie is not one: our last libvirtd stays a zombie until its reaper collects it, and CI
    once failed every later VM test because start() ran in that moment, right after stop()."""
    ours = _recorded_pids().get("libvirtd")
    return [int(entry.name) for entry in Path("/proc").iterdir()
            if entry.name.isdigit() and int(entry.name) != ours
            and process_name(int(entry.name)) == "libvirtd" and pid_alive(int(entry.name))]


def foreign_libvirtd() -> bool:
    return bool(foreign_libvirtd_pids())


def start() -> None:
    """Idempotent: creates what is missing."""
    if not netns_exists():
        run(["ip", "netns", "add", config.NETNS], timeout=30)
        run(netns_exec("ip", "link", "set", "lo", "up"), timeout=30)
    running = daemons_running()
    if "libvirtd" not in running and foreign_libvirtd():
        raise RuntimeError("another libvirtd is running on this machine; the test hosts need their own "
                           "(stop it, or use Vagrant with your own provider and a public box)")
    run_dir = config.state_dir() / "run"
    run_dir.mkdir(parents=True, exist_ok=True)
    pids = dict(running)
    for name in DAEMONS:
        if name in pids:
            continue
        pid_file = run_dir / f"{name}.pid"
        pid_file.unlink(missing_ok=True)
        # In the foreground under tests/vm/reaper.py (see there why); --pid-file names it.
        with open(config.state_dir() / f"{name}.log", "ab") as log:
            subprocess.Popen(
                netns_exec(sys.executable, "-m", REAPER_MODULE, name, "--pid-file", str(pid_file)),
                cwd=config.REPO, stdin=subprocess.DEVNULL, stdout=log, stderr=log, start_new_session=True,
            )
        wait_until(f"{name} pid file", pid_file.exists, timeout=config.DAEMON_START_TIMEOUT, interval=0.2)
        pids[name] = int(pid_file.read_text().split()[0])
        _pids_file().write_text(json.dumps(pids))
        say(f"started {name} in netns {config.NETNS} (pid {pids[name]})")
    wait_until("libvirtd to answer", _libvirt_answers, timeout=config.DAEMON_START_TIMEOUT, interval=0.5)
    _ensure_pool()


def _libvirt_answers() -> bool:
    return subprocess.run(netns_exec("virsh", "-q", "-c", LIBVIRT_URI, "version"),
                          capture_output=True, timeout=30).returncode == 0


def _ensure_pool() -> None:
    pools = virsh("pool-list", "--all", "--name").split()
    if config.POOL_NAME in pools:
        return
    config.POOL_DIR.mkdir(parents=True, exist_ok=True)
    # Transient: nothing is written to /etc/libvirt; the next libvirtd finds the volumes again.
    virsh("pool-create-as", config.POOL_NAME, "dir", "--target", str(config.POOL_DIR))


def volumes() -> list[str]:
    if config.POOL_NAME not in virsh("pool-list", "--name").split():
        return []
    return [line.split()[0] for line in virsh("vol-list", config.POOL_NAME).splitlines() if line.strip()]


def _wait_reaped(pid: int, name: str) -> None:
    """Its reaper collects it a moment after it exits; until then /proc still lists it (a zombie)."""
    try:
        wait_until(f"{name} (pid {pid}) to be reaped", lambda: not Path(f"/proc/{pid}").exists(),
                   timeout=10, interval=0.1)
    except TimeoutError:
        say(f"{name} (pid {pid}) exited but is not reaped yet; going on (start() ignores zombies)")


def pids_inside() -> list[int]:
    """Every process in our namespace."""
    out = subprocess.run(["ip", "netns", "pids", config.NETNS], capture_output=True, text=True, timeout=30).stdout
    return [int(pid) for pid in out.split()]


def _reapers() -> list[int]:
    return [pid for pid in pids_inside() if REAPER_MODULE in process_cmdline(pid)]


def _let_reapers_leave() -> None:
    """A reaper exits by itself once its daemon (and anything the daemon left) has; one that
    lingers past 10 s is killed."""
    try:
        wait_until("the daemons' reapers to exit", lambda: not _reapers(), timeout=10, interval=0.2)
    except TimeoutError:
        for pid in _reapers():
            stop_pid(pid, name="reaper", cmdline_has=REAPER_MODULE, timeout=1)


def stop() -> None:
    """Stops the daemons we started (by PID) and removes the namespace. Safe to call twice."""
    pids = _recorded_pids()
    for name in reversed(DAEMONS):
        if name in pids:
            stop_pid(pids[name], name=name, comm=name)
            _wait_reaped(pids[name], name)
            say(f"stopped {name} (pid {pids[name]})")
    _pids_file().unlink(missing_ok=True)
    if netns_exists():
        _let_reapers_leave()
        run(["ip", "netns", "delete", config.NETNS], timeout=30)
        say(f"removed netns {config.NETNS}")
