"""The verify timer: its units render from the plan and pass systemd-analyze, and it is off by default."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


# ---- the verify timer (roles/verify_timer.py) ---------------------------------------------------

def test_the_timer_units_render_and_pass_systemd_analyze(tmp_path):
    from edgefit.plan import HostSize, Options, make_plan
    from edgefit.render import render_stack, verify_timer_since_s
    from edgefit.secrets import Secrets

    assert verify_timer_since_s("5min") == 900 and verify_timer_since_s("1h") == 3 * 3600
    assert verify_timer_since_s("60s") == 900
    plan = make_plan(HostSize(2, 4096), Options(verify_timer_every="10min"))
    units = {Path(f.dest).name: f.content for f in render_stack(plan, Secrets.generate())
             if f.dest.startswith("/etc/systemd/system/edgefit-verify")}
    service, timer = units["edgefit-verify.service"], units["edgefit-verify.timer"]
    assert "--events-since 1800" in service and "-m edgefit.verify_host" in service
    assert "Environment=PYTHONPATH=/usr/local/lib/edgefit" in service
    assert "--expect /etc/edgefit/plan.json" in service
    assert "OnUnitActiveSec=10min" in timer and "WantedBy=timers.target" in timer
    off = render_stack(make_plan(HostSize(2, 4096)), Secrets.generate())
    assert not [f for f in off if "edgefit-verify" in f.dest or f.dest.startswith("/usr/local/lib/edgefit")]
    for name, text in units.items():
        (tmp_path / name).write_text(text)
    assert shutil.which("systemd-analyze") and Path("/usr/bin/python3").exists()
    done = subprocess.run(["systemd-analyze", "verify", *(str(tmp_path / n) for n in units)],
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0 and "edgefit-verify" not in done.stderr, done.stderr


def test_group_data_documents_the_timer_off_by_default():
    text = (REPO / "group_data" / "all.py").read_text()
    assert "\nedgefit_verify_timer = False" in text and 'edgefit_verify_timer_every = "5min"' in text
    assert "install_verify_timer(plan, live)" in (REPO / "deploy.py").read_text()
