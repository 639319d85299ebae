"""Role "upgrade": a deploy that changes Dify's images backs up first, gates, and rolls back.

Only when edgefit/converge.py found an upgrade (an image of api, worker, worker_beat, web,
plugin_daemon or sandbox differs from the plan of record's), so a host at its plan still gets no
operation. prepare_upgrade runs before anything else changes: the pre-upgrade backup under
DATA_ROOT/pre-upgrade-backups/ and the compose definition and plan of record it replaces
(edgefit/host_backup.py `pre-upgrade`). gate_upgrade replaces the stack role's plain health wait:
the same bounded wait, then verify's checks for the upgraded services over a short window; on a
failure it rolls back by itself (host_backup.py `rollback`, then the health wait again) unless
edgefit_rollback = False, and fails the host with one message naming the service, its last log
lines, whether it rolled back, and where the backup is. With pyinfra's `--serial --fail-percent 0`
the failed host stops the rollout before the next host is touched.
"""

from __future__ import annotations

import json
import shlex
import time
from pathlib import Path

from pyinfra import host, logger
from pyinfra.api import deploy
from pyinfra.operations import files, python, server

from edgefit import host_backup, judge, remote
from edgefit import sampler as sampler_module
from edgefit.converge import Changes
from edgefit.expectations import expectations
from edgefit.plan import Plan
from edgefit.render import StackFile
from edgefit.settings import DeploySettings
from edgefit.upgrade import (BACKUP_SUBDIR, BACKUPS_KEPT, GATE_WINDOW_S, LOG_LINES, failing_services, failure_message,
                             gate_failures, rollback_wait_s, upgrade_summary)
from roles.stack import COMPOSE, wait_healthy_command

SCRIPT = f"python3 {host_backup.HOST_SCRIPT}"


@deploy("Upgrade: pre-upgrade backup")
def prepare_upgrade(plan: Plan, changes: Changes) -> None:
    if not changes.upgrade:
        return
    summary = upgrade_summary(changes.upgrade)
    root = f"{plan.data_root}/{BACKUP_SUBDIR}"
    files.put(name="edgefit's backup script", src=host_backup.__file__, dest=host_backup.HOST_SCRIPT, mode="644")
    server.shell(name=f"Back up before the upgrade to {root}/",
                 commands=[f"{SCRIPT} pre-upgrade --host {shlex.quote(host.name)} --name {host_backup.stamp_now()} "
                           f"--root {shlex.quote(root)} --keep {BACKUPS_KEPT} --upgrade {shlex.quote(summary)}"])


@deploy("Upgrade: health gate")
def gate_upgrade(plan: Plan, rendered: list[StackFile], settings: DeploySettings, changes: Changes) -> None:
    if not changes.upgrade:
        return
    # Only plain values reach the callback: nothing that holds a rendered secret or a TLS key.
    python.call(name=f"Health gate for {', '.join(sorted(changes.upgrade))}"
                     + (" (rolled back on failure)" if settings.rollback else ""),
                function=run_gate, expected=expectations(plan, rendered), data_root=plan.data_root,
                upgrade=dict(changes.upgrade), health_timeout_s=settings.health_timeout_s, rollback=settings.rollback)


def _run(state, target, command: str, timeout: float, stdin: str | None = None) -> tuple[bool, list[str], list[str]]:
    arguments = {**remote.executor_arguments(state, target), "_timeout": int(timeout)}
    if stdin is not None:
        arguments["_stdin"] = stdin
    try:
        ok, output = target.run_shell_command(command, print_output=False, **arguments)
    except TimeoutError:
        return False, [], [f"did not finish within {timeout:.0f}s"]
    return ok, output.stdout_lines, output.stderr_lines


def _verify_upgraded(state, target, expected: dict, since_s: float) -> dict:
    """verify's judgement of the stack over a short window, against the plan being deployed."""
    options = remote.VerifyOptions(window=GATE_WINDOW_S, interval=2.0, events_since=since_s)
    ok, stdout, stderr = _run(state, target, remote.sampler_command(options, []),
                              GATE_WINDOW_S + remote.SAMPLER_SLACK, stdin=Path(sampler_module.__file__).read_text())
    try:
        samples = json.loads([line for line in stdout if line.strip()][-1])
    except (IndexError, ValueError):
        return judge.error_report(target.name, f"the sampler printed no result ({(stderr or ['no output'])[-1][:200]})")
    return judge.evaluate(samples, expected, host=target.name)


def run_gate(state, host, expected: dict, data_root: str, upgrade: dict[str, tuple[str, str]],
             health_timeout_s: int, rollback: bool) -> bool:
    """pyinfra calls this with (state, host) and fails the host when it returns False."""
    services = sorted(upgrade)
    began = time.monotonic()
    timeout = health_timeout_s
    healthy, output, _ = _run(state, host, wait_healthy_command(timeout, list(expected["services"])), timeout + 120)
    what, service = None, None
    if not healthy:
        named = failing_services(output, services)
        service = named[0] if named else None
        what = (f"{', '.join(named) or 'the stack'} not healthy and stable within {timeout}s "
                "(edgefit_health_timeout)")
    else:
        report = _verify_upgraded(state, host, expected, time.monotonic() - began + 60)
        failed = gate_failures(report, services)
        if report.get("verdict") == "error":
            what = f"verify could not check the upgraded services: {report.get('error')}"
        elif failed:
            what, service = f"verify: {failed[0]['message']}", failed[0]["service"]
    if what is None:
        _run(state, host, f"{SCRIPT} upgraded", 60)
        host.log_styled(f"upgrade passed its health gate: {upgrade_summary(upgrade)}", fg="green",
                        log_func=logger.info)
        return True

    logs = _run(state, host, f"{COMPOSE} logs --no-color --tail {LOG_LINES} {shlex.quote(service)} 2>&1",
                60)[1] if service else []
    _, state_lines, _ = _run(state, host, f"cat {host_backup.UPGRADE_STATE} 2>/dev/null || true", 30)
    try:
        backup = json.loads("\n".join(state_lines))["backup"]
    except (ValueError, KeyError, TypeError):
        backup = f"the newest one under {data_root}/{BACKUP_SUBDIR}/"
    rolled_back = None
    if rollback:
        host.log_styled(f"upgrade failed ({what}); rolling back to the previous release and the pre-upgrade "
                        f"backup {backup} ...", fg="yellow", log_func=logger.warning)
        ok, out, err = _run(state, host, f"{SCRIPT} rollback", host_backup.COMMAND_TIMEOUT)
        if ok:  # its timed progress lines (paths and services, no values): what the minutes went on
            host.log_styled("\n".join(out[-LOG_LINES:]), log_func=logger.info)
            ok, out, err = _run(state, host, wait_healthy_command(rollback_wait_s(timeout)),
                                rollback_wait_s(timeout) + 120)
        rolled_back = ok
        if not ok:
            host.log_styled("\n".join(["the rollback failed:", *(out + err)[-LOG_LINES:]]), fg="red",
                            log_func=logger.error)
    host.log_styled(failure_message(host.name, what, service, logs, backup, rolled_back), fg="red",
                    log_func=logger.error)
    return False
