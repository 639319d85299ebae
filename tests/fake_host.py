"""A fake host for verify's tests: FakeHost(tmp_path, plan, secrets) builds a healthy stack shaped from a real Plan: a cgroup v2
tree, a /proc, the rendered files on disk and a fake `docker` command (every container at ~40 %
of its budget, limits and settings as planned). A test breaks one thing and runs the real
sampler against it in-process (a fraction of a second), then judge.evaluate(). The fake
`docker` command is a real file (tests/fake_docker.py) that answers from a JSON state file.
"""

from __future__ import annotations

import json
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

from edgefit import judge, sampler
from edgefit.expectations import expectations
from edgefit.render import render_stack

MIB = 1024 * 1024

FAKE_DOCKER = Path(__file__).resolve().parent / "fake_docker.py"

PG_UNITS = {  # how pg_settings reports each planned setting
    "shared_buffers": "8kB", "effective_cache_size": "8kB", "maintenance_work_mem": "kB", "work_mem": "kB",
    "wal_buffers": "8kB", "min_wal_size": "MB", "max_wal_size": "MB",
    "idle_in_transaction_session_timeout": "ms",
}


def docker_time(epoch: float) -> str:
    return datetime.fromtimestamp(epoch, timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%f") + "123Z"


def pg_setting(name: str, value) -> tuple[str, str]:
    unit = PG_UNITS.get(name, "")
    if unit == "8kB":
        return str(round(value / 8192)), unit
    if unit == "kB":
        return str(value // 1024), unit
    if unit == "MB":
        return str(value // MIB), unit
    return str(value), unit


class FakeHost:
    def __init__(self, tmp_path: Path, plan, secrets, *, share: float = 0.4):
        self.tmp = tmp_path
        self.plan = plan
        self.root = str(tmp_path / "root")
        self.cgroup = tmp_path / "cgroup"
        self.proc = tmp_path / "proc"
        self.state_path = tmp_path / "docker-state.json"
        self.docker_path = FAKE_DOCKER
        self.rendered = render_stack(plan, secrets)
        self.expected = expectations(plan, self.rendered, root=self.root)
        self.now = time.time()

        # The rendered files where the deploy puts them, under root.
        for stack_file in self.rendered:
            target = Path(self.root + stack_file.dest)
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_text(stack_file.content)

        (self.cgroup).mkdir(parents=True)
        (self.cgroup / "cgroup.controllers").write_text("cpuset cpu io memory pids\n")
        (self.proc / "pressure").mkdir(parents=True)
        self.set_meminfo(plan.host.memory_mib * 1024, plan.host.memory_mib * 1024 // 2, 1024 * 1024, 1024 * 1024)
        self.set_pressure(0.0, 0.0)

        self.state = {"containers": [], "exec": {}, "events": []}
        for index, (name, service) in enumerate(plan.services.items()):
            container_id = f"{index + 1:02d}" + "ab" * 31
            pid = 4000 + index
            limit = service.mem_limit_mib * MIB
            self.state["containers"].append({
                "Id": container_id, "Name": f"/edgefit-dify-{name}-1", "Created": docker_time(self.now - 7200),
                "RestartCount": 0,
                "State": {"Status": "running", "Running": True, "Restarting": False, "Pid": pid,
                          "OOMKilled": False, "ExitCode": 0, "StartedAt": docker_time(self.now - 7000),
                          "FinishedAt": "0001-01-01T00:00:00Z",
                          "Health": {"Status": "healthy", "FailingStreak": 0,
                                     "Log": [{"Start": docker_time(self.now - 10), "End": docker_time(self.now - 9),
                                              "ExitCode": 0, "Output": "ok"}]}},
                "Config": {"Image": service.image, "Labels": {
                    "com.docker.compose.project": "edgefit-dify", "com.docker.compose.service": name,
                    "io.edgefit.service": name, "io.edgefit.mem_limit_mib": str(service.mem_limit_mib)}},
                "HostConfig": {"Memory": limit, "MemorySwap": limit, "NanoCpus": int(service.cpus * 1e9)},
            })
            directory = self.cgroup / "system.slice" / f"docker-{container_id}.scope"
            directory.mkdir(parents=True)
            (self.proc / str(pid)).mkdir()
            (self.proc / str(pid) / "cgroup").write_text(f"0::/system.slice/docker-{container_id}.scope\n")
            self.set_memory(name, int(limit * share), cache=int(limit * 0.05))
            self.write(name, "memory.max", str(limit))
            self.write(name, "memory.swap.max", "0")
            self.write(name, "memory.peak", str(int(limit * (share + 0.1))))
            self.write(name, "memory.events", "low 0\nhigh 0\nmax 0\noom 0\noom_kill 0\noom_group_kill 0\n")
            self.write(name, "cpu.stat", "usage_usec 1000000\nuser_usec 800000\nsystem_usec 200000\n")
            self.write(name, "cpu.max", f"{int(service.cpus * 100000)} 100000")
            if name in ("redis", "redis_broker"):
                redis = plan.redis if name == "redis" else plan.redis_broker
                self.set_redis(name, redis.maxmemory_mib * MIB, redis.maxmemory_policy)
            elif name == "db":
                self.set_postgres({})
            elif name in ("api", "worker", "worker_beat"):
                self.exec_answers(name)["python3"] = str(tuple(plan.dify.gc_threshold))
        self.save()

    # -- editing the fake host
    def container(self, service: str) -> dict:
        return next(c for c in self.state["containers"] if c["Config"]["Labels"]["io.edgefit.service"] == service)

    def cgroup_dir(self, service: str) -> Path:
        return self.cgroup / "system.slice" / f"docker-{self.container(service)['Id']}.scope"

    def write(self, service: str, name: str, text: str) -> None:
        (self.cgroup_dir(service) / name).write_text(text if text.endswith("\n") else text + "\n")

    def exec_answers(self, service: str) -> dict:
        return self.state["exec"].setdefault(self.container(service)["Id"], {})

    def set_memory(self, service: str, anon: int, cache: int = 0, inactive_share: float = 0.5) -> None:
        inactive = int(cache * inactive_share)
        self.write(service, "memory.current", str(anon + cache))
        self.write(service, "memory.stat", f"anon {anon}\nfile {cache}\nkernel 1048576\nshmem 0\nsock 0\n"
                                           f"active_file {cache - inactive}\ninactive_file {inactive}\nslab 524288\n")

    def set_redis(self, service: str, maxmemory: int, policy: str, evicted: int = 0, used: int = 2 * MIB) -> None:
        self.exec_answers(service)["redis"] = (
            f"maxmemory\n{maxmemory}\nmaxmemory-policy\n{policy}\nmaxmemory-samples\n5\n@@INFO@@\n"
            f"# Memory\r\nused_memory:{used}\r\nmaxmemory:{maxmemory}\r\nmaxmemory_policy:{policy}\r\n"
            f"# Stats\r\nevicted_keys:{evicted}\r\nexpired_keys:0\r\n")

    def set_postgres(self, overrides: dict) -> None:
        rows = []
        for name, value in {**self.expected["postgres"], **overrides}.items():
            setting, unit = pg_setting(name, value)
            rows.append(f"{name}|{setting}|{unit}")
        self.exec_answers("db")["psql"] = "\n".join(rows)

    def set_meminfo(self, total_kib: int, available_kib: int, swap_total_kib: int, swap_free_kib: int) -> None:
        (self.proc / "meminfo").write_text(
            f"MemTotal:       {total_kib} kB\nMemFree:        {available_kib // 2} kB\n"
            f"MemAvailable:   {available_kib} kB\nCached:         {available_kib // 4} kB\n"
            f"SwapTotal:      {swap_total_kib} kB\nSwapFree:       {swap_free_kib} kB\n")

    def set_pressure(self, some_avg10: float, full_avg10: float, some_avg60: float = 0.0) -> None:
        (self.proc / "pressure" / "memory").write_text(
            f"some avg10={some_avg10:.2f} avg60={some_avg60:.2f} avg300=0.00 total=12345\n"
            f"full avg10={full_avg10:.2f} avg60=0.00 avg300=0.00 total=2345\n")

    def save(self) -> None:
        self.state_path.write_text(json.dumps(self.state))
        counter = Path(str(self.state_path) + ".inspects")
        if counter.exists():
            counter.unlink()

    # -- running the sampler and the judgement
    def sampler_args(self, window: float = 0.3, interval: float = 0.1, exec_timeout: float = 5.0,
                     docker_socket: str = "") -> list[str]:
        """docker_socket: a fake Docker API (tests/fake_docker_api.py) for ps/inspect/events;
        by default the fake docker command answers everything."""
        args = ["--window", str(window), "--interval", str(interval), "--cgroup-root", str(self.cgroup),
                "--proc-root", str(self.proc), "--stack-dir", self.root + judge.STACK_DIR,
                "--docker", f"{sys.executable} {self.docker_path} {self.state_path}",
                "--docker-socket", docker_socket, "--exec-timeout", str(exec_timeout)]
        for path in sorted(self.expected["files"]):
            args += ["--hash", path]
        return args

    def sample(self, **kwargs) -> dict:
        self.save()
        return sampler.Sampler(sampler.parse_args(self.sampler_args(**kwargs))).main()

    def judge(self, strict: bool = False, **kwargs) -> dict:
        return judge.evaluate(self.sample(**kwargs), self.expected, host="fake", strict=strict)

    def record_text(self) -> str:
        """The plan of record as the deploy wrote it (under root)."""
        return (Path(self.root) / "etc/edgefit/plan.json").read_text()
