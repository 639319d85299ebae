"""Judge one host's samples against its plan of record: findings and a verdict.

Pure and standard-library only (no I/O in evaluate(), no import of the rest of edgefit but its
standard-library siblings), so the verify timer runs it on the host next to sampler.py.
limit_drift() is the one definition of a container's limit drift.

Severities: "fail" (the host is unhealthy or off its plan: exit 1), "unchecked" (a check that
could not run, e.g. a docker exec that timed out on a slow host: exit 2, verdict "incomplete",
since a drift it would have found is not known to be absent), "warn" (worth a look, exit 0
unless --strict), "info". A host that could not be checked at all has verdict "error" (exit 2).
"""

from __future__ import annotations

import re
import time
from dataclasses import dataclass
from datetime import datetime

MIB = 1024 * 1024
EXIT_OK, EXIT_FAIL, EXIT_ERROR = 0, 1, 2
NEAR_LIMIT = 0.90  # in use (as docker stats counts it) at or above this share of the limit: warn
ANON_NEAR_LIMIT = 0.90  # anonymous memory cannot be reclaimed: this close to the limit, an OOM kill is near
CPU_PINNED = 0.90  # of one core (or of the container's ceiling when lower), averaged over the window
PSI_FULL_AVG10 = 5.0  # % of time every task stalled on memory
PSI_SOME_AVG60 = 20.0
BROKER_FULL, BROKER_NEAR = 0.95, 0.80  # used_memory / maxmemory of a noeviction Redis
STATE_ORDER = ["missing", "exited", "restarting", "OOM-killed", "no limit", "over budget", "unhealthy",
               "limit drift", "restarted", "near limit", "cpu pinned", "starting", "not in plan", "not checked", "ok"]
PLANNED_RECYCLING = ("worker",)  # services that end themselves on purpose, with exit code 0
STACK_DIR = "/opt/edgefit"  # where the deploy puts docker-compose.yml (edgefit/render.py)


# ---------------------------------------------------------------------------------------------
# Helpers

PG_UNITS = {"B": 1, "kB": 1024, "8kB": 8192, "16kB": 16384, "32kB": 32768, "64kB": 65536,
            "MB": MIB, "16MB": 16 * MIB, "GB": 1024 * MIB, "TB": 1024 * 1024 * MIB}
PG_TIME_UNITS = {"us": 0.001, "ms": 1, "s": 1000, "min": 60_000, "h": 3_600_000, "d": 86_400_000}


def canonical_pg(setting: str, unit: str):
    """pg_settings (setting, unit) -> (value in bytes / ms / as is, tolerance of one unit)."""
    try:
        number = float(setting)
    except ValueError:
        return setting, 0
    if unit in PG_UNITS:
        return number * PG_UNITS[unit], PG_UNITS[unit]
    if unit in PG_TIME_UNITS:
        return number * PG_TIME_UNITS[unit], PG_TIME_UNITS[unit]
    return (int(number) if number.is_integer() else number), 0


def human_pg(name: str, value) -> str:
    if isinstance(value, (int, float)) and name.endswith(("_size", "_mem", "_buffers", "cache_size")):
        return f"{value / MIB:g} MiB" if value >= MIB else f"{value / 1024:g} kB"
    if isinstance(value, (int, float)) and name.endswith("_timeout"):
        return f"{value / 1000:g}s"
    return str(value)


def parse_docker_time(text: str | None) -> float | None:
    """'2024-05-01T12:00:00.123456789Z' -> epoch seconds; None for Docker's zero time."""
    if not text or text.startswith("0001-"):
        return None
    match = re.match(r"(\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d)(\.\d+)?(Z|[+-]\d\d:\d\d)?$", text.strip())
    if not match:
        return None
    base, fraction, zone = match.groups()
    zone = "+00:00" if zone in (None, "Z") else zone
    stamp = datetime.fromisoformat(base + zone).timestamp()
    return stamp + (float(fraction) if fraction else 0.0)


