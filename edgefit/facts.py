"""pyinfra facts edgefit reads from a host: a command each, and a parser of its output.

All are read-only. Parsing is kept in plain functions so tests can feed them recorded output.
"""

from __future__ import annotations

import json
import shlex
from pathlib import Path

from pyinfra.api import FactBase

from edgefit.host_backup import PLAN_OF_RECORD

SECRETS_PATH = "/etc/edgefit/secrets.env"
COMPOSE_PROJECT = "edgefit-dify"


def container_name(service: str) -> str:
    """The name compose gives a service's one container."""
    return f"{COMPOSE_PROJECT}-{service}-1"



def parse_key_values(lines: list[str]) -> dict[str, str]:
    values = {}
    for line in lines:
        key, sep, value = line.partition("=")
        if sep:
            values[key.strip()] = value.strip()
    return values


DEVICE_SECTION = "@@EDGEFIT-DATA-DISK@@"


class HostSizeFacts(FactBase):
    """Cores, memory, swap, distribution and root disk: what the plan is computed from; whether
    dockerd is installed; and with data_disk, that device as BlockDevice reads it. One command
    for all: a no-op deploy counts its round trips (issue 12)."""

    def command(self, data_disk: str | None = None) -> str:
        device = f"; echo {DEVICE_SECTION}; {BlockDevice().command(data_disk)}" if data_disk else ""
        return (
            "echo cpus=$(nproc); "
            "awk '/^MemTotal:/{print \"mem_kib=\"$2} /^SwapTotal:/{print \"swap_kib=\"$2}' /proc/meminfo; "
            ". /etc/os-release; echo os_id=$ID; echo os_version=$VERSION_ID; "
            "echo root_size_kib=$(df -Pk / | awk 'NR==2{print $2}'); "
            "echo root_free_kib=$(df -Pk / | awk 'NR==2{print $4}'); "
            "echo cgroup2=$(test -f /sys/fs/cgroup/cgroup.controllers && echo yes || echo no); "
            "echo dockerd=$(command -v dockerd >/dev/null && echo yes || echo no)"
        ) + device

    def process(self, output):
        lines = list(output)
        at = lines.index(DEVICE_SECTION) if DEVICE_SECTION in lines else len(lines)
        values = parse_key_values(lines[:at])
        return {
            "data_device": BlockDevice().process(lines[at + 1:]) if at < len(lines) else None,
            "cpus": int(values["cpus"]),
            "memory_mib": int(values["mem_kib"]) // 1024,
            "swap_mib": int(values.get("swap_kib") or 0) // 1024,
            "os_id": values.get("os_id", ""),
            "os_version": values.get("os_version", ""),
            "root_size_gib": int(values.get("root_size_kib") or 0) // (1024 * 1024),
            "root_free_mib": int(values.get("root_free_kib") or 0) // 1024,
            "cgroup2": values.get("cgroup2") == "yes",
            "docker_installed": values.get("dockerd") == "yes",  # the docker role installs it when not
        }


class BlockDevice(FactBase):
    """A block device: whether it exists, its size, what it holds, its UUID and mount point.

    What it holds comes from `blkid -p`, the low-level probe, which also finds what holds no
    filesystem TYPE (LUKS/dm-crypt, partition tables, RAID members). The device is `empty` only
    when that probe ran and found no signature at all (exit code 2); anything else, including a
    device it could not read, is not empty, and so is never formatted.
    """

    def command(self, path: str) -> str:
        quoted = shlex.quote(path)
        return (
            f"if [ -b {quoted} ]; then echo exists=yes; "
            f"echo size_bytes=$(blockdev --getsize64 {quoted}); "
            f"if [ -r {quoted} ]; then blkid -p -o export {quoted} 2>/dev/null; echo probe_status=$?; "
            "else echo probe_status=unreadable; fi; "
            f"echo mountpoint=$(findmnt -n -o TARGET --source {quoted} 2>/dev/null | head -1); "
            "else echo exists=no; fi"
        )

    def process(self, output):
        values = parse_key_values(output)
        if values.get("exists") != "yes":
            return {"exists": False}
        empty = values.get("probe_status") == "2"  # blkid: 2 = nothing found; 0 found; 8 ambivalent
        usage = values.get("USAGE")
        signature = values.get("TYPE") or values.get("PTTYPE") or (None if empty else "an unreadable or unknown signature")
        return {
            "exists": True,
            "size_gib": int(values.get("size_bytes") or 0) // 1024**3,
            "empty": empty,
            # a filesystem edgefit may mount; crypto_LUKS, a partition table or raid are not
            "fstype": values.get("TYPE") if usage in (None, "filesystem") and values.get("TYPE") else None,
            "signature": signature,
            "uuid": values.get("UUID") or None,
            "mountpoint": values.get("mountpoint") or None,
        }


