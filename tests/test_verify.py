"""`edgefit verify` without a real host: the pure judgement, the table and JSON, exit codes, the
sampler against a fake host, and the connection layer against unreachable hosts.

FakeHost(tmp_path, plan, secrets) builds a healthy stack shaped from a real Plan: a cgroup v2
tree, a /proc, the rendered files on disk and a fake `docker` command (every container at ~40 %
of its budget, limits and settings as planned). Each test breaks one thing and runs the real
sampler against it in-process (a fraction of a second), then verify.evaluate().
"""

from __future__ import annotations

import json
import os
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

from edgefit import sampler, verify
from edgefit.render import render_stack, write_stack

MIB = 1024 * 1024

FAKE_DOCKER = r'''
import json, os, sys, time
state_path = sys.argv[1]
args = sys.argv[2:]
state = json.load(open(state_path))
if state.get("docker_error"):
    print(state["docker_error"], file=sys.stderr)
    sys.exit(1)
command = args[0]
if command == "ps":
    print("\n".join(c["Id"] for c in state["containers"]))
elif command == "inspect":
    counter = state_path + ".inspects"
    n = int(open(counter).read()) if os.path.exists(counter) else 0
    open(counter, "w").write(str(n + 1))
    views = state["containers"] if n == 0 else state.get("containers_end", state["containers"])
    print(json.dumps([c for c in views if c["Id"] in args[1:]]))
elif command == "exec":
    cid, rest = args[1], args[2:]
    kind = {"sh": "redis", "psql": "psql", "python3": "python3"}[rest[0]]
    time.sleep(state.get("exec_sleep", 0))
    answer = state["exec"].get(cid, {}).get(kind)
    if answer is None:
        print("OCI runtime exec failed: executable file not found", file=sys.stderr)
        sys.exit(126)
    if kind == "redis" and "CONFIG" not in rest[-1]:
        answer = answer.split("@@INFO@@", 1)[-1]
        answer = "@@INFO@@" + state.get("redis_info_end", {}).get(cid, answer)
    print(answer)
elif command == "events":
    for event in state.get("events", []):
        print(json.dumps(event))
else:
    sys.exit(2)
'''

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
        self.docker_path = tmp_path / "fake_docker.py"
        self.docker_path.write_text(FAKE_DOCKER)
        self.rendered = render_stack(plan, secrets)
        self.expected = verify.expectations(plan, self.rendered, root=self.root)
        self.now = time.time()

        # The rendered files where the deploy puts them, under root.
        stack_dir = Path(self.root + verify.STACK_DIR)
        write_stack([f for f in self.rendered if not f.is_host_file], stack_dir)
        host_files = [f for f in self.rendered if f.is_host_file]
        for stack_file in host_files:
            target = Path(verify.stack_file_destination(stack_file.path, root=self.root))
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
    def sampler_args(self, window: float = 0.3, interval: float = 0.1, exec_timeout: float = 5.0) -> list[str]:
        args = ["--window", str(window), "--interval", str(interval), "--cgroup-root", str(self.cgroup),
                "--proc-root", str(self.proc), "--stack-dir", self.root + verify.STACK_DIR,
                "--docker", f"{sys.executable} {self.docker_path} {self.state_path}",
                "--exec-timeout", str(exec_timeout)]
        for path in sorted(self.expected["files"]):
            args += ["--hash", path]
        return args

    def sample(self, **kwargs) -> dict:
        self.save()
        return sampler.Sampler(sampler.parse_args(self.sampler_args(**kwargs))).main()

    def judge(self, strict: bool = False, **kwargs) -> dict:
        return verify.evaluate(self.sample(**kwargs), self.expected, host="fake", strict=strict)




# =============================================================================================
# Tests

import re  # noqa: E402
import shlex  # noqa: E402
import shutil  # noqa: E402
import socket  # noqa: E402
import subprocess  # noqa: E402

import pytest  # noqa: E402