def parse_threshold(text: str | None) -> list[int] | None:
    numbers = re.findall(r"-?\d+", text or "")
    return [int(n) for n in numbers] if numbers else None


def used_bytes(sample: dict) -> int:
    """In use as `docker stats` counts it (cgroup v2): memory.current minus inactive page cache."""
    current = sample.get("current") or 0
    inactive = sample.get("inactive_file") or 0
    return current - inactive if inactive < current else current


def mib(value) -> float | None:
    return None if value is None else round(value / MIB, 1)


def seconds_text(seconds: float) -> str:
    if seconds >= 3600 and seconds % 3600 == 0:
        return f"{seconds / 3600:g}h"
    if seconds >= 60 and seconds % 60 == 0:
        return f"{seconds / 60:g}min"
    return f"{seconds:g}s"


class Findings:
    def __init__(self):
        self.items: list[dict] = []

    def add(self, severity: str, kind: str, message: str, service: str | None = None, **extra) -> None:
        self.items.append({"severity": severity, "kind": kind, "service": service, "message": message, **extra})


# ---------------------------------------------------------------------------------------------
# The judgement

def error_report(host: str, reason: str, **extra) -> dict:
    """A host that could not be checked: one sentence, exit 2."""
    return {"host": host, "verdict": "error", "exit_code": EXIT_ERROR, "summary": f"could not check: {reason}",
            "error": reason, "rows": [], "findings": [], **extra}


def _container_states(record: dict) -> tuple[dict, dict]:
    start = record.get("start") or {}
    end = record.get("end") or start
    return start, end


