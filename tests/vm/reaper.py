"""Runs a command as a child subreaper: orphaned descendants are reaped at once.

PID 1 on these machines is not an init that reaps promptly. libvirtd double-forks every QEMU
it starts (capability probes, the guests), so each one that exits stays a zombie of PID 1, and
libvirtd, which waits for the PID to vanish, stalls for many seconds each time (it made
`vagrant up` take ~170 s instead of ~60 s). Under this reaper the orphans become our children.

    python -m tests.vm.reaper COMMAND [ARGS...]   (exits when the last descendant has exited)
"""
from __future__ import annotations

import ctypes
import os
import signal
import subprocess
import sys

PR_SET_CHILD_SUBREAPER = 36


def main(argv: list[str]) -> int:
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) != 0:
        raise OSError(ctypes.get_errno(), "prctl(PR_SET_CHILD_SUBREAPER) failed")
    # Stopping libvirtd is done by its PID; the reaper itself just outlives its descendants.
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    command = subprocess.Popen(argv)
    status = 0
    while True:
        try:
            pid, wait_status = os.wait()
        except ChildProcessError:
            return status
        if pid == command.pid:
            status = os.waitstatus_to_exitcode(wait_status)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