from edgefit.plan import HostSize, make_plan  # noqa: E402
from edgefit.secrets import Secrets  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
EDGEFIT = [sys.executable, "-m", "edgefit"]


@pytest.fixture(scope="module")
def plan():
    return make_plan(HostSize(2, 4096, 40))


@pytest.fixture(scope="module")
def secrets():
    return Secrets.generate()


@pytest.fixture
def fake(tmp_path, plan, secrets):
    return FakeHost(tmp_path, plan, secrets)


def fails(report: dict, kind: str | None = None, service: str | None = None) -> list[dict]:
    return [f for f in report["findings"] if f["severity"] == "fail"
            and (kind is None or f["kind"] == kind) and (service is None or f["service"] == service)]


def warns(report: dict, kind: str | None = None) -> list[dict]:
    return [f for f in report["findings"] if f["severity"] == "warn" and (kind is None or f["kind"] == kind)]


def row(report: dict, service: str) -> dict:
    return next(r for r in report["rows"] if r["service"] == service)


# ---- the healthy baseline ---------------------------------------------------------------------

def test_a_healthy_stack_is_ok_with_every_figure_from_the_cgroup_tree(fake, plan):
    report = fake.judge()
    assert report["verdict"] == "ok" and report["exit_code"] == 0, report["findings"]
    assert not warns(report), warns(report)
    assert [r["service"] for r in report["rows"]] == list(plan.services)
    for name, service in plan.services.items():
        r = row(report, name)
        assert r["state"] == "ok" and r["source"] == "cgroup"
        # used = anon (40 %) + active page cache (half of 5 %), as docker stats counts it
        assert r["pct_of_budget"] == pytest.approx(42.5, abs=0.3)
        assert r["limit_mib"] == r["actual_limit_mib"] == service.mem_limit_mib
        assert r["peak_mib"] == pytest.approx(service.mem_limit_mib * 0.5, abs=1)
        assert r["cpu_pct"] == 0.0
    assert report["samples"] >= 3
    assert report["host_memory"]["containers_budget_mib"] == plan.total_mem_limit_mib
    assert report["summary"].startswith("OK: healthy and within budget")


def test_the_sampler_finds_cgroups_by_either_driver_path_without_proc(fake):
    api = fake.container("api")
    (fake.proc / str(api["State"]["Pid"]) / "cgroup").unlink()
    cgroupfs = fake.cgroup / "docker" / api["Id"]
    cgroupfs.parent.mkdir()
    fake.cgroup_dir("api").rename(cgroupfs)  # cgroupfs driver layout
    (fake.proc / str(fake.container("web")["State"]["Pid"]) / "cgroup").unlink()  # systemd layout stays
    samples = fake.sample()
    by_service = {c["start"]["service"]: c for c in samples["containers"]}
    assert by_service["api"]["cgroup"] == str(cgroupfs)
    assert by_service["web"]["cgroup"].endswith(f"system.slice/docker-{fake.container('web')['Id']}.scope")
    assert verify.evaluate(samples, fake.expected)["verdict"] == "ok"


def test_without_cgroup_files_psutil_sums_the_containers_processes(fake):
    psutil = pytest.importorskip("psutil")
    api = fake.container("api")
    api["State"]["Pid"] = os.getpid()  # this test process stands in for the container's init
    shutil.rmtree(fake.cgroup_dir("api"))
    samples = fake.sample()
    record = next(c for c in samples["containers"] if c["start"]["service"] == "api")
    assert record["source"] == "psutil" and record["cgroup"] is None
    own_rss = psutil.Process().memory_info().rss
    assert record["samples"][-1]["current"] >= own_rss * 0.8
    report = verify.evaluate(samples, fake.expected)
    assert row(report, "api")["now_mib"] >= own_rss * 0.8 / MIB
    # The limit comes from docker's HostConfig when the cgroup cannot be read.
    assert row(report, "api")["actual_limit_mib"] == fake.plan.services["api"].mem_limit_mib