def evaluate(samples: dict, expected: dict, *, host: str = "", strict: bool = False) -> dict:
    """samples: the sampler's JSON document; expected: expectations(). -> the host's report."""
    if samples.get("fatal"):
        return error_report(host, f"the sampler failed on the host: {samples['fatal']}")
    docker = samples.get("docker") or {}
    containers = samples.get("containers") or []
    stack = samples.get("stack") or {}
    if not docker.get("ok"):
        reason = docker.get("error") or "docker did not answer"
        if not stack.get("compose_file"):
            return error_report(host, f"no stack deployed ({stack.get('dir', STACK_DIR)}/docker-compose.yml is "
                                      f"missing and docker did not answer: {reason})")
        return error_report(host, f"docker did not answer: {reason}")
    if not containers and not stack.get("compose_file"):
        return error_report(host, f"no stack deployed: {stack.get('dir', STACK_DIR)}/docker-compose.yml is missing "
                                  f"and no {samples.get('project', 'edgefit-dify')} containers exist; run the deploy first")

    findings = Findings()
    window = float(samples.get("window_s") or 0)
    ended = float(samples.get("ended") or samples.get("started") or time.time())
    events_since = ended - float(samples.get("events_since_s") or 3600)
    lookback_text = seconds_text(float(samples.get("events_since_s") or 3600))
    host_samples = (samples.get("host") or {}).get("samples") or []
    swap_total_kib = (host_samples[-1]["meminfo_kib"].get("SwapTotal", 0) if host_samples else 0)
    planned = expected.get("services") or {}

    # Group containers by service: the running one first.
    by_service: dict[str, list[dict]] = {}
    for record in containers:
        start, end = _container_states(record)
        by_service.setdefault(start.get("service") or "?", []).append(record)
    for records in by_service.values():
        records.sort(key=lambda r: not _container_states(r)[1].get("running"))

    events = samples.get("events") or []
    judged_window = Window(window, events, events_since, lookback_text, swap_total_kib)
    rows = []
    uninspected = samples.get("uninspected") or {}
    for service in list(planned) + sorted((set(by_service) | set(uninspected)) - set(planned)):
        plan_service = planned.get(service)
        records = by_service.get(service, [])
        if not records and service in uninspected:  # listed, but dockerd did not describe it in time
            findings.add("unchecked", "check_failed", f"could not read {service}'s container: {uninspected[service]}",
                         service)
            rows.append({"service": service, "container": None, "limit_mib": (plan_service or {}).get("mem_limit_mib"),
                         "states": ["not checked"], "state": "not checked"})
            continue
        if not records:
            findings.add("fail", "missing", f"{service} is not running: no container exists", service)
            rows.append({"service": service, "container": None, "limit_mib": plan_service["mem_limit_mib"],
                         "states": ["missing"], "state": "missing"})
            continue
        record = records[0]
        for extra in records[1:]:
            findings.add("warn", "duplicate", f"{service}: another container {extra['start'].get('name')} "
                                              f"({extra['start'].get('status')}) belongs to it", service)
        rows.append(_judge_container(service, record, plan_service, findings, judged_window))

    host_figures = _judge_host(samples, expected, rows, findings)
    _judge_host_change(samples, expected, findings)
    _judge_checks(samples, expected, findings)
    _judge_files(samples, expected, findings)
    if expected.get("tls") == "self-signed":
        findings.add("warn", "tls_self_signed", "self-signed certificate: browsers warn on every new visit; "
                                                "set edgefit_tls = \"provided\" with a real certificate")
    for error in samples.get("errors") or []:
        findings.add("warn", "check_failed", f"sampler: {error}")

    # Each row's state: the worst of its findings.
    for row in rows:
        row["state"] = min(row.get("states") or ["ok"], key=STATE_ORDER.index)

    items = findings.items
    failing = [f for f in items if f["severity"] == "fail" or (strict and f["severity"] == "warn")]
    warnings = [f for f in items if f["severity"] == "warn" and f not in failing]
    unchecked = [f for f in items if f["severity"] == "unchecked"]
    if failing:
        verdict, code = "fail", EXIT_FAIL
        summary = f"FAIL: {len(failing)} problem{'s' if len(failing) != 1 else ''}: " + \
            "; ".join(f["message"] for f in failing[:3]) + ("; ..." if len(failing) > 3 else "")
    elif unchecked:
        verdict, code = "incomplete", EXIT_ERROR
        summary = (f"COULD NOT CHECK {len(unchecked)} thing{'s' if len(unchecked) != 1 else ''}: "
                   + "; ".join(f["message"] for f in unchecked[:3]) + ("; ..." if len(unchecked) > 3 else "")
                   + "; nothing else failed")
    else:
        verdict, code = "ok", EXIT_OK
        summary = (f"OK: healthy and within budget ({host_figures['containers_now_mib']:.0f} of "
                   f"{expected.get('total_mem_limit_mib')} MiB in use)")
        if warnings:
            summary += f"; {len(warnings)} warning{'s' if len(warnings) != 1 else ''}"
    return {
        "host": host, "verdict": verdict, "exit_code": code, "summary": summary,
        "window_s": window, "samples": len(host_samples), "sampler_elapsed_s": samples.get("elapsed_s"),
        # the host's pace as the sampler saw it: its first docker call, and the exec timeout it chose
        "first_docker_call_s": docker.get("first_call_s"), "exec_timeout_s": docker.get("exec_timeout_s"),
        "plan": {"cpus": expected["host"]["cpus"], "memory_mib": expected["host"]["memory_mib"],
                 "preset": expected.get("preset"), "total_mem_limit_mib": expected.get("total_mem_limit_mib"),
                 "reserve_mib": expected.get("reserve_mib")},
        "host_memory": host_figures, "rows": rows, "findings": items,
        "events": events, "checks": samples.get("checks"),
    }


@dataclass(frozen=True)
class Window:
    """What every container is judged within: the sampling window and the events lookback."""

    seconds: float
    events: list
    events_since: float  # epoch seconds: OOM kills and exits after this count
    lookback_text: str
    swap_total_kib: int


