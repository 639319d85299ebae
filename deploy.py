"""The main job: `pyinfra inventory/edge.py deploy.py` puts the sized Dify stack on each host.

Each role under roles/ does one job; this file only calls them in order. The data flows one way:
host facts + inventory data -> Plan (edgefit/plan.py) -> rendered files -> operations -> the
plan of record on the host (/etc/edgefit/plan.json), which verify and the tests read.
"""

from edgefit.render import render_stack
from roles.check_and_plan import check_host_and_plan
from roles.docker import install_docker
from roles.host import tune_host
from roles.record import record_plan
from roles.secrets import ensure_secrets
from roles.stack import deploy_stack
from roles.verify_timer import install_verify_timer
from roles.volumes import prepare_volumes

plan, settings, facts = check_host_and_plan()  # every check that can refuse a host happens here
secrets = ensure_secrets()
rendered = render_stack(plan, secrets)

tune_host(plan, rendered, facts)
daemon_json = install_docker(settings, rendered, facts)
prepare_volumes(plan, rendered)
deploy_stack(plan, settings, rendered, daemon_json)
install_verify_timer(plan, rendered)
record_plan(rendered)
