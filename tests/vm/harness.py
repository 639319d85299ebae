"""up / down / status of the test hosts. Every step is bounded, timed and printed."""
from __future__ import annotations

import fcntl
import json
import shutil
import subprocess
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Iterable, Iterator

from . import box, config, forward, netns
from .proc import CommandFailed, phase, process_cmdline, process_name, say, stop_pid, wait_until
from .ssh import run_ssh, ssh_answers
from .vagrant import quiet_progress, vagrant


LOCK_TIMEOUT = 1800  # another up/down (a parallel test run, a developer) may hold it while booting


@contextmanager
def exclusive(what: str) -> Iterator[None]:
    """One up/down at a time per machine: they share the namespace, the daemons and .vagrant/."""
    config.state_dir().mkdir(parents=True, exist_ok=True)
    with open(config.state_dir() / "lock", "w") as lock:
        def acquired() -> bool:
            try:
                fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
                return True
            except BlockingIOError:
                return False

        if not acquired():
            say(f"{what}: another scripts/vm up/down is running; waiting for it")
            wait_until("the test-host lock", acquired, timeout=LOCK_TIMEOUT, interval=2)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def read_hosts() -> dict[str, dict]:
    try:
        return json.loads(config.hosts_file().read_text())
    except (OSError, ValueError):
        return {}


def _write_hosts(hosts: dict[str, dict]) -> None:
    config.state_dir().mkdir(parents=True, exist_ok=True)
    tmp = config.hosts_file().with_suffix(".tmp")
    tmp.write_text(json.dumps(hosts, indent=2, sort_keys=True) + "\n")
    tmp.replace(config.hosts_file())


def domain_name(host: str) -> str:
    return config.DOMAIN_PREFIX + host


def _running_domains() -> set[str]:
    return set(netns.virsh("list", "--name").split())


def _remove_stale_domains(names: list[str]) -> None:
    """A domain of ours that no live entry in hosts.json owns (a run killed before its teardown,
    e.g. by CI's time limit) makes `vagrant up` fail with "Name ... is already taken": it and its
    volumes go before the boot. Only our own names, in our own namespace's libvirt."""
    defined = set(netns.virsh("list", "--all", "--name").split())
    for name in names:
        domain = domain_name(name)
        if domain in defined:
            say(f"removing {domain}, left behind by an earlier run")
            netns.virsh("destroy", domain, check=False)
            netns.virsh("undefine", domain, "--nvram", check=False)
        for volume in netns.volumes():
            if volume.startswith(domain):
                netns.virsh("vol-delete", "--pool", config.POOL_NAME, volume, check=False)
        shutil.rmtree(config.REPO / ".vagrant" / "machines" / name / "libvirt", ignore_errors=True)


def _guest_ip(host: str) -> str | None:
    out = netns.virsh("domifaddr", domain_name(host), "--source", "lease", check=False)
    for line in out.splitlines():
        fields = line.split()
        if len(fields) >= 4 and fields[2] == "ipv4":
            return fields[3].split("/")[0]
    return None


class VagrantMarks:
    """Times the stages inside `vagrant up` from its own messages, per host."""
    STAGES = {"Uploading base box image": "box upload", "Starting domain.": "domain start",
              "Machine booted and ready!": "ssh ready"}

    def __init__(self) -> None:
        self.seen: dict[tuple[str, str], float] = {}
        self.started = time.monotonic()
        self.progress = quiet_progress()

    def watch(self, line: str) -> bool:
        for text, stage in self.STAGES.items():
            if text in line and "==> " in line:
                host = line.split("==> ", 1)[1].split(":", 1)[0]
                self.seen.setdefault((host, stage), time.monotonic())
        return self.progress(line)

    def timings(self) -> dict[str, float]:
        out = {}
        for (host, stage), at in self.seen.items():
            if stage == "ssh ready" and (host, "domain start") in self.seen:
                out[f"{host} domain start to first ssh"] = round(at - self.seen[(host, "domain start")], 1)
            if stage == "domain start":
                out[f"{host} vagrant prepare (upload, define)"] = round(at - self.started, 1)
        return out


def up(names: Iterable[str], *, wait_for_docker: bool = False) -> dict[str, dict]:
    """Boots the named hosts (those not already up, in parallel) and returns their entries."""
    names = list(dict.fromkeys(names)) or ["edge-small"]
    with exclusive("up"):
        return _up(names, wait_for_docker)


