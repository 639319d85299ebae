"""Role "stack": bring missing images in, start the stack, heal its drift, wait until healthy.

Carries out what edgefit/converge.py decided: a forced recreation of containers whose limits or
image drifted (first, so that `compose up` finds them matching and leaves them alone), `docker
compose up -d` when the compose definition changed or services are missing or stopped (compose
recreates only services whose definition changed), a restart of a service whose config file
changed or whose live Redis/Postgres settings drifted (unless that compose up just started it),
nginx's reload in place when its files changed, then Dify's and the
plugin daemon's Postgres roles (roles.sql) when the cluster or their passwords may be new. A host
at its plan gets no operation at all.
"""

import shlex

from pyinfra.api import deploy
from pyinfra.operations import files, server

from edgefit.converge import COMPOSE_UP_PENDING, COMPOSE_UP_STARTED, RELOADED_IN_PLACE, Changes, reload_marker
from edgefit.facts import COMPOSE_PROJECT, SECRETS_PATH, container_name
from edgefit.plan import Plan
from edgefit.render import DB_APP_ROLE, DB_PLUGIN_ROLE, DB_ROLES_SQL_IN_CONTAINER, NGINX_CONF_IN_CONTAINER, STACK_DIR
from edgefit.settings import DeploySettings

IMAGE_DIR = "/var/lib/edgefit/images"
COMPOSE = f"cd {STACK_DIR} && docker compose"
POLL_SECONDS = 5
STABLE_POLLS = 3  # the stack must look the same for this many polls in a row
STOP_GRACE_S = 60  # templates/docker-compose.yml.j2: db's stop_grace_period, the longest
# How each of edgefit/converge.py's RELOADED_IN_PLACE re-reads its files, inside its container:
# nginx -t first, so a file nginx refuses leaves it serving with the ones it has.
RELOAD_COMMANDS = {"nginx": f"nginx -t -q -c {NGINX_CONF_IN_CONTAINER} && nginx -s reload -c {NGINX_CONF_IN_CONTAINER}"}
assert set(RELOAD_COMMANDS) == set(RELOADED_IN_PLACE)


def wait_healthy_command(timeout_s: int, services: list[str] | None = None, poll_s: int = POLL_SECONDS) -> str:
    """A bounded wait for every container to run and pass its healthcheck, the same for
    STABLE_POLLS polls in a row with no restart in between (a crash-looping service without a
    healthcheck looks "running" between two restarts). On timeout it names the services that
    are not and shows their last log lines.

    `services`: the plan's, whose containers have compose's names (a missing one is named as
    such); without them, every container of the project. Each poll is ONE `docker inspect`: on
    the emulated test hosts a docker CLI start costs 4-10 s and compose's 7-23 s, and the three
    calls a poll made before (compose ps, docker ps, docker inspect) stretched a wait after one
    nginx restart to 109 s."""
    targets = (" ".join(shlex.quote(container_name(name)) for name in sorted(services)) if services
               else f"$(docker ps -aq --filter label=com.docker.compose.project={COMPOSE_PROJECT})")
    fields = ('{{index .Config.Labels "com.docker.compose.service"}} {{.State.Status}} '
              '{{if .State.Health}}{{.State.Health.Status}}{{else}}none{{end}} restarts={{.RestartCount}}')
    # "SERVICE STATE HEALTH restarts=N" per container; a missing one as "SERVICE missing none restarts=0"
    missing = (f'/No such object/ {{ n = $NF; sub(/^{COMPOSE_PROJECT}-/, "", n); sub(/-1$/, "", n); '
               'print n, "missing", "none", "restarts=0"; next } { print }')
    state = f"docker inspect -f '{fields}' {targets} 2>&1 | awk '{missing}' | sort"
    return f"""
deadline=$(( $(date +%s) + {timeout_s} )); good=0; previous=""
while :; do
  now=$({state})
  bad=$(echo "$now" | awk 'NF>=3 && ($2!="running" || ($3!="none" && $3!="healthy")) {{print $1, $2, $3}}')
  if [ -z "$bad" ] && [ -n "$now" ] && [ "$now" = "$previous" ]; then good=$((good + 1)); else good=0; fi
  [ "$good" -ge {STABLE_POLLS} ] && {{ echo "all services running and healthy"; exit 0; }}
  previous="$now"
  if [ "$(date +%s)" -ge "$deadline" ]; then
    echo "not healthy and stable after {timeout_s}s (edgefit_health_timeout):"; echo "$bad"
    echo "$now" | awk '{{print $1, $4}}'
    for service in $(echo "$bad" | awk '{{print $1}}'); do echo "--- last log lines of $service"; {COMPOSE} logs --no-color --tail 20 "$service"; done
    echo "fix the service above, then re-run the deploy (nothing else was changed after the stack started)"
    exit 1
  fi
  sleep {poll_s}
done
""".strip()


