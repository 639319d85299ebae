"""Role "verify_timer": `edgefit verify` on the host itself every few minutes (opt-in).

With host data edgefit_verify_timer = True, render.py adds verify's standard-library modules
(sampler.py, judge.py, ... in /usr/local/lib/edgefit/edgefit/) and the systemd service and timer
to the rendered files; this role puts them up and keeps the timer running. The timer judges the stack against
the plan of record (/etc/edgefit/plan.json) and logs a verdict to the journal. Turned off
again, the next deploy stops and removes the timer. Unchanged, it changes nothing.
"""

from pyinfra import host
from pyinfra.api import deploy
from pyinfra.facts.files import File
from pyinfra.operations import files, server, systemd

from edgefit.plan import Plan
from edgefit.render import VERIFY_LIB_DIR, VERIFY_SERVICE, VERIFY_TIMER, StackFile
from roles.common import upload

TIMER_UNIT = VERIFY_TIMER.rsplit("/", 1)[1]


@deploy("Verify timer")
def install_verify_timer(plan: Plan, rendered: list[StackFile]) -> None:
    if not plan.verify_timer_every:
        if host.get_fact(File, path=VERIFY_TIMER):
            systemd.service(name="Stop the verify timer (edgefit_verify_timer is off)", service=TIMER_UNIT,
                            running=False, enabled=False)
            for path in (VERIFY_TIMER, VERIFY_SERVICE):
                files.file(name=f"Remove {path}", path=path, present=False)
            server.shell(name="Reload systemd units", commands=["systemctl daemon-reload"])
        return

    files.directory(name=f"Directory {VERIFY_LIB_DIR}", path=VERIFY_LIB_DIR, mode="755")
    timer_files = [f for f in rendered if f.dest.startswith(VERIFY_LIB_DIR + "/") or f.dest in (VERIFY_SERVICE, VERIFY_TIMER)]
    uploads = [upload(f) for f in timer_files]
    units = [op for f, op in zip(timer_files, uploads) if f.systemd_unit]
    server.shell(name="Reload systemd units", commands=["systemctl daemon-reload"],
                 _if=lambda: any(op.did_change() for op in units))
    systemd.service(name=f"Verify timer every {plan.verify_timer_every}", service=TIMER_UNIT, running=True, enabled=True)
