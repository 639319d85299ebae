"""The VM harness's TCP forwarder (tests/vm/forward.py), without a VM.

Every SSH connection to a test host goes through it. It is spawned from the pytest process,
which is gevent-patched once any test has imported pyinfra_cli; the listening socket it
inherits is then non-blocking. CI lost the whole VM tier to that once: the forwarder's first
accept() failed with EAGAIN and it exited, so no guest ever answered SSH.
"""

from __future__ import annotations

import socket
import subprocess
import sys
import threading
from pathlib import Path

from tests.vm import forward

REPO = Path(__file__).resolve().parents[1]


def echo_server() -> tuple[socket.socket, int]:
    server = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    server.bind(("127.0.0.1", 0))
    server.listen(4)

    def serve():
        while True:
            try:
                conn, _ = server.accept()
            except OSError:
                return
            with conn:
                while data := conn.recv(4096):
                    conn.sendall(data)

    threading.Thread(target=serve, daemon=True).start()
    return server, server.getsockname()[1]


def test_a_forwarder_handed_a_non_blocking_listener_keeps_serving(tmp_path):
    server, echo_port = echo_server()
    listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    listener.bind(("127.0.0.1", 0))
    listener.listen(4)
    listener.setblocking(False)  # what a gevent-patched parent hands over
    port = listener.getsockname()[1]
    proc = subprocess.Popen(
        [sys.executable, "-m", "tests.vm.forward", str(listener.fileno()), forward.STAY, "127.0.0.1",
         str(echo_port), "test-host"],
        cwd=REPO, pass_fds=[listener.fileno()], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
    )
    listener.close()
    try:
        for round_ in range(3):  # the first accept() and the ones after it
            with socket.create_connection(("127.0.0.1", port), timeout=10) as client:
                client.settimeout(10)
                message = f"round {round_}".encode()
                client.sendall(message)
                assert client.recv(4096) == message
            assert proc.poll() is None, proc.stdout.read().decode()
    finally:
        proc.kill()
        proc.wait(timeout=10)
        server.close()