# ---- events a snapshot misses -----------------------------------------------------------------

def test_an_oom_kill_with_a_restart_fails_and_names_the_container(fake):
    api = fake.container("api")
    fake.write("api", "memory.events", "low 0\nhigh 0\nmax 12\noom 1\noom_kill 1\noom_group_kill 0\n")
    end = json.loads(json.dumps(fake.state["containers"]))
    restarted = next(c for c in end if c["Id"] == api["Id"])
    restarted["RestartCount"] = 1
    restarted["State"].update(Pid=9999, OOMKilled=True, FinishedAt=docker_time(fake.now - 2),
                              StartedAt=docker_time(fake.now - 1))
    fake.state["containers_end"] = end
    fake.state["events"] = [
        {"Type": "container", "Action": "oom", "time": int(fake.now - 2),
         "Actor": {"ID": api["Id"], "Attributes": {"name": "edgefit-dify-api-1", "io.edgefit.service": "api"}}},
        {"Type": "container", "Action": "die", "time": int(fake.now - 2),
         "Actor": {"ID": api["Id"], "Attributes": {"name": "edgefit-dify-api-1", "exitCode": "137",
                                                   "io.edgefit.service": "api"}}},
    ]
    report = fake.judge()
    assert report["verdict"] == "fail" and report["exit_code"] == 1
    oom = fails(report, "oom", "api")
    assert oom and "OOM-killed" in oom[0]["message"] and "1 OOM event" in oom[0]["message"]
    assert "its last exit was an OOM kill" in oom[0]["message"]
    assert fails(report, "restart", "api")
    assert row(report, "api")["state"] == "OOM-killed"
    assert "api was OOM-killed" in report["summary"]
    assert all(f["service"] == "api" for f in fails(report))  # nothing else is blamed


def test_an_old_oom_kill_outside_the_lookback_only_warns(fake):
    api = fake.container("api")
    api["State"]["StartedAt"] = docker_time(fake.now - 3 * 86400)
    fake.write("api", "memory.events", "low 0\nhigh 0\nmax 3\noom 1\noom_kill 1\noom_group_kill 0\n")
    report = fake.judge()
    assert report["verdict"] == "ok"
    assert [f["service"] for f in warns(report, "oom")] == ["api"]


def test_unhealthy_and_restarting_containers_fail(fake):
    web = fake.container("web")
    web["State"]["Health"].update(Status="unhealthy", FailingStreak=6)
    web["State"]["Health"]["Log"][-1].update(ExitCode=1, Output="curl: (7) Failed to connect")
    sandbox = fake.container("sandbox")
    sandbox["State"].update(Status="restarting", Running=False, Restarting=True, ExitCode=1)
    report = fake.judge()
    assert "unhealthy" in fails(report, "health", "web")[0]["message"]
    assert "Failed to connect" in fails(report, "health", "web")[0]["message"]
    assert fails(report, "not_running", "sandbox")
    assert row(report, "sandbox")["state"] == "restarting"


def test_a_missing_service_fails(fake):
    fake.state["containers"] = [c for c in fake.state["containers"] if c["Config"]["Labels"]["io.edgefit.service"] != "worker"]
    report = fake.judge()
    assert fails(report, "missing", "worker")[0]["message"] == "worker is not running: no container exists"
    assert row(report, "worker")["state"] == "missing"


# ---- drift from the plan ----------------------------------------------------------------------

def test_a_limit_removed_by_hand_fails_as_drift(fake):
    fake.write("api", "memory.max", "max")
    fake.container("api")["HostConfig"].update(Memory=0, MemorySwap=0)
    report = fake.judge()
    assert fails(report, "no_limit", "api")[0]["message"].startswith("api runs without a memory limit")
    assert row(report, "api")["state"] == "no limit" and row(report, "api")["actual_limit_mib"] is None