def _judge_container(service, record, plan_service, findings, window: Window) -> dict:
    start, end = _container_states(record)
    name = end.get("name") or start.get("name")
    states: list[str] = []
    row = {"service": service, "container": name, "limit_mib": plan_service["mem_limit_mib"] if plan_service else None,
           "source": record.get("source"), "restart_count": end.get("restart_count"),
           "health": (end.get("health") or {}).get("status")}
    if plan_service is None:
        findings.add("warn", "unplanned", f"{service} ({name}) runs but is not in this host's plan", service)
        states.append("not in plan")
    _judge_running(service, start, end, window, findings, states)
    _judge_health(service, end, findings, states)
    _judge_oom(service, record, window, findings, states)
    series = record.get("samples") or []
    if not series:
        if end.get("running"):
            findings.add("warn", "no_figures", f"{service}: no memory figures (no cgroup files and no psutil)", service)
    else:
        row.update(memory_figures(record))
        _judge_limits(service, record, plan_service, row, window, findings, states)
        _judge_cpu(service, plan_service, row, findings, states)
    row["states"] = states
    return row


def _judge_running(service, start, end, window: Window, findings, states) -> None:
    if not end.get("running"):
        status = end.get("status") or "not running"
        code = end.get("exit_code")
        states.append("restarting" if end.get("restarting") else "exited")
        findings.add("fail", "not_running", f"{service} is {status}" + (f" (exit code {code})" if code else ""), service)
    restarts = (end.get("restart_count") or 0) - (start.get("restart_count") or 0)
    restarted = restarts > 0 or (end.get("id") and start.get("id") and start.get("pid") and end.get("pid")
                                 and start.get("pid") != end.get("pid"))
    if restarted and service in PLANNED_RECYCLING and end.get("exit_code") == 0 and not end.get("oom_killed"):
        # The worker's memory watchdog (templates/sitecustomize.py.j2) ends it with a warm
        # shutdown, exit 0, before its limit: planned, not a crash.
        findings.add("info", "recycled", f"{service} was recycled during the window (clean exit: "
                                         "the memory watchdog's warm shutdown)", service)
    elif restarted:
        states.append("restarted")
        findings.add("fail", "restart", f"{service} restarted {max(restarts, 1)} time(s) during the "
                                        f"{window.seconds:g}s window", service)
    elif (end.get("restart_count") or 0) > 0:
        findings.add("info", "restart_count", f"{service} has been restarted {end['restart_count']} time(s) "
                                              "since it was created", service)


def _judge_health(service, end, findings, states) -> None:
    health = end.get("health") or {}
    if health.get("status") == "unhealthy":
        states.append("unhealthy")
        last = next((entry for entry in reversed(health.get("log") or []) if entry.get("exit_code")), {})
        findings.add("fail", "health", f"{service} is unhealthy: healthcheck failed "
                                       f"{health.get('failing_streak', 0)} time(s) in a row"
                                       + (f" ({last['output'][:80]})" if last.get("output") else ""), service)
    elif health.get("status") == "starting":
        states.append("starting")
        findings.add("warn", "health", f"{service}'s healthcheck has not passed yet (starting)", service)
    elif health.get("failing_streak"):
        findings.add("warn", "health", f"{service}'s healthcheck failed its last {health['failing_streak']} "
                                       "run(s) but it is still counted healthy", service)


