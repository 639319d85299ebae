"""Role "verify_timer": `edgefit verify` on the host itself every few minutes (opt-in).

With host data edgefit_verify_timer = True the deploy installs edgefit/sampler.py and
edgefit/verify.py (standard library only) in /usr/local/lib/edgefit/, the plan's expectations
(limits, settings, sha256 of every rendered file; no secret) in /etc/edgefit/verify-expect.json,
and a systemd timer that logs a verdict to the journal every edgefit_verify_timer_every.
Turned off again, the next deploy stops and removes the timer. Unchanged, it changes nothing.
"""

import json
import re
from io import StringIO
from pathlib import Path

import jinja2
from pyinfra import host
from pyinfra.api import DeployError, deploy
from pyinfra.facts.files import File
from pyinfra.operations import files, server, systemd

from edgefit import sampler, verify
from edgefit.plan import Plan
from edgefit.render import STACK_DIR, TEMPLATES_DIR, StackFile

LIB_DIR = "/usr/local/lib/edgefit"
EXPECT_PATH = "/etc/edgefit/verify-expect.json"
REPORT_PATH = "/var/lib/edgefit/verify-last.json"
UNIT_DIR = "/etc/systemd/system"
SERVICE, TIMER = "edgefit-verify.service", "edgefit-verify.timer"
WINDOW_S, INTERVAL_S = 20, 5
TIMESPAN = re.compile(r"^\d+(s|sec|m|min|h|hr)$")


def timer_settings() -> tuple[bool, str]:
    enabled = host.data.get("edgefit_verify_timer", False)
    every = str(host.data.get("edgefit_verify_timer_every", "5min"))
    if not isinstance(enabled, bool):
        raise DeployError(f"{host.name}: edgefit_verify_timer must be True or False, got {enabled!r}")
    if not TIMESPAN.match(every):
        raise DeployError(f"{host.name}: edgefit_verify_timer_every {every!r} must be a span such as 5min, 300s or 1h")
    return enabled, every


def render_units(every: str, since_s: int) -> dict[str, str]:
    env = jinja2.Environment(loader=jinja2.FileSystemLoader(TEMPLATES_DIR), undefined=jinja2.StrictUndefined,
                             keep_trailing_newline=True)
    context = {"lib_dir": LIB_DIR, "expect_path": EXPECT_PATH, "report_path": REPORT_PATH, "window": WINDOW_S,
               "interval": INTERVAL_S, "since": since_s, "every": every}
    return {name: env.get_template(f"{name}.j2").render(**context) for name in (SERVICE, TIMER)}


def since_seconds(every: str) -> int:
    """OOM kills and crashes count back three timer periods (at least 15 minutes)."""
    number, unit = re.match(r"(\d+)(\D+)", every).groups()
    seconds = int(number) * {"s": 1, "sec": 1, "m": 60, "min": 60, "h": 3600, "hr": 3600}[unit]
    return max(900, 3 * seconds)


@deploy("Verify timer")
def install_verify_timer(plan: Plan, rendered: list[StackFile]) -> None:
    enabled, every = timer_settings()
    if not enabled:
        if host.get_fact(File, path=f"{UNIT_DIR}/{TIMER}"):
            systemd.service(name="Stop the verify timer (edgefit_verify_timer is off)", service=TIMER,
                            running=False, enabled=False)
            for name in (TIMER, SERVICE):
                files.file(name=f"Remove {UNIT_DIR}/{name}", path=f"{UNIT_DIR}/{name}", present=False)
            server.shell(name="Reload systemd units", commands=["systemctl daemon-reload"])
        return

    files.directory(name=f"Directory {LIB_DIR}", path=LIB_DIR, mode="755")
    [files.put(name=f"Upload {LIB_DIR}/{Path(module.__file__).name}", src=module.__file__,
                      dest=f"{LIB_DIR}/{Path(module.__file__).name}", mode="644") for module in (sampler, verify)]
    expected = verify.expectations(plan, rendered, stack_dir=STACK_DIR)
    files.put(name=f"Upload {EXPECT_PATH}", src=StringIO(json.dumps(expected, indent=1, sort_keys=True) + "\n"),
              dest=EXPECT_PATH, mode="600")
    units = [files.put(name=f"Upload {UNIT_DIR}/{name}", src=StringIO(text), dest=f"{UNIT_DIR}/{name}", mode="644")
             for name, text in render_units(every, since_seconds(every)).items()]
    server.shell(name="Reload systemd units", commands=["systemctl daemon-reload"],
                 _if=lambda: any(op.did_change() for op in units))
    systemd.service(name=f"Verify timer every {every}", service=TIMER, running=True, enabled=True)
