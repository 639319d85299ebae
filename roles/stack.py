"""Role "stack": upload the rendered stack, bring its images in, start it, wait until healthy.

Restarts only what changed: `docker compose up -d` recreates services whose compose definition
or environment changed (compose keeps a hash of each), and a service whose bind-mounted config
file changed (redis.conf, pgbouncer.ini, ...) is restarted on its own. An unchanged host gets
no operation that changes anything.
"""

import shlex

from pyinfra import host
from pyinfra.api import deploy
from pyinfra.operations import files, server

from edgefit.facts import COMPOSE_PROJECT, MissingImages, StackContainers
from edgefit.plan import Plan
from edgefit.render import STACK_DIR, StackFile
from edgefit.settings import DeploySettings
from roles.common import any_changed, upload

IMAGE_DIR = "/var/lib/edgefit/images"
COMPOSE = f"cd {STACK_DIR} && docker compose"
POLL_SECONDS = 5
STABLE_POLLS = 3  # the stack must look the same for this many polls in a row


def wait_healthy_command(timeout_s: int) -> str:
    """A bounded wait for every container to run and pass its healthcheck, the same for
    STABLE_POLLS polls in a row with no restart in between (a crash-looping service without a
    healthcheck looks "running" between two restarts). On timeout it names the services that
    are not and shows their last log lines."""
    state = (f"{COMPOSE} ps -a --format '{{{{.Service}}}} {{{{.State}}}} {{{{.Health}}}}' | sort; "
             "docker inspect -f '{{.Name}} restarts={{.RestartCount}}' "
             f"$(docker ps -aq --filter label=com.docker.compose.project={COMPOSE_PROJECT}) | sort")
    return f"""
deadline=$(( $(date +%s) + {timeout_s} )); good=0; previous=""
while :; do
  now=$({state})
  bad=$(echo "$now" | awk 'NF>=2 && $2!~/^restarts=/ && ($2!="running" || ($3!="" && $3!="healthy"))')
  if [ -z "$bad" ] && [ "$now" = "$previous" ]; then good=$((good + 1)); else good=0; fi
  [ "$good" -ge {STABLE_POLLS} ] && {{ echo "all services running and healthy"; exit 0; }}
  previous="$now"
  if [ "$(date +%s)" -ge "$deadline" ]; then
    echo "not healthy and stable after {timeout_s}s (edgefit_health_timeout):"; echo "$bad"
    echo "$now" | grep restarts=
    for service in $(echo "$bad" | awk '{{print $1}}'); do echo "--- last log lines of $service"; {COMPOSE} logs --no-color --tail 20 "$service"; done
    echo "fix the service above, then re-run the deploy (nothing else was changed after the stack started)"
    exit 1
  fi
  sleep {POLL_SECONDS}
done
""".strip()


@deploy("Dify stack")
def deploy_stack(plan: Plan, settings: DeploySettings, rendered: list[StackFile], daemon_json) -> None:
    stack_files = [f for f in rendered if not f.is_host_file]
    uploads = {f.path: upload(f) for f in stack_files}

    refs = tuple(sorted({service.image for service in plan.services.values()}))
    missing = host.get_fact(MissingImages, refs=refs)
    image_ops = []
    if settings.image_tarball:
        tarball = settings.image_tarball
        remote = f"{IMAGE_DIR}/{tarball.name}"
        put = files.put(name=f"Upload image tarball {tarball.name}", src=str(tarball), dest=remote, mode="600")
        image_ops.append(put)
        image_ops.append(server.shell(
            name="Load images", commands=[f"docker load -q -i {shlex.quote(remote)}"],
            _if=lambda: put.did_change() or bool(missing)))
        if missing:
            # Checked after loading: a tarball that lacks an image the plan uses stops here.
            server.shell(name="Every planned image present",
                         commands=[f"docker image inspect {' '.join(map(shlex.quote, refs))} >/dev/null"])
    elif missing:
        image_ops.append(server.shell(name=f"Pull {len(missing)} image(s)", commands=[f"{COMPOSE} pull --quiet"]))

    states = host.get_fact(StackContainers)
    running = {name for name, state in states.items() if state == "running"}
    not_running = set(plan.services) - running
    orphans = set(states) - set(plan.services)
    definition = [uploads["docker-compose.yml"], uploads[".env"], *image_ops]
    up = server.shell(
        name="docker compose up -d" + (f" (not running: {', '.join(sorted(not_running))})" if not_running else ""),
        commands=[f"{COMPOSE} up -d --remove-orphans --quiet-pull"],
        _if=lambda: not daemon_json.did_change() and (
            bool(not_running or orphans) or any(op.did_change() for op in definition)),
    )
    # A new daemon.json (cgroup driver, log options) reaches only containers created after it:
    # live-restore keeps the old ones running as they were.
    recreate = server.shell(
        name="Recreate every container for the new daemon.json",
        commands=[f"{COMPOSE} up -d --remove-orphans --quiet-pull --force-recreate"],
        _if=daemon_json.did_change,
    )

    restarts = []
    for service in plan.services:
        changed_files = [uploads[f.path] for f in stack_files if service in f.services]
        if changed_files and service in running:
            restarts.append(server.shell(
                name=f"Restart {service}: its config changed",
                commands=[f"{COMPOSE} restart {service}"],
                _if=any_changed(*changed_files)))

    server.shell(
        name="Wait until every service is healthy",
        commands=[wait_healthy_command(settings.health_timeout_s)],
        _if=any_changed(up, recreate, *restarts),
    )