def restart_command(service: str, after_compose_up: bool, started_marker: str = COMPOSE_UP_STARTED) -> str:
    """docker restart on compose's container name: the same stop and start without compose's own
    start (7-23 s on the test hosts). Docker 20.10's CLI always sends its -t (10 s by default), so
    it gets the longest stop_grace_period of the compose file (db's, 60 s: a Postgres killed
    mid-shutdown recovers from its WAL on the next start). After a `compose up` in the same run,
    a container it (re)started since COMPOSE_UP_STARTED already has the new files and settings."""
    name = container_name(service)
    restart = f"docker restart -t {STOP_GRACE_S} {name}"
    if not after_compose_up:
        return restart
    started = f"$(date -d \"$(docker inspect -f '{{{{.State.StartedAt}}}}' {name})\" +%s)"
    return (f'if [ "{started}" -ge "$(cat {started_marker})" ]; then '
            f'echo "{service} was started by this deploy\'s compose up: it has its new files, no restart"; '
            f"else {restart}; fi")


def reload_commands(service: str) -> list[str]:
    """The service re-reads its files in its running container; the marker records when
    (edgefit/converge.py judges a file newer than it as not yet applied)."""
    return [f"docker exec {container_name(service)} sh -c {shlex.quote(RELOAD_COMMANDS[service])} "
            f"|| {{ echo '{service} refused its new files (above) and still serves with the previous ones: "
            f"fix them, then re-run the deploy' >&2; exit 1; }}",
            f"touch {reload_marker(service)}"]


def db_roles_command(with_passwords: bool = True) -> str:
    """roles.sql in the db container as the superuser; the roles' passwords go from the host's
    secrets file into psql's environment by name (no value on any command line)."""
    names = "DB_APP_PASSWORD DB_PLUGIN_PASSWORD"
    load = f"set -a; . {shlex.quote(SECRETS_PATH)}; set +a; " if with_passwords else ""
    passed = " ".join(f"-e {name}" for name in names.split()) if with_passwords else ""
    return (f"{load}docker exec -i {passed} {container_name('db')} psql -X -q -U postgres -d postgres "
            f"-f {DB_ROLES_SQL_IN_CONTAINER}")


@deploy("Dify stack")
def deploy_stack(plan: Plan, settings: DeploySettings, changes: Changes) -> None:
    if changes.images_missing:
        if settings.image_tarball:
            tarball = settings.image_tarball
            remote = f"{IMAGE_DIR}/{tarball.name}"
            files.put(name=f"Upload image tarball {tarball.name}", src=str(tarball), dest=remote, mode="600")
            # Checked after loading: a tarball that lacks an image the plan uses stops here.
            refs = " ".join(map(shlex.quote, changes.images_missing))
            server.shell(name=f"Load {len(changes.images_missing)} missing image(s)",
                         commands=[f"docker load -q -i {shlex.quote(remote)} && docker image inspect {refs} >/dev/null"])
        else:
            server.shell(name=f"Pull {len(changes.images_missing)} image(s)", commands=[f"{COMPOSE} pull --quiet"])

    done_pending = f"rm -f {COMPOSE_UP_PENDING}"
    if changes.recreate:
        # Before `compose up`, with the compose definition already placed: a service recreated
        # here matches it, so compose up leaves it alone. After, an upgrade's api and worker
        # were made twice (compose up recreates a service whose definition changed; 28 s more
        # on the test hosts). Drift compose cannot see (a limit changed by `docker update`)
        # still needs the forced recreation.
        names = " ".join(sorted(changes.recreate))
        server.shell(name=f"Recreate {names}: " + "; ".join(changes.recreate.values()),
                     commands=[f"{COMPOSE} up -d --no-deps --force-recreate {names}"])
    if changes.recreate_all:
        # A new daemon.json (cgroup driver, log options) reaches only containers created after
        # it: live-restore keeps the old ones running as they were.
        server.shell(name="Recreate every container for the new daemon.json",
                     commands=[f"{COMPOSE} up -d --remove-orphans --quiet-pull --force-recreate && {done_pending}"])
    elif changes.compose_up:
        server.shell(name=f"docker compose up -d ({'; '.join(changes.reasons)})",
                     commands=[f"date +%s > {COMPOSE_UP_STARTED} && {COMPOSE} up -d --remove-orphans --quiet-pull "
                               f"&& {done_pending}"])
    for service, why in sorted(changes.restart.items()):
        server.shell(name=f"Restart {service}: {why}", commands=[restart_command(service, changes.compose_up)])
    for service, why in sorted(changes.reload.items()):
        server.shell(name=f"Reload {service}: {why}", commands=reload_commands(service))
    if changes.db_roles:
        server.shell(name=f"Postgres roles {DB_APP_ROLE} and {DB_PLUGIN_ROLE} (roles.sql)", commands=[db_roles_command()])
    if changes.wait_healthy and not changes.upgrade:  # an upgrade's wait is its gate (roles/upgrade.py)
        server.shell(name="Wait until every service is healthy" +
                          (f" ({', '.join(changes.unsettled)} not yet)" if changes.unsettled else ""),
                     commands=[wait_healthy_command(settings.health_timeout_s, list(plan.services))])
