"""Telling our libvirtd from another one (no VM needed).

Each case runs in a fresh interpreter: the suite's own may be gevent-patched (pyinfra_cli), and
gevent reaps every child at once, so no zombie could be held there."""
import json
import subprocess
import sys

from tests.vm import config

CASES = r'''
import ctypes, json, os, subprocess, sys, threading, time
from tests.vm import netns
from tests.vm.proc import process_name

NAMED = "import ctypes, sys\nctypes.CDLL(None).prctl(15, b'libvirtd', 0, 0, 0)\nprint('named', flush=True)\n" \
        "sys.stdin.read() if sys.argv[1] == 'sleep' else None\n"

def named(mode):
    proc = subprocess.Popen([sys.executable, "-c", NAMED, mode], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "named"
    return proc

def zombie():
    proc = named("exit")  # not waited for: it stays a zombie of this process
    for _ in range(200):
        with open(f"/proc/{proc.pid}/stat") as f:
            if f.read().split(") ", 1)[1][0] == "Z":
                return proc
        time.sleep(0.05)
    raise AssertionError("no zombie")

out = {}
if sys.argv[1] == "foreign":
    dead, live = zombie(), named("sleep")
    found = netns.foreign_libvirtd_pids()
    out = {"zombie_named": process_name(dead.pid), "live_found": live.pid in found, "zombie_found": dead.pid in found}
    live.stdin.close(); live.wait(10); dead.wait(10)
elif sys.argv[1] == "reaped":
    said = []
    netns.say = said.append
    dead = zombie()
    reap_at = time.monotonic() + 0.5
    threading.Thread(target=lambda: (time.sleep(max(0, reap_at - time.monotonic())), dead.wait(10)), daemon=True).start()
    netns._wait_reaped(dead.pid, "libvirtd")
    out = {"waited_until_reaped": time.monotonic() >= reap_at - 0.01, "gone": not os.path.exists(f"/proc/{dead.pid}"),
           "said": said}
print(json.dumps(out))
'''


def run_case(name: str) -> dict:
    done = subprocess.run([sys.executable, "-c", CASES, name], cwd=config.REPO, capture_output=True, text=True,
                          timeout=60)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout.splitlines()[-1])


def test_a_libvirtd_that_has_exited_but_is_not_yet_reaped_is_not_another_libvirtd():
    got = run_case("foreign")
    assert got["zombie_named"] == "libvirtd"
    assert got["live_found"], "a running libvirtd that is not ours is found"
    assert not got["zombie_found"], "an exited one waiting for its reaper is not"


def test_stop_waits_until_the_reaper_has_collected_the_daemon():
    got = run_case("reaped")
    assert got == {"waited_until_reaped": True, "gone": True, "said": []}
