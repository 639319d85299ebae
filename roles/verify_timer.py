"""Role "verify_timer": `edgefit verify` on the host itself every few minutes (opt-in).

With host data edgefit_verify_timer = True, render.py adds verify's standard-library modules
(sampler.py, judge.py, ... in /usr/local/lib/edgefit/edgefit/) and the systemd service and timer
to the rendered files, placed by place_files; this role keeps the timer enabled and running.
The timer judges the stack against the plan of record (/etc/edgefit/plan.json) and logs a
verdict to the journal. Turned off again, the next deploy stops and removes the timer.
Unchanged, it changes nothing.
"""

from pyinfra.api import deploy
from pyinfra.operations import server

from edgefit.plan import Plan
from edgefit.render import VERIFY_SERVICE, VERIFY_TIMER
from roles.host import unit_ready

TIMER_UNIT = VERIFY_TIMER.rsplit("/", 1)[1]


@deploy("Verify timer")
def install_verify_timer(plan: Plan, live: dict) -> None:
    if plan.verify_timer_every:
        if not unit_ready(live, TIMER_UNIT):
            server.shell(name=f"Verify timer every {plan.verify_timer_every}",
                         commands=[f"systemctl enable --now {TIMER_UNIT}"])
    elif VERIFY_TIMER in live["files"]:
        server.shell(name="Stop and remove the verify timer (edgefit_verify_timer is off)",
                     commands=[f"systemctl disable --now {TIMER_UNIT} || true",
                               f"rm -f {VERIFY_TIMER} {VERIFY_SERVICE}", "systemctl daemon-reload"])
