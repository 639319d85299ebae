"""Telling our libvirtd from another one (no VM needed)."""
import subprocess
import sys
import time

from tests.vm import netns
from tests.vm.proc import process_name

# Renames itself to "libvirtd" (PR_SET_NAME), says so, then sleeps or exits at once.
NAMED_LIBVIRTD = """
import ctypes, sys
ctypes.CDLL(None).prctl(15, b"libvirtd", 0, 0, 0)
print("named", flush=True)
if sys.argv[1] == "sleep":
    sys.stdin.read()
"""


def _named_process(mode: str) -> subprocess.Popen:
    proc = subprocess.Popen([sys.executable, "-c", NAMED_LIBVIRTD, mode], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "named"
    return proc


def _wait_zombie(pid: int) -> None:
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        with open(f"/proc/{pid}/stat") as f:
            if f.read().split(") ", 1)[1][0] == "Z":
                return
        time.sleep(0.05)
    raise AssertionError(f"pid {pid} did not become a zombie")


def test_a_libvirtd_that_has_exited_but_is_not_yet_reaped_is_not_another_libvirtd():
    zombie = _named_process("exit")  # not waited for: it stays a zombie of this process
    live = _named_process("sleep")
    try:
        _wait_zombie(zombie.pid)
        assert process_name(zombie.pid) == "libvirtd"
        found = netns.foreign_libvirtd_pids()
        assert live.pid in found, "a running libvirtd that is not ours is found"
        assert zombie.pid not in found, "an exited one waiting for its reaper is not"
    finally:
        live.stdin.close()
        live.wait(timeout=10)
        zombie.wait(timeout=10)


def test_stop_waits_until_the_reaper_has_collected_the_daemon(monkeypatch, tmp_path):
    said = []
    monkeypatch.setattr(netns, "say", said.append)
    proc = _named_process("exit")
    _wait_zombie(proc.pid)
    reaped_after = time.monotonic() + 0.5

    def reap_later() -> None:
        time.sleep(max(0.0, reaped_after - time.monotonic()))
        proc.wait(timeout=10)

    import threading

    threading.Thread(target=reap_later, daemon=True).start()
    netns._wait_reaped(proc.pid, "libvirtd")
    assert time.monotonic() >= reaped_after - 0.01
    assert not any("not reaped" in line for line in said)