SAMPLER_SOURCE = Path(__file__).resolve().parent / "sampler.py"
# Where Debian's docker.io, Docker's docker-compose-plugin and edgefit's upload put Compose v2.
COMPOSE_PLUGIN_PATHS = ("/usr/libexec/docker/cli-plugins/docker-compose", "/usr/lib/docker/cli-plugins/docker-compose",
                        "/usr/local/lib/docker/cli-plugins/docker-compose")
SECTION = "@@EDGEFIT-SECTION@@"


def unit_blocks(lines: list[str]) -> list[dict[str, str]]:
    """`systemctl show -p Id,...` of several units: one block of KEY=VALUE lines each, blank-line
    separated, Id first (a block also starts at an Id line, should blank lines be dropped)."""
    blocks: list[dict[str, str]] = []
    current: dict[str, str] = {}
    for line in lines + [""]:
        key, _, value = line.strip().partition("=")
        if (not line.strip() or key == "Id") and current:
            blocks.append(current)
            current = {}
        if line.strip():
            current[key] = value
    return blocks


class HostState(FactBase):
    """Everything the deploy compares, read in one command (edgefit/converge.py decides from it):
    each placed file's sha256, mode, owner and mtime; the data directories' owners; which planned
    images are missing; the systemd units' state; live sysctl values; the Compose plugin; and the
    stack itself through sampler.py (containers, limits, Redis and Postgres settings), the same
    reader verify uses. No file content and no secret is read."""

    def command(self, paths: tuple[str, ...], directories: tuple[str, ...], refs: tuple[str, ...],
                units: tuple[str, ...], sysctl_keys: tuple[str, ...]) -> str:
        def words(items):
            return " ".join(shlex.quote(item) for item in items)
        sampler = SAMPLER_SOURCE.read_text()
        assert "EDGEFIT_SAMPLER_END" not in sampler
        return "\n".join([
            # The stack and the images present, from the Docker API's socket (the docker CLI, a Go
            # binary, took seconds per call on a small host: most of a no-op deploy, issue 12),
            # read in the background while the shell reads the rest: Python's start is the
            # longest part of this read on a small host.
            "snapshot=$(mktemp)",
            "if command -v python3 >/dev/null && command -v docker >/dev/null; then",
            # --record: the plan of record's images, by which an upgrade is judged
            f"python3 - --window 0.1 --interval 0.1 --checks redis,postgres --images --record {PLAN_OF_RECORD} "
            "--exec-timeout 20 >\"$snapshot\" 2>/dev/null <<'EDGEFIT_SAMPLER_END' &",
            sampler.rstrip("\n"),
            "EDGEFIT_SAMPLER_END",
            "fi",
            # One stat and one sha256sum over every placed file (a process per file took seconds
            # on a small host), matched by path in process().
            f"set --; for p in {words(paths)}; do [ -f \"$p\" ] && set -- \"$@\" \"$p\"; done",
            f"echo {SECTION}files",
            "[ $# -gt 0 ] && stat -c '%a %u %Y %n' \"$@\"",
            f"echo {SECTION}hashes",
            "[ $# -gt 0 ] && sha256sum \"$@\"",
            f"echo {SECTION}directories",
            f"stat -c '%u %n' {words(directories)} 2>/dev/null",
            f"echo {SECTION}units",  # one block per unit
            f"systemctl show -p Id,UnitFileState,ActiveState,NeedDaemonReload {words(units)} 2>/dev/null",
            f"echo {SECTION}sysctl",
            f"sysctl -e {words(sysctl_keys)} 2>/dev/null || true",
            f"echo {SECTION}compose",
            # the plugin's presence, not `docker compose version`: that Go binary takes seconds to start
            f"for c in {words(COMPOSE_PLUGIN_PATHS)}; do test -x \"$c\" && {{ echo present; break; }}; done",
            "wait",  # the sampler bounds itself (--exec-timeout)
            f"echo {SECTION}snapshot",
            "cat \"$snapshot\"; rm -f \"$snapshot\"",
            "true",
        ])

    def process(self, output):
        sections: dict[str, list[str]] = {}
        current = None
        for line in output:
            if line.startswith(SECTION):
                current = sections.setdefault(line[len(SECTION):].strip(), [])
            elif current is not None:
                current.append(line)
        digests = {}
        for line in sections.get("hashes", []):
            digest, _, path = line.partition("  ")
            if len(digest) == 64 and path:
                digests[path] = digest
        files = {}
        for line in sections.get("files", []):
            parts = line.split(" ", 3)
            if len(parts) == 4 and parts[3] in digests:
                mode, uid, mtime, path = parts
                files[path] = {"mode": int(mode, 8), "uid": int(uid), "mtime": float(mtime), "sha256": digests[path]}
        directories = {}
        for line in sections.get("directories", []):
            uid, _, path = line.partition(" ")
            if uid.isdigit():
                directories[path] = int(uid)
        units = {}
        for block in unit_blocks(sections.get("units", [])):
            units[block.get("Id", "")] = {"enabled": block.get("UnitFileState", ""), "active": block.get("ActiveState", ""),
                           "need_reload": block.get("NeedDaemonReload") == "yes"}
        sysctl = parse_key_values(sections.get("sysctl", []))
        snapshot = None
        for line in reversed(sections.get("snapshot", [])):
            if line.startswith("{"):
                try:
                    snapshot = json.loads(line)
                except ValueError:
                    snapshot = None
                break
        compose = (sections.get("compose") or [""])[0].strip() or None
        images = sorted((snapshot or {}).get("images") or [])
        record_images = (snapshot or {}).get("record_images")
        return {"files": files, "directories": directories, "units": units, "sysctl": sysctl,
                "images": images, "compose_version": compose, "snapshot": snapshot,
                "record_images": record_images if isinstance(record_images, dict) else None,
                "units_need_reload": sorted(name for name, unit in units.items() if unit["need_reload"])}


