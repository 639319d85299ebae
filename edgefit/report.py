"""A verify report for people: the verdict first, a table per host, the problems; one line for
the journal. Standard library only (the verify timer uses it on the host)."""

from __future__ import annotations

from edgefit.judge import EXIT_ERROR, EXIT_FAIL, EXIT_OK


SHOWN = ("fail", "unchecked", "warn")  # the findings a person sees, in this order


def finding_line(finding: dict) -> str:
    label = "NOT CHECKED" if finding["severity"] == "unchecked" else finding["severity"].upper()
    return f"{label} {finding['message']}"


def _fmt(value, suffix: str = "", width: int = 0) -> str:
    text = "-" if value is None else f"{value:.0f}{suffix}"
    return text.rjust(width)


def format_report(report: dict) -> str:
    """One host: the verdict first, a table, then the problems."""
    lines = [f"{report['host'] or 'host'}: {report['summary']}"]
    if report["verdict"] == "error":
        return lines[0]
    plan, mem = report.get("plan") or {}, report.get("host_memory") or {}
    host_line = (f"  plan for {plan.get('cpus')} cores, {plan.get('memory_mib')} MiB: containers "
                 f"{mem.get('containers_now_mib', 0):.0f} of {plan.get('total_mem_limit_mib')} MiB "
                 f"({mem.get('pct_of_budget', 0):.0f} %)")
    if "mem_available_mib" in mem:
        host_line += (f"; MemAvailable {mem['mem_available_mib']} MiB (min {mem.get('mem_available_min_mib')}); "
                      f"swap {mem['swap_used_mib']}/{mem['swap_total_mib']} MiB")
    pressure = mem.get("pressure")
    if pressure:
        host_line += f"; pressure some {pressure.get('some_avg10') or 0:.1f} full {pressure.get('full_avg10') or 0:.1f}"
    lines.append(host_line)
    lines.append(f"  {'service':<14}{'limit':>9}{'now':>9}{'peak':>9}{'budget':>8}{'cpu':>7}  state")
    for row in report["rows"]:
        lines.append(f"  {row['service']:<14}{_fmt(row.get('limit_mib'), ' MiB', 9)}{_fmt(row.get('now_mib'), ' MiB', 9)}"
                     f"{_fmt(row.get('peak_mib'), ' MiB', 9)}{_fmt(row.get('pct_of_budget'), ' %', 8)}"
                     f"{_fmt(row.get('cpu_pct'), ' %', 7)}  {row['state']}")
    shown = [f for f in report["findings"] if f["severity"] in SHOWN]
    if shown:
        lines.append("  problems:" if any(f["severity"] != "warn" for f in shown) else "  warnings:")
        for finding in sorted(shown, key=lambda f: SHOWN.index(f["severity"])):
            lines.append(f"    {finding_line(finding)}")
    lines.append(f"  (window {report.get('window_s', 0):g}s, {report.get('samples')} samples; now: in use without "
                 "inactive page cache, as docker stats; peak: highest since the container started)")
    return "\n".join(lines)


def overall(reports: list[dict]) -> tuple[int, str]:
    """Exit code and the line on top: 1 when any checked host fails, else 2 when any host
    could not be checked (wholly or in part), else 0."""
    labels = (("ok", "ok"), ("fail", "failing"), ("incomplete", "partly checked"), ("error", "not checked"))
    counts = {verdict: sum(1 for r in reports if r["verdict"] == verdict) for verdict, _ in labels}
    if counts["fail"]:
        code = EXIT_FAIL
    elif counts["error"] or counts["incomplete"]:
        code = EXIT_ERROR
    else:
        code = EXIT_OK
    word = {EXIT_OK: "OK", EXIT_FAIL: "FAIL", EXIT_ERROR: "COULD NOT CHECK"}[code]
    parts = [f"{counts[v]} {label}" for v, label in labels if counts[v]]
    return code, f"edgefit verify: {word}: {len(reports)} host{'s' if len(reports) != 1 else ''}: {', '.join(parts)}"


def compact_line(report: dict) -> str:
    """One journal line per run of the timer: verdict and every service's now/limit."""
    services = " ".join(f"{r['service']}={_fmt(r.get('now_mib'))}/{_fmt(r.get('limit_mib'))}" for r in report["rows"])
    return f"{report['summary']} | MiB {services}"
