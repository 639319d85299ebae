"""pyinfra facts edgefit reads from a host: a command each, and a parser of its output.

All are read-only. Parsing is kept in plain functions so tests can feed them recorded output.
"""

from __future__ import annotations

import shlex

from pyinfra.api import FactBase

SECRETS_PATH = "/etc/edgefit/secrets.env"
COMPOSE_PROJECT = "edgefit-dify"


def parse_key_values(lines: list[str]) -> dict[str, str]:
    values = {}
    for line in lines:
        key, sep, value = line.partition("=")
        if sep:
            values[key.strip()] = value.strip()
    return values


class HostSizeFacts(FactBase):
    """Cores, memory, swap, distribution and root disk: what the plan is computed from."""

    def command(self) -> str:
        return (
            "echo cpus=$(nproc); "
            "awk '/^MemTotal:/{print \"mem_kib=\"$2} /^SwapTotal:/{print \"swap_kib=\"$2}' /proc/meminfo; "
            ". /etc/os-release; echo os_id=$ID; echo os_version=$VERSION_ID; "
            "echo root_size_kib=$(df -Pk / | awk 'NR==2{print $2}'); "
            "echo root_free_kib=$(df -Pk / | awk 'NR==2{print $4}'); "
            "echo cgroup2=$(test -f /sys/fs/cgroup/cgroup.controllers && echo yes || echo no)"
        )

    def process(self, output):
        values = parse_key_values(output)
        return {
            "cpus": int(values["cpus"]),
            "memory_mib": int(values["mem_kib"]) // 1024,
            "swap_mib": int(values.get("swap_kib") or 0) // 1024,
            "os_id": values.get("os_id", ""),
            "os_version": values.get("os_version", ""),
            "root_size_gib": int(values.get("root_size_kib") or 0) // (1024 * 1024),
            "root_free_mib": int(values.get("root_free_kib") or 0) // 1024,
            "cgroup2": values.get("cgroup2") == "yes",
        }


class BlockDevice(FactBase):
    """A block device: whether it exists, its size, filesystem, UUID and where it is mounted."""

    def command(self, path: str) -> str:
        quoted = shlex.quote(path)
        return (
            f"if [ -b {quoted} ]; then echo exists=yes; "
            f"echo size_bytes=$(blockdev --getsize64 {quoted}); "
            f"blkid -o export {quoted} 2>/dev/null || true; "
            f"echo mountpoint=$(findmnt -n -o TARGET --source {quoted} 2>/dev/null | head -1); "
            "else echo exists=no; fi"
        )

    def process(self, output):
        values = parse_key_values(output)
        if values.get("exists") != "yes":
            return {"exists": False}
        return {
            "exists": True,
            "size_gib": int(values.get("size_bytes") or 0) // 1024**3,
            "fstype": values.get("TYPE") or None,
            "uuid": values.get("UUID") or None,
            "mountpoint": values.get("mountpoint") or None,
        }


class SecretsFile(FactBase):
    """The host's secrets env file (mode 0600), or None before the first deploy.

    Returns the raw text; edgefit.secrets.Secrets parses it. pyinfra prints fact output only
    with --debug, and this file is never passed to an operation that would show it.
    """

    def command(self) -> str:
        return f"test -s {SECRETS_PATH} && cat {SECRETS_PATH} || echo __absent__"

    def process(self, output):
        text = "\n".join(output)
        return None if text.strip() == "__absent__" else text + "\n"


class ComposeVersion(FactBase):
    """`docker compose version --short`, or None without the v2 plugin."""

    def command(self) -> str:
        return "docker compose version --short 2>/dev/null || echo none"

    def process(self, output):
        version = output[0].strip() if output else "none"
        return None if version in ("", "none") else version


class DockerInstalled(FactBase):
    def command(self) -> str:
        return "command -v dockerd >/dev/null && echo yes || echo no"

    def process(self, output):
        return bool(output) and output[0].strip() == "yes"


class StackContainers(FactBase):
    """service -> state ('running', 'exited', ...) of the stack's containers."""

    @staticmethod
    def default():  # no output (no containers) is an empty stack, not an unknown one
        return {}

    def command(self) -> str:
        return (
            f"docker ps -a --filter label=com.docker.compose.project={COMPOSE_PROJECT} "
            "--format '{{.Label \"com.docker.compose.service\"}} {{.State}}' 2>/dev/null || true"
        )

    def process(self, output):
        states = {}
        for line in output:
            parts = line.split()
            if len(parts) == 2:
                states[parts[0]] = parts[1]
        return states


class MissingImages(FactBase):
    """Which of the given image references are not present on the host."""

    @staticmethod
    def default():
        return []

    def command(self, refs: tuple[str, ...]) -> str:
        checks = "; ".join(
            f"docker image inspect {shlex.quote(ref)} >/dev/null 2>&1 || echo {shlex.quote(ref)}"
            for ref in refs
        )
        return f"{checks}; true" if checks else "true"

    def process(self, output):
        return [line.strip() for line in output if line.strip()]


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