def _up(names: list[str], wait_for_docker: bool) -> dict[str, dict]:
    unknown = [n for n in names if n not in config.HOSTS]
    if unknown:
        raise SystemExit(f"unknown test host(s) {', '.join(unknown)}; known: {', '.join(config.HOSTS)}")
    timings: dict[str, float] = {}
    started = time.monotonic()
    local_box = box.ensure_box(timings)
    with phase("libvirt daemons in netns " + config.NETNS, timings):
        netns.start()
    hosts = {n: h for n, h in read_hosts().items() if domain_name(n) in _running_domains()}
    for name, entry in list(hosts.items()):
        if name in names and not ssh_answers(entry):  # e.g. its forwarder is gone: connect anew
            _stop_forwarders({name: entry})
            hosts.pop(name)
    missing = [n for n in names if n not in hosts]
    if missing:
        _remove_stale_domains(missing)
        marks = VagrantMarks()
        with phase(f"boot: vagrant up {' '.join(missing)}", timings):
            vagrant("up", "--provider", "libvirt", "--no-provision", *missing, timeout=config.VAGRANT_UP_TIMEOUT,
                    echo=marks.watch)
        timings.update(marks.timings())
        for name in missing:
            hosts[name] = _connect(name, local_box, timings)
            _write_hosts(hosts)
    if wait_for_docker:
        for name in names:
            wait_docker(hosts[name], timings)
    _write_hosts(hosts)
    timings["total"] = round(time.monotonic() - started, 1)
    say("timings (s): " + ", ".join(f"{k}={v}" for k, v in timings.items()))
    return {n: hosts[n] for n in names}


def _connect(name: str, local_box: box.LocalBox, timings: dict[str, float]) -> dict:
    spec = config.HOSTS[name]
    ip = _guest_ip(name)
    if ip is None:
        raise RuntimeError(f"{name} is running but libvirt knows no address for it")
    forwarder_pid, port = forward.spawn(config.NETNS, ip, 22, config.state_dir() / f"forward-{name}.log", name)
    entry = {
        "name": name, "size": spec.size, "cpus": spec.cpus, "memory_mib": spec.memory_mib,
        "data_disk": "/dev/vdb", "data_disk_gib": config.DATA_DISK_GIB,
        "domain": domain_name(name), "guest_ip": ip,
        "ssh_hostname": "127.0.0.1", "ssh_port": port, "ssh_user": "root", "ssh_key": local_box.ssh_key,
        "ssh_known_hosts_file": str(config.state_dir() / "known_hosts"),
        "forwarder_pid": forwarder_pid,
    }
    with phase(f"first ssh to {name} via 127.0.0.1:{port}", timings):
        wait_until(f"ssh on {name}", lambda: ssh_answers(entry), timeout=config.SSH_READY_TIMEOUT, interval=1)
    return entry


def wait_docker(entry: dict, timings: dict[str, float] | None = None) -> None:
    def docker_answers() -> bool:
        try:
            return run_ssh(entry, "docker info --format '{{.ServerVersion}}'", timeout=60, check=False).returncode == 0
        except subprocess.TimeoutExpired:
            return False

    with phase(f"docker ready on {entry['name']}", timings):
        wait_until(f"docker on {entry['name']}", docker_answers, timeout=config.DOCKER_READY_TIMEOUT, interval=2)


def down() -> None:
    """Destroys every test host and stops everything `up` started. Safe to run any time, twice."""
    with exclusive("down"):
        _down()


def _down() -> None:
    timings: dict[str, float] = {}
    with phase("down", timings):
        hosts = read_hosts()
        vagrant_knows = any((config.REPO / ".vagrant/machines").glob("*/libvirt/id"))
        if netns.netns_exists() or vagrant_knows:
            try:
                netns.start()  # destroying needs libvirtd, also after a crash left VMs behind
                _destroy_domains(vagrant_knows)
            finally:
                _stop_forwarders(hosts)
                _stop_leftovers_in_netns()
                netns.stop()
        else:
            _stop_forwarders(hosts)
        config.hosts_file().unlink(missing_ok=True)
        (config.state_dir() / "known_hosts").unlink(missing_ok=True)


def _destroy_domains(vagrant_knows: bool) -> None:
    if vagrant_knows and config.local_box_file().exists():
        try:
            vagrant("destroy", "--force", timeout=config.VAGRANT_DESTROY_TIMEOUT)
        except CommandFailed as err:
            say(f"vagrant destroy failed; removing the domains with virsh instead: {err}")
    # Whatever vagrant did not remove (a crashed run, a lost .vagrant/): by name.
    for domain in netns.virsh("list", "--all", "--name").split():
        if domain.startswith(config.DOMAIN_PREFIX):
            netns.virsh("destroy", domain, check=False)
            netns.virsh("undefine", domain, "--nvram", check=False)
    # The base box volume stays: it is the cached upload of the current box (box.py removes it
    # when the box changes). Each host's own volumes go.
    for volume in netns.volumes():
        if any(volume.startswith(domain_name(host)) for host in config.HOSTS):
            netns.virsh("vol-delete", "--pool", config.POOL_NAME, volume, check=False)
    if config.MGMT_NETWORK in netns.virsh("net-list", "--all", "--name").split():
        netns.virsh("net-destroy", config.MGMT_NETWORK, check=False)
        netns.virsh("net-undefine", config.MGMT_NETWORK, check=False)
    machines = config.REPO / ".vagrant" / "machines"
    for name in config.HOSTS:
        shutil.rmtree(machines / name / "libvirt", ignore_errors=True)


def _stop_forwarders(hosts: dict[str, dict]) -> None:
    for entry in hosts.values():
        pid = entry.get("forwarder_pid")
        if pid:
            stop_pid(pid, name=f"forwarder for {entry['name']}", cmdline_has="tests.vm.forward")


