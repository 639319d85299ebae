"""pyinfra inventory of the Vagrant test hosts that are up right now.

`scripts/vm up [HOST...]` (or the pytest fixture `vm_hosts`) writes the connection data to
${EDGEFIT_CACHE:-~/.cache/edgefit}/vm/hosts.json; this file reads it. SSH goes to 127.0.0.1 on a
forwarded port (the guests live in a network namespace of their own).

    .venv/bin/pyinfra inventory/vagrant.py fact server.Os server.Memory
    .venv/bin/pyinfra inventory/vagrant.py --limit small deploy.py

Groups: vagrant (all), small (edge-small), medium (edge-medium).
"""
import json
import os
from pathlib import Path

_cache = Path(os.environ.get("EDGEFIT_CACHE") or Path.home() / ".cache" / "edgefit")
_state = _cache / "vm" / "hosts.json"
_SSH_KEYS = ("ssh_hostname", "ssh_port", "ssh_user", "ssh_key", "ssh_known_hosts_file")

try:
    _entries = json.loads(_state.read_text())
except FileNotFoundError:
    _entries = {}
if not _entries:
    raise SystemExit(f"inventory/vagrant.py: no test hosts are up ({_state} is missing or empty); "
                     "run `scripts/vm up edge-small` first.")


def _host(name, entry):
    data = {key: entry[key] for key in _SSH_KEYS}
    # Clones of one box share host keys, and ports change between runs.
    data["ssh_strict_host_key_checking"] = "off"
    data["vagrant_host"] = {  # for people and tests; not an edgefit setting
        "size": entry["size"], "cpus": entry["cpus"], "memory_mib": entry["memory_mib"],
        "data_disk": entry["data_disk"],
    }
    return (name, data)


small = [_host(n, e) for n, e in sorted(_entries.items()) if e["size"] == "small"]
medium = [_host(n, e) for n, e in sorted(_entries.items()) if e["size"] == "medium"]