def _judge_oom(service, record, window: Window, findings, states) -> None:
    """OOM kills from three witnesses: docker's events, its last exit, and the cgroup's counter."""
    start, end = _container_states(record)
    cg_start, cg_end = record.get("cgroup_start") or {}, record.get("cgroup_end") or {}
    ids = {start.get("id"), end.get("id")}
    oom_events = [e for e in window.events if e.get("action") == "oom" and (e.get("id") in ids or e.get("service") == service)]
    die_events = [e for e in window.events if e.get("action") == "die" and e.get("id") in ids
                  and e.get("exit_code") not in (None, 0, 143)]
    finished = parse_docker_time(end.get("finished_at"))
    last_exit_oom = bool(end.get("oom_killed")) and finished is not None and finished >= window.events_since
    kills_start = ((cg_start.get("events") or {}).get("oom_kill") or 0)
    kills_end = ((cg_end.get("events") or {}).get("oom_kill") or 0)
    started_at = parse_docker_time(end.get("started_at"))
    details = []
    if oom_events:
        details.append(f"{len(oom_events)} OOM event(s) from docker in the last {window.lookback_text}")
    if last_exit_oom:
        details.append("its last exit was an OOM kill")
    if kills_end > kills_start:
        details.append(f"{kills_end - kills_start} process(es) killed during the window (memory.events)")
    elif kills_end and started_at is not None and started_at >= window.events_since:
        details.append(f"{kills_end} process(es) killed since it started (memory.events)")
    if details:
        states.append("OOM-killed")
        findings.add("fail", "oom", f"{service} was OOM-killed: " + ", ".join(details), service,
                     oom_events=len(oom_events), oom_kill=kills_end)
    elif kills_end:
        findings.add("warn", "oom", f"{service}: {kills_end} process(es) OOM-killed inside it since it started "
                                    f"(more than {window.lookback_text} ago; memory.events)", service)
    if die_events and not details:
        codes = sorted({e["exit_code"] for e in die_events})
        findings.add("warn", "exited", f"{service} exited {len(die_events)} time(s) in the last {window.lookback_text} "
                                       f"(exit code {', '.join(map(str, codes))})", service)


def memory_figures(record) -> dict:
    """The row's figures from the container's samples (MiB, and CPU % over the window)."""
    series = record["samples"]
    cg_end = record.get("cgroup_end") or {}
    last = series[-1]
    now = used_bytes(last)
    peak_window = max(used_bytes(s) for s in series)
    peak_kernel = cg_end.get("peak") if isinstance(cg_end.get("peak"), int) else None
    figures = {
        "now_mib": mib(now), "anon_mib": mib(last.get("anon")), "cache_mib": mib(last.get("file")),
        "current_mib": mib(last.get("current")), "peak_window_mib": mib(peak_window),
        "peak_kernel_mib": mib(peak_kernel), "peak_mib": mib(peak_kernel if peak_kernel is not None else peak_window),
    }
    first_cpu = next((s for s in series if s.get("cpu_usec") is not None), None)
    if first_cpu is not None and last.get("cpu_usec") is not None and last["t"] > first_cpu["t"]:
        cores = (last["cpu_usec"] - first_cpu["cpu_usec"]) / 1e6 / (last["t"] - first_cpu["t"])
        figures["cpu_pct"] = round(max(0.0, cores) * 100, 1)
    return figures


def limit_drift(service: str, plan_service: dict, memory_limit, nano_cpus) -> list[tuple[str, str, str]]:
    """-> (kind, state, message) for each limit in force that is not the plan's. One definition of
    limit drift, for verify's judgement and the deploy's converge step (memory_limit: bytes or
    "max"/None for none; nano_cpus: docker's NanoCpus, 0 for none)."""
    drift = []
    planned_bytes = plan_service["mem_limit_mib"] * MIB
    if memory_limit in ("max", None, 0):
        drift.append(("no_limit", "no limit", f"{service} runs without a memory limit (plan: "
                                              f"{plan_service['mem_limit_mib']} MiB)"))
    elif abs(memory_limit - planned_bytes) > MIB:
        drift.append(("limit_drift", "limit drift", f"{service}'s memory limit is {memory_limit / MIB:.0f} MiB, "
                                                    f"the plan says {plan_service['mem_limit_mib']} MiB"))
    nano = nano_cpus or 0
    if plan_service.get("cpus") and abs(nano / 1e9 - plan_service["cpus"]) > 0.01:
        drift.append(("cpu_drift", "limit drift", f"{service}'s CPU ceiling is "
                                                  f"{'none' if not nano else f'{nano / 1e9:g} cores'}, the plan says "
                                                  f"{plan_service['cpus']:g}"))
    return drift


