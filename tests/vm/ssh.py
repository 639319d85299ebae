"""SSH to a test host with the ssh CLI, through its forwarded port on 127.0.0.1."""
from __future__ import annotations

import subprocess
from typing import Any, Mapping


def ssh_command(host: Mapping[str, Any], command: str, *, connect_timeout: int = 10) -> list[str]:
    """`host` is one entry of hosts.json (or a VMHost's .data)."""
    return [
        "ssh", "-q", "-i", host["ssh_key"], "-p", str(host["ssh_port"]),
        "-o", "BatchMode=yes", "-o", "IdentitiesOnly=yes",
        # Clones of one box share their host keys and ports change between runs.
        "-o", "StrictHostKeyChecking=no", "-o", f"UserKnownHostsFile={host['ssh_known_hosts_file']}",
        "-o", f"ConnectTimeout={connect_timeout}", "-o", "ServerAliveInterval=15",
        f"{host['ssh_user']}@{host['ssh_hostname']}", command,
    ]


def run_ssh(host: Mapping[str, Any], command: str, *, timeout: float = 120, check: bool = True,
            input: bytes | str | None = None, stdin=None) -> subprocess.CompletedProcess:
    """Runs `command` on the host; text output unless `input` is bytes or `stdin` is a file."""
    text = not isinstance(input, bytes) and stdin is None
    result = subprocess.run(ssh_command(host, command), input=input, stdin=stdin, capture_output=True,
                            text=text, timeout=timeout)
    if check and result.returncode != 0:
        raise AssertionError(f"on {host.get('name', host['ssh_port'])}: `{command}` exited {result.returncode}\n"
                             f"stdout: {result.stdout!r}\nstderr: {result.stderr!r}")
    return result


def ssh_answers(host: Mapping[str, Any]) -> bool:
    try:
        return subprocess.run(ssh_command(host, "true", connect_timeout=5), capture_output=True,
                              timeout=30).returncode == 0
    except subprocess.TimeoutExpired:
        return False