def test_a_limit_raised_with_docker_update_fails_and_overuse_is_over_budget(fake, plan):
    planned = plan.services["worker"].mem_limit_mib
    fake.write("worker", "memory.max", str(8192 * MIB))  # docker update --memory 8g --memory-swap 8g
    fake.container("worker")["HostConfig"].update(Memory=8192 * MIB, MemorySwap=8192 * MIB)
    fake.set_memory("worker", int(planned * 1.5 * MIB))
    report = fake.judge()
    assert f"memory limit is 8192 MiB, the plan says {planned} MiB" in fails(report, "limit_drift", "worker")[0]["message"]
    assert fails(report, "over_budget", "worker")
    assert row(report, "worker")["pct_of_budget"] == pytest.approx(150, abs=0.5)


def test_a_cpu_ceiling_changed_by_hand_fails(fake):
    fake.container("db")["HostConfig"]["NanoCpus"] = 0
    assert "CPU ceiling is none" in fails(fake.judge(), "cpu_drift", "db")[0]["message"]


def test_redis_maxmemory_and_policy_changed_by_hand_fail(fake, plan):
    fake.set_redis("redis", 0, "allkeys-lru")  # CONFIG SET maxmemory 0
    fake.set_redis("redis_broker", plan.redis_broker.maxmemory_mib * MIB, "allkeys-lru")
    report = fake.judge()
    messages = [f["message"] for f in fails(report, "redis_drift")]
    assert f"redis maxmemory is 0 (unbounded), the plan says {plan.redis.maxmemory_mib} MiB" in messages
    assert "redis_broker maxmemory-policy is allkeys-lru, the plan says noeviction" in messages


def test_a_broker_that_evicts_or_is_full_fails_but_cache_evictions_are_normal(fake, plan):
    broker_max = plan.redis_broker.maxmemory_mib * MIB
    fake.set_redis("redis_broker", broker_max, "noeviction", evicted=3, used=int(broker_max * 0.97))
    fake.set_redis("redis", plan.redis.maxmemory_mib * MIB, "allkeys-lru", evicted=100)
    fake.state["redis_info_end"] = {fake.container("redis")["Id"]: "\r\nevicted_keys:250\r\nused_memory:1000\r\n"}
    report = fake.judge()
    assert fails(report, "redis_evictions", "redis_broker") and fails(report, "redis_full", "redis_broker")
    cache = [f for f in report["findings"] if f["kind"] == "redis_evictions" and f["service"] == "redis"]
    assert cache and cache[0]["severity"] == "info" and "150 key(s)" in cache[0]["message"]


def test_postgres_settings_that_differ_fail_and_unit_rounding_does_not(fake, plan):
    fake.set_postgres({"max_connections": 100, "shared_buffers": 128 * MIB})
    report = fake.judge()
    messages = sorted(f["message"] for f in fails(report, "postgres_drift"))
    assert messages == sorted([
        f"Postgres max_connections is 100, the plan says {plan.postgres.max_connections}",
        f"Postgres shared_buffers is 128 MiB, the plan says {plan.postgres.shared_buffers_mib} MiB",
    ])
    # A setting Postgres rounds to its unit (wal_buffers in 8 kB pages) is not drift.
    fake.set_postgres({})
    fake.expected["postgres"]["wal_buffers"] += 4096
    assert not fails(verify.evaluate(fake.sample(), fake.expected))
    fake.expected["postgres"]["wal_buffers"] += 8192
    assert [f["message"].split()[1] for f in fails(verify.evaluate(fake.sample(), fake.expected))] == ["wal_buffers"]


def test_gc_thresholds_not_in_effect_fail(fake):
    fake.exec_answers("worker")["python3"] = "(700, 10, 10)"
    report = fake.judge()
    finding = fails(report, "gc_drift", "worker")[0]
    assert "(700, 10, 10)" in finding["message"] and "sitecustomize" in finding["message"]