def _judge_limits(service, record, plan_service, row, window: Window, findings, states) -> None:
    """The limits actually in force against the plan, and the use against the budget."""
    _, end = _container_states(record)
    cg_end = record.get("cgroup_end") or {}
    last = record["samples"][-1]
    limit = cg_end.get("max")  # the kernel's word first; docker's HostConfig where it is missing
    if limit is None:
        limit = end.get("memory_bytes") or "max"
    row["actual_limit_mib"] = None if limit == "max" else mib(limit)
    if plan_service is None:
        return
    for kind, state, message in limit_drift(service, plan_service, limit, end.get("nano_cpus")):
        states.append(state)
        findings.add("fail", kind, message, service)
    swap_max = cg_end.get("swap_max")
    if window.swap_total_kib and (swap_max == "max" or (isinstance(swap_max, int) and swap_max > 0)):
        findings.add("warn", "swap_drift", f"{service} may swap "
                                           f"{'without bound' if swap_max == 'max' else f'{swap_max / MIB:.0f} MiB'} "
                                           "beyond its limit (plan: memswap_limit = mem_limit)", service)
    planned_bytes = plan_service["mem_limit_mib"] * MIB
    now = used_bytes(last)
    pct = now / planned_bytes * 100
    row["pct_of_budget"] = round(pct, 1)
    if now > planned_bytes:
        states.append("over budget")
        findings.add("fail", "over_budget", f"{service} uses {now / MIB:.0f} MiB, over its budget of "
                                            f"{plan_service['mem_limit_mib']} MiB", service)
    elif now >= NEAR_LIMIT * planned_bytes:
        states.append("near limit")
        findings.add("warn", "near_limit", f"{service} uses {pct:.0f} % of its {plan_service['mem_limit_mib']} MiB "
                                           "budget", service)
    elif (last.get("anon") or 0) >= ANON_NEAR_LIMIT * planned_bytes:
        states.append("near limit")
        findings.add("warn", "near_limit", f"{service}'s anonymous memory is at "
                                           f"{last['anon'] / planned_bytes * 100:.0f} % of its budget", service)


def _judge_cpu(service, plan_service, row, findings, states) -> None:
    if row.get("cpu_pct") is None:
        return
    ceiling = min(1.0, plan_service["cpus"]) if plan_service and plan_service.get("cpus") else 1.0
    if row["cpu_pct"] / 100 >= CPU_PINNED * ceiling:
        states.append("cpu pinned")
        findings.add("warn", "cpu_pinned", f"{service} used {row['cpu_pct']:.0f} % CPU over the window "
                                           f"(ceiling {ceiling:g} core): pinned, as the image-streaming bug "
                                           "pinned api", service)