class PostgresCluster(FactBase):
    """Where an existing Postgres cluster lies under the data root (its PG_VERSION), or None.

    Looks in the data root, and on the data disk when it is not mounted yet (a host reinstalled
    with its data disk kept): the disk is mounted read-only, without journal replay, on a
    temporary directory and unmounted again. The secrets role reads this before it would make
    new secrets that could not open that cluster.
    """

    @staticmethod
    def default():
        return None

    def command(self, data_root: str, device: str | None = None) -> str:
        relative = ("postgres/pgdata/PG_VERSION", "postgres/PG_VERSION")  # PGDATA is a subdirectory
        look = " ".join(shlex.quote(f"{data_root}/{path}") for path in relative)
        script = f"for p in {look}; do test -f \"$p\" && {{ echo \"$p\"; exit 0; }}; done; "
        if device:
            dev = shlex.quote(device)
            script += (
                f"test -b {dev} || exit 0; test -n \"$(blkid -o value -s TYPE {dev})\" || exit 0; "
                f"m=$(findmnt -n -o TARGET --source {dev} | head -1); "
                f"if [ -n \"$m\" ]; then for r in {' '.join(relative)}; do "
                f"test -f \"$m/$r\" && {{ echo \"{device}:$r\"; exit 0; }}; done; exit 0; fi; "
                "t=$(mktemp -d); "
                f"mount -o ro,noload {dev} \"$t\" 2>/dev/null || mount -o ro {dev} \"$t\" 2>/dev/null || {{ rmdir \"$t\"; exit 0; }}; "
                f"for r in {' '.join(relative)}; do test -f \"$t/$r\" && {{ echo \"{device}:$r\"; break; }}; done; "
                "umount \"$t\"; rmdir \"$t\"; "
            )
        return script + "true"

    def process(self, output):
        found = [line.strip() for line in output if line.strip()]
        return found[0] if found else None
