"""`edgefit verify`'s judgement on a fake host (tests/fake_host.py): the healthy baseline,
events a snapshot misses, drift from the plan of record, warnings, could-not-check, the output,
and the timer's on-host entry point.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from edgefit import judge, sampler, verify_host
from edgefit import report as reporting
from edgefit.plan import HostSize, Options, make_plan
from edgefit.secrets import Secrets
from tests.fake_host import MIB, FakeHost, docker_time


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
    # the one warning of a default deploy: its certificate is self-signed (edgefit_tls)
    assert [w["kind"] for w in warns(report)] == ["tls_self_signed"], warns(report)
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
    assert judge.evaluate(samples, fake.expected)["verdict"] == "ok"


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
    report = judge.evaluate(samples, fake.expected)
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


def test_the_workers_planned_recycling_is_not_a_failure_but_a_crash_is(fake):
    def restart(service: str, exit_code: int) -> dict:
        end = json.loads(json.dumps(fake.state["containers"]))
        record = next(c for c in end if c["Id"] == fake.container(service)["Id"])
        record["RestartCount"] = 1
        record["State"].update(Pid=9999, ExitCode=exit_code, FinishedAt=docker_time(fake.now - 2),
                               StartedAt=docker_time(fake.now - 1))
        fake.state["containers_end"] = end
        return fake.judge()

    report = restart("worker", 0)  # the memory watchdog's warm shutdown
    assert report["verdict"] == "ok", fails(report)
    assert [f["kind"] for f in report["findings"] if f["service"] == "worker"] == ["recycled"]
    assert fails(restart("worker", 1), "restart", "worker")  # a crash is still a failure
    assert fails(restart("api", 0), "restart", "api")  # only the worker recycles itself


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
    assert not fails(judge.evaluate(fake.sample(), fake.expected))
    fake.expected["postgres"]["wal_buffers"] += 8192
    assert [f["message"].split()[1] for f in fails(judge.evaluate(fake.sample(), fake.expected))] == ["wal_buffers"]


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


def test_the_data_disk_drop_in_and_the_timer_units_are_checked_for_drift(tmp_path, secrets):
    plan = make_plan(HostSize(2, 4096, 40), Options(data_disk="/dev/vdb", verify_timer_every="5min"))
    fake = FakeHost(tmp_path, plan, secrets)
    assert fake.judge()["verdict"] == "ok"
    drop_in = Path(fake.root + "/etc/systemd/system/docker.service.d/edgefit-data-disk.conf")
    timer = Path(fake.root + "/etc/systemd/system/edgefit-verify.timer")
    module = Path(fake.root + "/usr/local/lib/edgefit/edgefit/judge.py")
    drop_in.write_text(drop_in.read_text().replace("RequiresMountsFor", "# RequiresMountsFor"))
    timer.write_text(timer.read_text().replace("OnUnitActiveSec=5min", "OnUnitActiveSec=1h"))
    module.write_text(module.read_text() + "\n# edited\n")
    messages = [f["message"] for f in fails(fake.judge(), "config_drift")]
    assert sorted(m.split()[0] for m in messages) == sorted(str(p) for p in (drop_in, timer, module))


def test_a_host_whose_memory_changed_since_the_deploy_passes_with_a_warning(fake, plan):
    # A kernel update moves MemTotal by a few MiB: the limits of the plan of record still hold.
    fake.set_meminfo((plan.host.memory_mib - 10) * 1024, plan.host.memory_mib * 1024 // 2, 1024 * 1024, 1024 * 1024)
    report = fake.judge()
    assert report["verdict"] == "ok" and report["exit_code"] == 0
    [warning] = warns(report, "host_changed")
    assert f"memory {plan.host.memory_mib} -> {plan.host.memory_mib - 10} MiB" in warning["message"]
    assert fake.judge(strict=True)["exit_code"] == 1
    # and a plan made from the new size would have moved limits: judging by it would fail the host
    moved = make_plan(HostSize(2, plan.host.memory_mib - 10, 40))
    assert moved.services["api"].mem_limit_mib != plan.services["api"].mem_limit_mib


def test_the_plan_of_record_holds_every_other_file_and_no_secret(fake, secrets):
    record = json.loads(fake.record_text())
    assert record["schema"] == 2 and record["plan"]["services"]["api"]["mem_limit_mib"]
    placed = {f.dest for f in fake.rendered} - {"/etc/edgefit/plan.json"}
    assert set(record["expect"]["files"]) == placed
    for value in vars(secrets).values():
        assert value not in fake.record_text()


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
    report = judge.evaluate(samples, fake.expected)
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


def unchecked(report: dict) -> list[dict]:
    return [f for f in report["findings"] if f["severity"] == "unchecked"]


def test_a_check_that_cannot_run_makes_the_host_incomplete_not_ok(fake):
    # A drift check that did not run has not shown there is no drift: exit 2, named, the rest judged.
    del fake.exec_answers("api")["python3"]
    report = fake.judge()
    assert [f["service"] for f in unchecked(report)] == ["api"]
    assert "GC thresholds" in unchecked(report)[0]["message"]
    assert report["verdict"] == "incomplete" and report["exit_code"] == 2
    assert report["summary"].startswith("COULD NOT CHECK 1 thing: could not read api's GC thresholds")
    code, headline = reporting.overall([report])
    assert code == 2 and "1 partly checked" in headline
    assert "NOT CHECKED could not read api's GC thresholds" in reporting.format_report(report)


def test_a_failure_outranks_a_check_that_could_not_run(fake):
    del fake.exec_answers("api")["python3"]
    fake.set_redis("redis", 0, "allkeys-lru")  # CONFIG SET maxmemory 0
    report = fake.judge()
    assert report["verdict"] == "fail" and report["exit_code"] == 1
    assert unchecked(report)


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
    report = judge.evaluate(samples, fake.expected, host="h")
    assert report["exit_code"] == 2 and "Cannot connect to the Docker daemon" in report["summary"]


def test_the_sampler_stays_bounded_when_docker_exec_hangs(fake):
    fake.state["exec_sleep"] = 20
    started = time.monotonic()
    samples = fake.sample(window=0.5, interval=0.25, exec_timeout=3.0)
    elapsed = time.monotonic() - started
    # 3 s, or more where this machine's load made the first docker call slow (the host's pace)
    exec_timeout, first_call = samples["docker"]["exec_timeout_s"], samples["docker"]["first_call_s"]
    assert exec_timeout == round(max(3.0, min(sampler.SLOW_HOST_FACTOR * first_call, sampler.MAX_EXEC_TIMEOUT)), 1)
    assert elapsed < 0.5 + exec_timeout + sampler.JOIN_SLACK_S + 2 * first_call + 1.0, elapsed
    # The checks run in lanes (Redis; two for docker exec, Postgres first) from the window's start
    # until the window plus one exec timeout: in each lane the first that hangs uses all of it,
    # the ones after it are not run, and each is named.
    checks = samples["checks"]
    answers = {"redis": checks["redis"].get("redis"), "redis_broker": checks["redis"].get("redis_broker"),
               "postgres": checks["postgres"], **{f"gc {name}": value for name, value in checks["gc"].items()}}
    assert len(answers) == 5 and all(answer and answer.get("error") for answer in answers.values()), answers
    timed_out = {name for name, answer in answers.items() if answer["error"].startswith("timed out")}
    assert timed_out == {"redis", "postgres", "gc api"}, answers  # the first of each lane
    for name in timed_out:
        assert float(re.fullmatch(r"timed out after ([\d.]+)s", answers[name]["error"])[1]) <= 0.5 + exec_timeout
    assert {answers[name]["error"] for name in answers.keys() - timed_out} == {"not run: no time left in the window"}
    report = judge.evaluate(samples, fake.expected)
    assert report["verdict"] == "incomplete" and report["exit_code"] == 2
    assert len(unchecked(report)) == 5


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
    assert judge.evaluate(samples, fake.expected)["verdict"] == "ok"


# ---- output -----------------------------------------------------------------------------------

def test_the_table_puts_the_verdict_on_top_and_a_row_per_service(fake, plan):
    fake.write("api", "memory.max", "max")
    report = fake.judge()
    report["host"] = "edge-small"
    text = reporting.format_report(report)
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
    assert reporting.overall([ok, ok])[0] == 0
    assert reporting.overall([ok, fail])[0] == 1
    assert reporting.overall([ok, error]) == (2, "edgefit verify: COULD NOT CHECK: 2 hosts: 1 ok, 1 not checked")
    assert reporting.overall([fail, error, ok])[0] == 1


def test_reports_and_expectations_are_json_and_never_hold_a_secret(fake, secrets):
    fake.write("api", "memory.max", "max")
    report = fake.judge()
    text = json.dumps(report) + json.dumps(fake.expected) + reporting.format_report(report)
    for value in vars(secrets).values():
        assert value not in text
    assert json.loads(json.dumps(report))["rows"] == report["rows"]


# ---- on the host: the timer's entry point --------------------------------------------------------

def test_verify_py_runs_on_a_host_against_saved_expectations(fake, tmp_path, capsys):
    expect = tmp_path / "plan.json"  # the plan of record, its expectations rooted in the fake tree
    expect.write_text(json.dumps({"schema": 2, "expect": fake.expected}))
    out = tmp_path / "last.json"
    fake.save()
    extra = shlex.join(["--cgroup-root", str(fake.cgroup), "--proc-root", str(fake.proc),
                        "--stack-dir", fake.root + judge.STACK_DIR,
                        "--docker", f"{sys.executable} {fake.docker_path} {fake.state_path}"])
    argv = ["--expect", str(expect), "--sampler", sampler.__file__, "--window", "0.3", "--interval", "0.1",
            "--json-out", str(out), "--host", "fake", "--sampler-args", extra]
    assert verify_host.main(argv) == 0
    printed = capsys.readouterr().out
    assert printed.startswith("OK: healthy and within budget") and "api=" in printed
    assert json.loads(out.read_text())["verdict"] == "ok"
    fake.set_redis("redis", 0, "allkeys-lru")
    fake.save()
    assert verify_host.main(argv) == 1
    printed = capsys.readouterr().out
    assert "FAIL redis maxmemory is 0 (unbounded)" in printed


# ---- the Docker API's socket instead of the docker CLI (issue 12) -----------------------------

def test_through_the_docker_socket_the_sampler_sees_what_the_cli_shows(fake, tmp_path):
    from tests.fake_docker_api import FakeDockerAPI

    fake.set_redis("redis", 0, "allkeys-lru")  # a drift, so the judgement has something to agree on
    through_cli = judge.evaluate(fake.sample(), fake.expected)
    socket_path = tmp_path / "docker.sock"
    fake.save()
    args = fake.sampler_args(docker_socket=str(socket_path))
    args[args.index("--docker") + 1] = "false"  # no docker CLI at all: every call, exec too, goes to the API
    with FakeDockerAPI(socket_path, fake.state_path) as api:
        samples = sampler.Sampler(sampler.parse_args(args)).main()
    through_socket = judge.evaluate(samples, fake.expected)
    assert samples["docker"]["via"] == "socket" and samples["errors"] == []
    assert api.requests.count("/containers/json") == 1 and "/events" in api.requests
    assert sum(1 for path in api.requests if path.startswith("/containers/") and path.endswith("/json")
               and path != "/containers/json") == 2 * len(fake.state["containers"])  # at the window's start and end
    db_id = fake.container("db")["Id"]
    assert f"POST /containers/{db_id}/exec" in api.requests
    assert "shared_buffers" in samples["checks"]["postgres"]["settings"], samples["checks"]["postgres"]
    assert samples["checks"]["gc"]["api"]["threshold"], samples["checks"]["gc"]
    assert through_socket["verdict"] == through_cli["verdict"] == "fail"
    assert [f["message"] for f in fails(through_socket)] == [f["message"] for f in fails(through_cli)]
    assert [r["state"] for r in through_socket["rows"]] == [r["state"] for r in through_cli["rows"]]


def test_a_docker_socket_that_does_not_answer_is_a_sentence(fake, tmp_path):
    dead = tmp_path / "dead.sock"
    import socket as socket_module
    listener = socket_module.socket(socket_module.AF_UNIX)
    listener.bind(str(dead))  # exists, nobody listens: connection refused
    try:
        samples = sampler.Sampler(sampler.parse_args(fake.sampler_args(docker_socket=str(dead)))).main()
    finally:
        listener.close()
    report = judge.evaluate(samples, fake.expected, host="h")
    assert report["exit_code"] == 2 and str(dead) in report["summary"]


def test_redis_endpoints_come_from_inspect_and_never_reach_the_output(fake, tmp_path):
    for service in ("redis", "redis_broker"):
        container = fake.container(service)
        container["Config"]["Env"] = ["PATH=/usr/bin", "REDISCLI_AUTH=s3cret-" + service]
        container["NetworkSettings"] = {"Networks": {"edgefit-dify_default": {"IPAddress": "127.0.0.1"}}}
    samples = fake.sample()
    # Nothing listens on 127.0.0.1:6379 here: the direct check says so, and no password is printed.
    assert samples["checks"]["redis"]["redis"]["error"].startswith("redis at 127.0.0.1:")
    assert "s3cret" not in json.dumps(samples)


def test_the_postgres_endpoint_comes_from_inspect_and_its_password_never_reaches_the_output(fake):
    container = fake.container("db")
    container["Config"]["Env"] = ["PATH=/usr/bin", "POSTGRES_PASSWORD=s3cret-db"]
    container["NetworkSettings"] = {"Networks": {"edgefit-dify_default": {"IPAddress": "127.0.0.1"}}}
    samples = fake.sample()
    # Asked directly (no psql exec): nothing here answers as that Postgres, and it says where it asked.
    assert samples["checks"]["postgres"]["error"].startswith("postgres at 127.0.0.1:")
    assert "s3cret" not in json.dumps(samples)


def test_the_deploys_image_list_is_the_same_through_the_socket_and_the_cli(fake, tmp_path):
    from edgefit.facts import SECTION, HostState
    from tests.fake_docker_api import FakeDockerAPI

    fake.state["images"] = [{"tag": "langgenius/dify-api:1.12.1", "digest": "sha256:" + "a" * 64},
                            {"tag": "redis:7.0-alpine", "digest": None}]
    want = ["langgenius/dify-api:1.12.1", "langgenius/dify-api@sha256:" + "a" * 64, "redis:7.0-alpine"]
    fake.save()
    through_cli = sampler.Sampler(sampler.parse_args(fake.sampler_args() + ["--images"])).main()
    assert through_cli["images"] == want
    with FakeDockerAPI(tmp_path / "docker.sock", fake.state_path):
        through_socket = sampler.Sampler(
            sampler.parse_args(fake.sampler_args(docker_socket=str(tmp_path / "docker.sock")) + ["--images"])).main()
    assert through_socket["images"] == want
    # and HostState hands them to converge from the snapshot section
    facts = HostState().process([f"{SECTION}snapshot", json.dumps(through_socket)])
    assert facts["images"] == want and facts["snapshot"]["docker"]["via"] == "socket"


def test_a_slow_exec_that_answers_gives_the_next_one_in_its_lane_the_time_its_pace_needs(fake):
    # Postgres answers after 4 s of a 0.3 s window + 5 s exec timeout: without the host's pace
    # the worker's GC check after it (same lane) would get well under a second and not run.
    fake.state["exec_sleep_kind"] = {"psql": 4.0}
    samples = fake.sample(window=0.3, interval=0.1, exec_timeout=5.0)
    assert "settings" in samples["checks"]["postgres"], samples["checks"]["postgres"]
    assert "threshold" in samples["checks"]["gc"]["worker"], samples["checks"]["gc"]
    assert samples["docker"]["exec_timeout_s"] > 5.0
    assert judge.evaluate(samples, fake.expected)["verdict"] == "ok"


def test_a_container_dockerd_holds_too_long_is_inspected_again_not_judged_missing(fake, tmp_path):
    from tests.fake_docker_api import FakeDockerAPI

    api_id = fake.container("api")["Id"]
    fake.state["inspect_first_delay"] = {api_id: 2.0}  # longer than the 1 s exec timeout below
    fake.save()
    with FakeDockerAPI(tmp_path / "docker.sock", fake.state_path):
        samples = sampler.Sampler(sampler.parse_args(
            fake.sampler_args(docker_socket=str(tmp_path / "docker.sock"), exec_timeout=1.0))).main()
    report = judge.evaluate(samples, fake.expected)
    assert row(report, "api")["state"] == "ok", row(report, "api")  # judged, with its figures
    assert not [f for f in report["findings"] if f["severity"] == "fail"], report["summary"]


def test_a_container_still_unreadable_after_the_retry_is_not_checked_never_missing(fake, tmp_path, monkeypatch):
    from tests.fake_docker_api import FakeDockerAPI

    monkeypatch.setattr(sampler, "INSPECT_RETRY_S", 0.5)
    api_id = fake.container("api")["Id"]
    fake.state["inspect_first_delay"] = {api_id: 3.0}
    fake.state["inspect_delayed_times"] = 2  # the first try and the retry both time out
    fake.save()
    with FakeDockerAPI(tmp_path / "docker.sock", fake.state_path):
        samples = sampler.Sampler(sampler.parse_args(
            fake.sampler_args(docker_socket=str(tmp_path / "docker.sock"), exec_timeout=1.0))).main()
    assert list(samples["uninspected"]) == ["api"] and "timed out" in samples["uninspected"]["api"]
    report = judge.evaluate(samples, fake.expected)
    assert not fails(report, "missing"), report["summary"]
    assert row(report, "api")["state"] == "not checked"
    assert report["verdict"] == "incomplete" and report["exit_code"] == judge.EXIT_ERROR
    assert "could not read api's container" in report["summary"]


def test_an_inspect_through_the_cli_that_fails_leaves_every_listed_service_not_checked(fake):
    fake.state["inspect_first_error"] = "error during connect: context deadline exceeded"
    samples = fake.sample()
    assert set(samples["uninspected"]) == set(fake.expected["services"])
    report = judge.evaluate(samples, fake.expected)
    assert not fails(report, "missing") and report["verdict"] == "incomplete"
    assert {r["state"] for r in report["rows"]} == {"not checked"}


def test_an_exec_through_the_socket_is_bounded_and_its_failures_are_named(fake, tmp_path):
    from tests.fake_docker_api import FakeDockerAPI

    fake.state["exec_sleep_kind"] = {"psql": 10.0}  # Postgres hangs
    fake.exec_answers("api").pop("python3")  # the api image has no python3 to ask
    fake.save()
    started = time.monotonic()
    with FakeDockerAPI(tmp_path / "docker.sock", fake.state_path):
        samples = sampler.Sampler(sampler.parse_args(
            fake.sampler_args(docker_socket=str(tmp_path / "docker.sock"), exec_timeout=2.0))).main()
    elapsed = time.monotonic() - started
    exec_timeout = samples["docker"]["exec_timeout_s"]
    assert elapsed < 0.3 + exec_timeout + sampler.JOIN_SLACK_S + 2.0, elapsed
    assert samples["checks"]["postgres"]["error"].startswith("timed out"), samples["checks"]["postgres"]
    assert "executable file not found" in samples["checks"]["gc"]["api"]["error"], samples["checks"]["gc"]
    # the worker's check comes after Postgres in its lane: not run, and said so
    assert samples["checks"]["gc"]["worker"]["error"] == "not run: no time left in the window"


def test_the_deploys_one_read_runs_as_one_shell_script_and_leaves_nothing_behind(tmp_path):
    """issue 12: HostState's command, run by sh here: files, hashes and directories in one stat
    and one sha256sum, the sampler in the background (a docker CLI on PATH that fails, so the
    sampler reports why), its JSON after the rest, and its temporary file removed."""
    import hashlib
    import os
    import subprocess
    from edgefit.facts import HostState
    placed = tmp_path / "placed.conf"
    placed.write_text("x = 1\n")
    os.chmod(placed, 0o640)
    (tmp_path / "bin").mkdir()
    (tmp_path / "bin" / "docker").write_text("#!/bin/sh\nexit 1\n")
    os.chmod(tmp_path / "bin" / "docker", 0o755)
    (tmp_path / "tmp").mkdir()
    fact = HostState()
    command = fact.command(paths=(str(placed), str(tmp_path / "absent.conf")), directories=(str(tmp_path),),
                           refs=(), units=(), sysctl_keys=())
    done = subprocess.run(["sh", "-c", command], capture_output=True, text=True, timeout=120,
                          env={"PATH": f"{tmp_path / 'bin'}:/usr/bin:/bin", "TMPDIR": str(tmp_path / "tmp")})
    assert done.returncode == 0, done.stderr
    facts = fact.process(done.stdout.splitlines())
    assert facts["files"] == {str(placed): {"mode": 0o640, "uid": os.getuid(), "mtime": float(int(placed.stat().st_mtime)),
                                            "sha256": hashlib.sha256(b"x = 1\n").hexdigest()}}
    assert facts["directories"] == {str(tmp_path): os.getuid()}
    assert facts["snapshot"]["docker"]["ok"] is False  # the sampler ran, and said docker did not answer
    assert list((tmp_path / "tmp").iterdir()) == []
