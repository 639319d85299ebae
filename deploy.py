"""The main job: `pyinfra inventory/edge.py deploy.py` puts the sized Dify stack on each host.

Each role under roles/ does one job; this file only calls them in order. The data flows one way:
host facts + inventory data -> Plan (edgefit/plan.py) -> rendered files -> one read of the host
and the changes it needs (edgefit/converge.py) -> operations -> the plan of record on the host
(/etc/edgefit/plan.json), which verify and the tests read. A host at its plan gets no operation.
An upgrade of Dify's images is backed up first and gated, and rolled back when it fails
(roles/upgrade.py); `pyinfra --serial --fail-percent 0` rolls it out one host at a time.
"""

from edgefit.render import render_stack
from roles.check_and_plan import check_host_and_plan
from roles.docker import install_docker, run_docker
from roles.firewall import configure_firewall
from roles.host import tune_host
from roles.place_files import place_files
from roles.read_host import read_host_and_decide
from roles.record import record_plan
from roles.secrets import ensure_secrets
from roles.stack import deploy_stack
from roles.tls import make_certificate, request_acme_certificate
from roles.upgrade import gate_upgrade, prepare_upgrade
from roles.verify_timer import install_verify_timer
from roles.volumes import prepare_volumes

plan, settings, facts = check_host_and_plan()  # every check that can refuse a host happens here
secrets = ensure_secrets()
rendered = render_stack(plan, secrets, settings.tls_pair, settings.acme.ca_bundle if settings.acme else None)
live, changes = read_host_and_decide(plan, rendered, settings)  # the one read; the rest carries changes out

prepare_upgrade(plan, changes)  # only when Dify's images change: the pre-upgrade backup, before anything else
install_docker(settings, live, facts)
prepare_volumes(plan, live, facts)
place_files(changes)
make_certificate(plan, live)
tune_host(plan, changes, live, facts)
configure_firewall(plan, changes, live)
run_docker(changes, live)
deploy_stack(plan, settings, changes)
gate_upgrade(plan, rendered, settings, changes)  # health and verify, or a rollback and a failed host
request_acme_certificate(plan, settings, live)  # edgefit_tls = "acme": nginx now serves the CA's tokens
install_verify_timer(plan, live)
record_plan(changes)