def test_hand_edited_and_missing_config_files_fail_by_path(fake):
    redis_conf = Path(fake.root + "/opt/edgefit/conf/redis/redis.conf")
    redis_conf.write_text(redis_conf.read_text().replace("maxmemory-samples 5", "maxmemory-samples 10"))
    sysctl = Path(fake.root + "/etc/sysctl.d/90-edgefit.conf")
    sysctl.unlink()
    report = fake.judge()
    messages = [f["message"] for f in fails(report, "config_drift")]
    assert any(m.startswith(f"{redis_conf} differs from what the plan renders") for m in messages)
    assert any(m.startswith(f"{sysctl} is missing on the host") for m in messages)
    assert len(messages) == 2


def test_without_the_hosts_secrets_files_are_not_compared_but_the_rest_is(fake, plan):
    expected = verify.expectations(plan, None, files_error="/etc/edgefit/secrets.env is missing on the host")
    report = verify.evaluate(fake.sample(), expected)
    assert report["verdict"] == "ok"
    assert any("config files not compared: /etc/edgefit/secrets.env is missing" in f["message"]
               for f in warns(report, "check_failed"))


# ---- warnings ---------------------------------------------------------------------------------

def test_near_the_limit_warns_and_strict_makes_it_fail(fake, plan):
    fake.set_memory("plugin_daemon", int(plan.services["plugin_daemon"].mem_limit_mib * 0.95 * MIB))
    report = fake.judge()
    assert report["verdict"] == "ok" and warns(report, "near_limit")[0]["service"] == "plugin_daemon"
    assert row(report, "plugin_daemon")["state"] == "near limit"
    strict = fake.judge(strict=True)
    assert strict["verdict"] == "fail" and strict["exit_code"] == 1


def test_a_service_pinned_at_100_percent_cpu_is_flagged(fake):
    samples = fake.sample()
    api = next(c for c in samples["containers"] if c["start"]["service"] == "api")
    first, last = api["samples"][0], api["samples"][-1]
    last["cpu_usec"] = first["cpu_usec"] + int((last["t"] - first["t"]) * 1_000_000 * 0.99)
    report = verify.evaluate(samples, fake.expected)
    pinned = warns(report, "cpu_pinned")
    assert [f["service"] for f in pinned] == ["api"] and "99 % CPU" in pinned[0]["message"]
    assert row(report, "api")["cpu_pct"] == pytest.approx(99, abs=0.5)


def test_host_pressure_low_memavailable_and_swap_warn(fake, plan):
    fake.set_pressure(30.0, 12.0, some_avg60=25.0)
    fake.set_meminfo(plan.host.memory_mib * 1024, 100 * 1024, 1024 * 1024, 100 * 1024)
    report = fake.judge()
    kinds = {f["kind"] for f in warns(report)}
    assert {"host_pressure", "host_memory", "host_swap"} <= kinds
    assert report["host_memory"]["mem_available_mib"] == 100 and report["host_memory"]["swap_used_mib"] == 924


def test_checks_that_cannot_run_are_warnings_not_crashes(fake):
    del fake.exec_answers("api")["python3"]
    report = fake.judge()
    assert any(f["service"] == "api" and "GC thresholds" in f["message"] for f in warns(report, "check_failed"))
    assert report["verdict"] == "ok"


# ---- could not check --------------------------------------------------------------------------

def test_no_stack_deployed_is_an_error_with_a_sentence(fake):
    fake.state["containers"] = []
    shutil.rmtree(fake.root + "/opt/edgefit")
    report = fake.judge()
    assert report["verdict"] == "error" and report["exit_code"] == 2
    assert "no stack deployed" in report["summary"] and "docker-compose.yml is missing" in report["summary"]