def _judge_host(samples, expected, rows, findings) -> dict:
    host = samples.get("host") or {}
    series = host.get("samples") or []
    figures: dict = {"containers_now_mib": round(sum(r.get("now_mib") or 0 for r in rows), 1),
                     "containers_budget_mib": expected.get("total_mem_limit_mib")}
    budget = expected.get("total_mem_limit_mib") or 0
    if budget:
        figures["pct_of_budget"] = round(figures["containers_now_mib"] / budget * 100, 1)
        if figures["containers_now_mib"] > budget:
            findings.add("fail", "host_budget", f"containers use {figures['containers_now_mib']:.0f} MiB, over "
                                                f"the {budget} MiB budget of all containers")
    if series:
        last = series[-1]["meminfo_kib"]
        available = [s["meminfo_kib"].get("MemAvailable") for s in series if s["meminfo_kib"].get("MemAvailable")]
        figures.update({
            "mem_total_mib": round(last.get("MemTotal", 0) / 1024),
            "mem_available_mib": round(last.get("MemAvailable", 0) / 1024),
            "mem_available_min_mib": round(min(available) / 1024) if available else None,
            "swap_total_mib": round(last.get("SwapTotal", 0) / 1024),
            "swap_used_mib": round((last.get("SwapTotal", 0) - last.get("SwapFree", 0)) / 1024),
        })
        reserve = expected.get("reserve_mib") or 0
        if available and reserve and min(available) / 1024 < reserve / 2:
            findings.add("warn", "host_memory", f"host MemAvailable fell to {min(available) / 1024:.0f} MiB, below "
                                                f"half the {reserve} MiB the plan keeps for the host")
        if figures["swap_total_mib"] and figures["swap_used_mib"] > figures["swap_total_mib"] / 2:
            findings.add("warn", "host_swap", f"host swap {figures['swap_used_mib']} of "
                                              f"{figures['swap_total_mib']} MiB in use")
    psi = host.get("psi_end")
    if psi:
        some, full = psi.get("some") or {}, psi.get("full") or {}
        figures["pressure"] = {"some_avg10": some.get("avg10"), "some_avg60": some.get("avg60"),
                               "full_avg10": full.get("avg10"), "full_avg60": full.get("avg60")}
        start = (host.get("psi_start") or {}).get("full") or {}
        if full.get("total") is not None and start.get("total") is not None:
            figures["pressure"]["full_stall_ms_in_window"] = round((full["total"] - start["total"]) / 1000, 1)
        if (full.get("avg10") or 0) >= PSI_FULL_AVG10 or (some.get("avg60") or 0) >= PSI_SOME_AVG60:
            findings.add("warn", "host_pressure", f"memory pressure on the host: some avg60 "
                                                  f"{some.get('avg60', 0):.1f} %, full avg10 {full.get('avg10', 0):.1f} %")
    if host.get("cgroup2") is False:
        findings.add("warn", "no_cgroup2", "the host has no cgroup v2: limits and figures are not reliable")
    return figures


