"""TCP forwarder from the machine's loopback into the test hosts' network namespace.

The guests' SSH ports are reachable only inside the namespace (libvirt runs there). pyinfra and
the tests connect to 127.0.0.1:PORT instead; this process carries each connection across.
It inherits a listening socket bound in the machine's namespace, then moves itself into the
test namespace (sockets keep the namespace they were created in), so every connection it
opens goes to the guest.

    python -m tests.vm.forward LISTEN_FD NETNS TARGET_HOST TARGET_PORT HOST_NAME
"""
from __future__ import annotations

import ctypes
import os
import socket
import subprocess
import sys
import threading
from pathlib import Path

CLONE_NEWNET = 0x40000000
CONNECT_TIMEOUT = 10
STAY = "-"  # as NETNS: forward within the caller's own namespace (the forwarder's own test)


def enter_netns(name: str) -> None:
    libc = ctypes.CDLL(None, use_errno=True)
    fd = os.open(f"/run/netns/{name}", os.O_RDONLY)
    try:
        if libc.setns(fd, CLONE_NEWNET) != 0:
            raise OSError(ctypes.get_errno(), f"setns into {name} failed")
    finally:
        os.close(fd)


def pump(source: socket.socket, sink: socket.socket) -> None:
    try:
        while data := source.recv(65536):
            sink.sendall(data)
    except OSError:
        pass
    finally:
        for s, how in ((sink, socket.SHUT_WR), (source, socket.SHUT_RD)):
            try:
                s.shutdown(how)
            except OSError:
                pass


def serve(listener: socket.socket, target: tuple[str, int]) -> None:
    while True:
        try:
            client, _ = listener.accept()
        except (BlockingIOError, InterruptedError, ConnectionAbortedError):
            continue  # a client that gave up between the kernel's queue and accept(): wait on
        try:
            upstream = socket.create_connection(target, timeout=CONNECT_TIMEOUT)
            upstream.settimeout(None)
        except OSError:
            client.close()
            continue
        for a, b in ((client, upstream), (upstream, client)):
            threading.Thread(target=pump, args=(a, b), daemon=True).start()


def spawn(netns: str, target_host: str, target_port: int, log_path: Path, host_name: str) -> tuple[int, int]:
    """Starts a forwarder in the background; returns (pid, port on 127.0.0.1)."""
    listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    listener.bind(("127.0.0.1", 0))
    listener.listen(16)
    port = listener.getsockname()[1]
    repo = Path(__file__).resolve().parents[2]
    with open(log_path, "ab") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "tests.vm.forward", str(listener.fileno()), netns, target_host, str(target_port),
             host_name],
            cwd=repo, stdin=subprocess.DEVNULL, stdout=log, stderr=log,
            pass_fds=[listener.fileno()], start_new_session=True,
        )
    listener.close()
    return proc.pid, port


def cmdline_marker(host_name: str) -> str:
    """What a forwarder's command line ends with (harness: stop it, look for leftovers)."""
    return f" 22 {host_name} "


def main(argv: list[str]) -> None:
    listen_fd, netns, host, port, _host_name = argv  # the name: to find it in a process list
    listener = socket.socket(fileno=int(listen_fd))
    # The fd comes in with whatever O_NONBLOCK the parent left on it: a pytest process that
    # imported pyinfra_cli is gevent-patched, and gevent's sockets are non-blocking, so accept()
    # here would fail at once with EAGAIN and take every SSH connection to the guest with it.
    listener.setblocking(True)
    if netns != STAY:
        enter_netns(netns)
    serve(listener, (host, int(port)))


if __name__ == "__main__":
    main(sys.argv[1:])