def test_docker_not_answering_is_an_error_and_the_sampler_returns_at_once(fake):
    fake.state["docker_error"] = "Cannot connect to the Docker daemon at unix:///var/run/docker.sock."
    started = time.monotonic()
    samples = fake.sample(window=5, interval=1)
    assert time.monotonic() - started < 2  # no window to watch without docker
    report = verify.evaluate(samples, fake.expected, host="h")
    assert report["exit_code"] == 2 and "Cannot connect to the Docker daemon" in report["summary"]


def test_the_sampler_stays_bounded_when_docker_exec_hangs(fake):
    fake.state["exec_sleep"] = 20
    started = time.monotonic()
    samples = fake.sample(window=0.5, interval=0.25, exec_timeout=1.0)
    elapsed = time.monotonic() - started
    assert elapsed < 0.5 + 1.0 + 1.5, elapsed
    # Checks start with the window, so each may use the window (0.5 s) plus one exec timeout.
    assert samples["checks"]["gc"]["api"] == {"error": "timed out after 1.5s"}
    report = verify.evaluate(samples, fake.expected)
    assert report["verdict"] == "ok"  # checks that did not answer are warnings, named
    assert any("api's GC thresholds: timed out" in f["message"] for f in warns(report, "check_failed"))


def test_the_sampler_runs_as_a_stdin_script_with_the_standard_library_only(fake, tmp_path):
    source = Path(sampler.__file__).read_text()
    assert not re.search(r"^\s*(from|import)\s+edgefit", source, re.M)
    fake.save()
    started = time.monotonic()
    done = subprocess.run([sys.executable, "-I", "-", *fake.sampler_args(window=1, interval=0.5)], input=source,
                          capture_output=True, text=True, timeout=30, cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    lines = done.stdout.strip().splitlines()
    assert len(lines) == 1
    samples = json.loads(lines[0])
    assert samples["elapsed_s"] < 1 + 3 and time.monotonic() - started < 1 + 5
    assert len(samples["host"]["samples"]) == 3  # t = 0, 0.5, 1
    assert verify.evaluate(samples, fake.expected)["verdict"] == "ok"


# ---- output -----------------------------------------------------------------------------------

def test_the_table_puts_the_verdict_on_top_and_a_row_per_service(fake, plan):
    fake.write("api", "memory.max", "max")
    report = fake.judge()
    report["host"] = "edge-small"
    text = verify.format_report(report)
    lines = text.splitlines()
    assert lines[0].startswith("edge-small: FAIL: 1 problem: api runs without a memory limit")
    header = next(i for i, line in enumerate(lines) if line.split()[:6] == ["service", "limit", "now", "peak", "budget", "cpu"])
    body = lines[header + 1: header + 1 + len(plan.services)]
    assert [line.split()[0] for line in body] == list(plan.services)
    api_line = next(line for line in body if line.split()[0] == "api")
    assert f"{plan.services['api'].mem_limit_mib} MiB" in api_line and api_line.rstrip().endswith("no limit")
    assert "FAIL api runs without a memory limit" in text


def test_overall_exit_code_fail_beats_could_not_check():
    ok = {"verdict": "ok"}
    fail = {"verdict": "fail"}
    error = {"verdict": "error"}
    assert verify.overall([ok, ok])[0] == 0
    assert verify.overall([ok, fail])[0] == 1
    assert verify.overall([ok, error]) == (2, "edgefit verify: COULD NOT CHECK: 2 hosts: 1 ok, 1 not checked")
    assert verify.overall([fail, error, ok])[0] == 1


def test_reports_and_expectations_are_json_and_never_hold_a_secret(fake, secrets):
    fake.write("api", "memory.max", "max")
    report = fake.judge()
    text = json.dumps(report) + json.dumps(fake.expected) + verify.format_report(report)
    for value in vars(secrets).values():
        assert value not in text
    assert json.loads(json.dumps(report))["rows"] == report["rows"]


# ---- on the host: the timer's entry point --------------------------------------------------------

def test_verify_py_runs_on_a_host_against_saved_expectations(fake, tmp_path, capsys):
    expect = tmp_path / "expect.json"
    expect.write_text(json.dumps(fake.expected))
    out = tmp_path / "last.json"
    fake.save()
    extra = shlex.join(["--cgroup-root", str(fake.cgroup), "--proc-root", str(fake.proc),
                        "--stack-dir", fake.root + verify.STACK_DIR,
                        "--docker", f"{sys.executable} {fake.docker_path} {fake.state_path}"])
    argv = ["--expect", str(expect), "--sampler", sampler.__file__, "--window", "0.3", "--interval", "0.1",
            "--json-out", str(out), "--host", "fake", "--sampler-args", extra]
    assert verify.main(argv) == 0
    printed = capsys.readouterr().out
    assert printed.startswith("OK: healthy and within budget") and "api=" in printed
    assert json.loads(out.read_text())["verdict"] == "ok"
    fake.set_redis("redis", 0, "allkeys-lru")
    fake.save()
    assert verify.main(argv) == 1
    printed = capsys.readouterr().out
    assert "FAIL redis maxmemory is 0 (unbounded)" in printed


# ---- the command line and the connection layer (subprocesses: pyinfra patches with gevent) ---------

def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_an_unreachable_host_exits_2_with_a_sentence_while_other_hosts_are_checked(tmp_path):
    port = closed_port()
    (tmp_path / "inv.py").write_text(
        f'edge = [("dead", {{"ssh_hostname": "127.0.0.1", "ssh_port": {port}, "ssh_user": "root"}}),\n'
        f'        ("@local", {{}})]\n')
    started = time.monotonic()
    done = subprocess.run([*EDGEFIT, "verify", "inv.py", "--window", "2", "--json", "out.json"], cwd=tmp_path,
                          capture_output=True, text=True, timeout=60, env={**os.environ, "PYTHONPATH": str(REPO)})
    elapsed = time.monotonic() - started
    assert done.returncode == 2, done.stdout + done.stderr
    assert "Traceback" not in done.stdout + done.stderr
    lines = done.stdout.splitlines()
    assert lines[0].startswith("edgefit verify: COULD NOT CHECK: 2 hosts")
    assert f"dead: could not check: dead is unreachable: Could not connect" in done.stdout
    assert str(port) in done.stdout
    document = json.loads((tmp_path / "out.json").read_text())
    by_host = {h["host"]: h for h in document["hosts"]}
    assert set(by_host) == {"dead", "@local"} and document["exit_code"] == 2
    # The other host was really checked: its sampler ran here and found no stack.
    assert "unreachable" not in by_host["@local"]["summary"]
    assert "no stack deployed" in by_host["@local"]["summary"] or "docker did not answer" in by_host["@local"]["summary"]
    assert elapsed < 2 + 15


def test_bad_inventories_and_limits_exit_2_with_one_line(tmp_path):
    (tmp_path / "inv.py").write_text('edge = [("a.example", {}), ("b.example", {})]\n')
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    missing = subprocess.run([*EDGEFIT, "verify", "nope.py"], cwd=tmp_path, capture_output=True, text=True,
                             timeout=60, env=env)
    assert missing.returncode == 2 and missing.stderr.strip() == "edgefit: error: inventory nope.py does not exist"
    nomatch = subprocess.run([*EDGEFIT, "verify", "inv.py", "--limit", "zzz*"], cwd=tmp_path, capture_output=True,
                             text=True, timeout=60, env=env)
    assert nomatch.returncode == 2 and "no host of inv.py matches --limit zzz*" in nomatch.stderr
    window = subprocess.run([*EDGEFIT, "verify", "inv.py", "--window", "0"], cwd=tmp_path, capture_output=True,
                            text=True, timeout=60, env=env)
    assert window.returncode == 2 and "Traceback" not in window.stderr


PLAN_SCRIPT = r'''
import json, sys
from edgefit import verify_cli
from edgefit.plan import HostSize, make_plan
from edgefit.settings import read_settings
from edgefit.secrets import Secrets

secrets = Secrets.generate()
lines = ["cpus=2", "mem_kib=4030000", "swap_kib=0", "os_id=debian", "os_version=12",
         "root_size_kib=20000000", "root_free_kib=10000000", "cgroup2=yes", verify_cli.SEPARATOR,
         "exists=yes", "size_bytes=%d" % (40 * 1024**3), "TYPE=ext4", "UUID=x", "mountpoint=/srv/dify",
         verify_cli.SEPARATOR] + secrets.to_env().splitlines()
data = {"edgefit_data_disk": "/dev/vdb", "edgefit_size_override": sys.argv[1] and json.loads(sys.argv[1])}
settings = read_settings({k: v for k, v in data.items() if v})
facts, device, text = verify_cli.parse_prepare_output(lines, settings.data_disk)
plan = verify_cli.host_plan(settings, facts, device)
expected = verify_cli.expected_for(plan, text, "h")
print(json.dumps({"host": [plan.host.cpus, plan.host.memory_mib, plan.host.disk_gib],
                  "total": plan.total_mem_limit_mib, "expected_total": expected["total_mem_limit_mib"],
                  "files": len(expected["files"]), "secret_leak": any(v in json.dumps(expected) for v in vars(secrets).values()),
                  "command": verify_cli.prepare_command(settings.data_disk)}))
'''


@pytest.mark.parametrize("override", ["", '{"cpus": 4, "memory": "8G"}'])
def test_the_plan_is_recomputed_from_the_same_facts_and_host_data_as_the_deploy(override, tmp_path):
    done = subprocess.run([sys.executable, "-c", PLAN_SCRIPT, override], capture_output=True, text=True, timeout=60,
                          cwd=tmp_path, env={**os.environ, "PYTHONPATH": str(REPO)})
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout)
    cpus, memory = (4, 8192) if override else (2, 4030000 // 1024)
    assert result["host"] == [cpus, memory, 40]  # the data disk's size, as roles/facts.py uses
    assert result["total"] == make_plan(HostSize(cpus, memory, 40)).total_mem_limit_mib == result["expected_total"]
    assert result["files"] >= 15 and not result["secret_leak"]
    assert "blockdev --getsize64 /dev/vdb" in result["command"] and "/etc/edgefit/secrets.env" in result["command"]


# ---- the verify timer (roles/verify_timer.py) ---------------------------------------------------

def test_the_timer_units_render_and_pass_systemd_analyze(tmp_path):
    sys.path.insert(0, str(REPO))
    from roles.verify_timer import TIMESPAN, render_units, since_seconds

    assert since_seconds("5min") == 900 and since_seconds("1h") == 3 * 3600 and since_seconds("60s") == 900
    assert TIMESPAN.match("300s") and not TIMESPAN.match("5 minutes") and not TIMESPAN.match("1h; rm -rf /")
    units = render_units("10min", since_seconds("10min"))
    service, timer = units["edgefit-verify.service"], units["edgefit-verify.timer"]
    assert "--events-since 1800" in service and "/usr/local/lib/edgefit/verify.py" in service
    assert "OnUnitActiveSec=10min" in timer and "WantedBy=timers.target" in timer
    for name, text in units.items():
        (tmp_path / name).write_text(text)
    if shutil.which("systemd-analyze") is None or not Path("/usr/bin/python3").exists():
        pytest.skip("systemd-analyze or /usr/bin/python3 missing here")
    done = subprocess.run(["systemd-analyze", "verify", *(str(tmp_path / n) for n in units)],
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0 and "edgefit-verify" not in done.stderr, done.stderr


def test_group_data_documents_the_timer_off_by_default():
    text = (REPO / "group_data" / "all.py").read_text()
    assert "\nedgefit_verify_timer = False" in text and 'edgefit_verify_timer_every = "5min"' in text
    assert "install_verify_timer(plan, rendered)" in (REPO / "deploy.py").read_text()