def _judge_host_change(samples, expected, findings) -> None:
    """The plan of record is the judge; a host that changed since the deploy (a kernel update
    moves MemTotal by a few MiB, a resize by more) is named, not failed."""
    reported = expected.get("reported_host") or {}
    host = samples.get("host") or {}
    series = host.get("samples") or []
    now = {"cpus": host.get("cpus"),
           "memory_mib": series[-1]["meminfo_kib"].get("MemTotal", 0) // 1024 if series else None}
    changes = [f"{what} {reported[key]} -> {now[key]}{unit}" for key, what, unit in
               (("memory_mib", "memory", " MiB"), ("cpus", "cores", ""))
               if now.get(key) and reported.get(key) and now[key] != reported[key]]
    if changes:
        findings.add("warn", "host_changed", "the host changed since the deploy (" + ", ".join(changes) +
                     "); judged against the plan of record: re-deploy to plan for the new size")


def _judge_checks(samples, expected, findings) -> None:
    checks = samples.get("checks") or {}
    running = {((r.get("end") or r.get("start") or {}).get("service")) for r in samples.get("containers") or []
               if (r.get("end") or r.get("start") or {}).get("running")}
    for service, want in (expected.get("redis") or {}).items():
        got = _answer(checks, "redis", service, running, f"{service}'s settings", findings)
        if got:
            for kind, message in redis_drift(service, want, got.get("config") or {}, got.get("info") or {}):
                findings.add("fail", kind, message, service)
            _judge_redis_use(service, want, got, findings)
    if expected.get("postgres"):
        got = _answer(checks, "postgres", "db", running, "Postgres settings", findings)
        if got:
            for message in postgres_drift(expected["postgres"], got.get("settings") or {}):
                findings.add("fail", "postgres_drift", message, "db")
    want = expected.get("gc_threshold")
    for service in expected.get("gc_services") or []:
        got = _answer(checks, "gc", service, running, f"{service}'s GC thresholds", findings)
        threshold = parse_threshold(got.get("threshold")) if got else want
        if threshold != want:  # read in a new process with the container's environment
            findings.add("fail", "gc_drift", f"{service} runs with GC thresholds {tuple(threshold or [])}, the plan "
                                             f"says {tuple(want)}: the sitecustomize hook is not in effect", service)


def _answer(checks: dict, kind: str, service: str, running: set, what: str, findings) -> dict | None:
    """The sampler's answer for one service's check; None (with a warning) when it could not run."""
    if service not in running:
        return None
    got = checks.get(kind) if kind == "postgres" else (checks.get(kind) or {}).get(service)
    if not got or got.get("error"):
        findings.add("unchecked", "check_failed", f"could not read {what}: {(got or {}).get('error', 'no answer')}",
                      service)
        return None
    return got


def redis_drift(service: str, want: dict, config: dict, info: dict) -> list[tuple[str, str]]:
    """-> (kind, message) for each Redis setting in force that is not the plan's: the one
    definition for verify and the deploy's converge step."""
    drift = []
    maxmemory = config.get("maxmemory", info.get("maxmemory"))
    policy = config.get("maxmemory-policy", info.get("maxmemory_policy"))
    try:
        maxmemory = int(maxmemory)
    except (TypeError, ValueError):
        maxmemory = None
    if maxmemory is not None and maxmemory != want["maxmemory_bytes"]:
        drift.append(("redis_drift", f"{service} maxmemory is "
                                     f"{'0 (unbounded)' if maxmemory == 0 else f'{maxmemory / MIB:g} MiB'}, "
                                     f"the plan says {want['maxmemory_bytes'] / MIB:g} MiB"))
    if policy is not None and policy != want["policy"]:
        drift.append(("redis_drift", f"{service} maxmemory-policy is {policy}, the plan says {want['policy']}"))
    return drift


def _judge_redis_use(service: str, want: dict, got: dict, findings) -> None:
    """Evictions, and a noeviction broker close to full."""
    info = got.get("info") or {}
    evicted = info.get("evicted_keys")
    evicted_end = (got.get("info_end") or {}).get("evicted_keys", evicted)
    if isinstance(evicted, int) and isinstance(evicted_end, int):
        if want["policy"] == "noeviction" and evicted_end > 0:
            findings.add("fail", "redis_evictions", f"{service} evicted {evicted_end} key(s): Celery's queue and "
                                                    "binding keys may be lost (it must never evict)", service)
        elif evicted_end > evicted:
            findings.add("info", "redis_evictions", f"{service} evicted {evicted_end - evicted} key(s) during the "
                                                    "window (an LRU cache at its maxmemory)", service)
    used = info.get("used_memory")
    if want["policy"] == "noeviction" and isinstance(used, int) and want["maxmemory_bytes"]:
        share = used / want["maxmemory_bytes"]
        if share >= BROKER_FULL:
            findings.add("fail", "redis_full", f"{service} is full ({share * 100:.0f} % of maxmemory): Celery "
                                               "can no longer publish tasks", service)
        elif share >= BROKER_NEAR:
            findings.add("warn", "redis_full", f"{service} at {share * 100:.0f} % of maxmemory", service)


def postgres_drift(want: dict, settings: dict) -> list[str]:
    """Postgres settings in force (pg_settings rows: name -> {setting, unit}) that are not the plan's."""
    drift = []
    for name, wanted in want.items():
        row = settings.get(name)
        if row is None:
            continue
        value, tolerance = canonical_pg(row["setting"], row["unit"])
        same = (abs(value - wanted) <= max(tolerance, 0) if isinstance(value, (int, float))
                and isinstance(wanted, (int, float)) and tolerance else value == wanted)
        if not same:
            drift.append(f"Postgres {name} is {human_pg(name, value)}, the plan says {human_pg(name, wanted)}")
    return drift


def _judge_files(samples, expected, findings) -> None:
    want = expected.get("files") or {}
    got = samples.get("files") or {}
    for path, digest in sorted(want.items()):
        if path not in got:
            continue  # not asked for
        if got[path] is None:
            findings.add("fail", "config_drift", f"{path} is missing on the host (re-deploy to restore it)")
        elif got[path] != digest:
            findings.add("fail", "config_drift", f"{path} differs from what the plan renders "
                                                 "(hand-edited or stale; re-deploy to restore it)")
