"""Plan + secrets -> every file of the stack, from the Jinja2 templates in templates/.

Paths are relative to the stack directory on the host (/opt/edgefit), except those under
`host/`, which mirror the host's root (host/etc/docker/daemon.json -> /etc/docker/daemon.json).
Each file says which services must restart when it changes, so a deploy restarts only those.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import jinja2

from edgefit import checks
from edgefit.images import RUN_AS_UID
from edgefit.plan import Plan
from edgefit.safe_write import write_atomic
from edgefit.secrets import Secrets

TEMPLATES_DIR = Path(__file__).resolve().parent.parent / "templates"
STACK_DIR = "/opt/edgefit"  # compose project directory on the host
PYTHON_HOOK_DIR = "/opt/edgefit/python"  # where sitecustomize.py is mounted in api/worker/beat


@dataclass(frozen=True)
class StackFile:
    path: str
    content: str
    mode: int = 0o644
    owner_uid: int | None = None  # the uid the container's process reads it as
    services: tuple[str, ...] = ()  # restart these when the file changes

    @property
    def is_host_file(self) -> bool:
        return self.path.startswith("host/")


def _environment() -> jinja2.Environment:
    env = jinja2.Environment(
        loader=jinja2.FileSystemLoader(TEMPLATES_DIR),
        undefined=jinja2.StrictUndefined,  # a missing plan field is a bug, not an empty string
        keep_trailing_newline=True,
        trim_blocks=True,
        lstrip_blocks=True,
    )
    env.filters["mib"] = lambda value: f"{int(value)}m"
    env.filters["mb"] = lambda value: f"{int(value)}MB"
    return env


def render_stack(plan: Plan, secrets: Secrets) -> list[StackFile]:
    env = _environment()
    present = set(plan.services)
    context = {
        "plan": plan,
        "secrets": secrets,
        "services": plan.services,
        "uid": RUN_AS_UID,
        # Values that reach YAML and nginx pass their check here too, whoever made the plan: a
        # value that could add a line or a directive never renders (CheckError).
        "data_root": checks.data_root(plan.data_root),
        "server_name": checks.hostname(plan.domain) if plan.domain else "_",
        "stack_dir": STACK_DIR,
        "python_hook_dir": PYTHON_HOOK_DIR,
        "dify_python_services": [name for name in ("api", "worker", "worker_beat") if name in present],
    }

    def render(template: str, **extra) -> str:
        return env.get_template(template).render(**context, **extra)

    files = [
        StackFile("docker-compose.yml", render("docker-compose.yml.j2")),
        # No restart list: compose folds env_file into each service's config hash, so
        # `docker compose up -d` recreates exactly the services whose environment changed.
        StackFile(".env", render("dify.env.j2"), 0o600),
        StackFile("conf/redis/redis.conf",
                  render("redis.conf.j2", redis=plan.redis, password=secrets.redis_password, role="cache",
                         container_mib=plan.services["redis"].mem_limit_mib),
                  0o600, RUN_AS_UID["redis"], ("redis",)),
        StackFile("conf/redis-broker/redis.conf",
                  render("redis.conf.j2", redis=plan.redis_broker, password=secrets.redis_broker_password,
                         role="broker", container_mib=plan.services["redis_broker"].mem_limit_mib),
                  0o600, RUN_AS_UID["redis_broker"], ("redis_broker",)),
        StackFile("conf/postgres/postgresql.conf", render("postgresql.conf.j2"), 0o644, services=("db",)),
        StackFile("conf/postgres/pg_hba.conf", render("pg_hba.conf.j2"), 0o644, services=("db",)),
        StackFile("conf/postgres/initdb/10-edgefit.sql", render("initdb.sql.j2"), 0o644),
        StackFile("conf/pgbouncer/pgbouncer.ini", render("pgbouncer.ini.j2"), 0o644, services=("pgbouncer",)),
        StackFile("conf/pgbouncer/userlist.txt", render("userlist.txt.j2"), 0o600,
                  RUN_AS_UID["pgbouncer"], ("pgbouncer",)),
        StackFile("conf/nginx/nginx.conf", render("nginx.conf.j2"), 0o644, services=("nginx",)),
        StackFile("conf/python/sitecustomize.py", render("sitecustomize.py.j2"), 0o644,
                  services=tuple(context["dify_python_services"])),
        # cgroupfs, not systemd: with the systemd driver runc writes memory.swap.max = 0
        # itself and the next `systemctl daemon-reload` resets it to "max" (measured on the
        # test VMs), so every container could swap past its limit. JSON has no comments.
        StackFile("host/etc/docker/daemon.json", render("daemon.json.j2")),
        StackFile("host/etc/sysctl.d/90-edgefit.conf", render("sysctl.conf.j2")),
        StackFile("host/etc/systemd/journald.conf.d/90-edgefit.conf", render("journald.conf.j2")),
        StackFile("host/etc/systemd/system/edgefit-thp.service", render("thp.service.j2")),
    ]
    if "ssrf_proxy" in present:
        files.append(StackFile("conf/ssrf_proxy/squid.conf", render("squid.conf.j2"), 0o644,
                               services=("ssrf_proxy",)))
    return files


def write_stack(files: list[StackFile], out_dir: Path) -> list[Path]:
    """Write files under out_dir with their modes (ownership is the deploy's job), each whole or
    not at all (edgefit.safe_write)."""
    written = []
    for stack_file in files:
        target = out_dir / stack_file.path
        target.parent.mkdir(parents=True, exist_ok=True)
        written.append(write_atomic(target, stack_file.content, stack_file.mode))
    return written