def _stop_leftovers_in_netns() -> None:
    """Processes still in our namespace after the VMs are gone (a QEMU, a dnsmasq) were started by
    our libvirtd; the daemons themselves are stopped by netns.stop()."""
    if not netns.netns_exists():
        return
    daemons = set(netns.daemons_running().values())
    for pid in netns.pids_inside():
        # The daemons' reapers (tests/vm/reaper.py) ignore SIGTERM and leave once their daemon has
        # exited; killed first, they left the daemon a zombie of PID 1 (and 15 s were lost each).
        if pid not in daemons and netns.REAPER_MODULE not in process_cmdline(pid):
            stop_pid(pid, name=f"{process_name(pid)} left in netns {config.NETNS}")


def status() -> int:
    """Prints what is up; returns 0 when every recorded host answers SSH."""
    print(f"cache:      {config.cache_dir()}")
    print(f"box:        {box.recipe_key()} ({'built' if (box.box_dir(box.recipe_key()) / 'complete').exists() else 'not built'})")
    print(f"netns:      {config.NETNS} {'present' if netns.netns_exists() else 'absent'}")
    daemons = netns.daemons_running()
    print("daemons:    " + (", ".join(f"{n} pid {p}" for n, p in daemons.items()) or "none"))
    if "libvirtd" in daemons:
        print("domains:    " + (" ".join(sorted(_running_domains())) or "none running"))
    hosts = read_hosts()
    healthy = True
    for name, entry in hosts.items():
        answers = ssh_answers(entry)
        healthy &= answers
        print(f"host:       {name} ssh root@127.0.0.1:{entry['ssh_port']} -> {entry['guest_ip']} "
              f"({'answers' if answers else 'NOT answering'})")
    if not hosts:
        print("hosts:      none up")
    print(f"inventory:  inventory/vagrant.py (reads {config.hosts_file()})")
    return 0 if healthy else 1


def destroy(names: Iterable[str]) -> None:
    """Destroys some hosts; when none is left, everything else `up` started goes too."""
    names = list(names)
    with exclusive("destroy"):
        hosts = read_hosts()
        if netns.netns_exists() and "libvirtd" in netns.daemons_running():
            with phase(f"vagrant destroy {' '.join(names)}"):
                vagrant("destroy", "--force", *names, timeout=config.VAGRANT_DESTROY_TIMEOUT)
        _stop_forwarders({n: e for n, e in hosts.items() if n in names})
        _forget_host_keys([e for n, e in hosts.items() if n in names])
        remaining = {n: e for n, e in hosts.items() if n not in names}
        _write_hosts(remaining)
        if not remaining:
            _down()


def _forget_host_keys(entries: list[dict]) -> None:
    """A host booted again gets a new host key; should it get the same forwarded port too, pyinfra
    (paramiko) would refuse the changed key. Its old line goes with it."""
    known_hosts = config.state_dir() / "known_hosts"
    if not known_hosts.exists():
        return
    for entry in entries:
        subprocess.run(["ssh-keygen", "-R", f"[{entry['ssh_hostname']}]:{entry['ssh_port']}", "-f", str(known_hosts)],
                       capture_output=True, timeout=30)


def qemu_processes(name: str) -> list[int]:
    """PIDs of QEMU processes running the host's libvirt domain (guest=NAME on their command line)."""
    pids = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            argv = (entry / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if argv and b"qemu-system" in argv[0] and any(f"guest={domain_name(name)}".encode() in a for a in argv):
            pids.append(int(entry.name))
    return pids


def forwarder_processes(name: str) -> list[int]:
    marker = forward.cmdline_marker(name)
    return [int(p.name) for p in Path("/proc").iterdir()
            if p.name.isdigit() and "tests.vm.forward" in (cmd := process_cmdline(int(p.name)))
            and cmd.endswith(marker)]


def leftovers(names: Iterable[str]) -> list[str]:
    """What is still there of the named hosts: domains, their volumes, QEMU processes, forwarders."""
    found = []
    if netns.netns_exists() and "libvirtd" in netns.daemons_running():
        domains = set(netns.virsh("list", "--all", "--name").split())
        volumes = netns.volumes()
        for name in names:
            found += [f"libvirt domain {d}" for d in domains if d == domain_name(name)]
            found += [f"libvirt volume {v}" for v in volumes if v.startswith(domain_name(name))]
    for name in names:
        found += [f"qemu process {pid} of {name}" for pid in qemu_processes(name)]
        # also with libvirtd stopped: its files on disk
        found += [f"volume file {p}" for p in config.POOL_DIR.glob(domain_name(name) + "*")]
        found += [f"domain definition {p}" for p in Path("/etc/libvirt/qemu").glob(domain_name(name) + ".xml")]
        found += [f"forwarder process {pid} of {name}" for pid in forwarder_processes(name)]
        entry = read_hosts().get(name)
        if entry:
            found.append(f"{name} still listed in {config.hosts_file()}")
    return found
