"""Plan + secrets -> every file that lands on a host, from the Jinja2 templates in templates/.

The one renderer: compose, configs, host settings, systemd units and drop-ins, the verify
timer's modules, and last the plan of record, which holds the sha256 of all the others so verify
sees any of them drift. Each file knows its destination on the host and which services must
restart (or whether systemd must reload) when it changes, so a deploy restarts only those.
"""

from __future__ import annotations

import json
import shlex
from dataclasses import dataclass
from pathlib import Path

import jinja2

from edgefit import checks
from edgefit.expectations import expectations
from edgefit.images import RUN_AS_UID
from edgefit.plan import Plan
from edgefit.safe_write import write_atomic
from edgefit.sampler import PROJECT as COMPOSE_PROJECT, run_bound
from edgefit.secrets import Secrets

PLAN_OF_RECORD_SCHEMA = 2

TEMPLATES_DIR = Path(__file__).resolve().parent.parent / "templates"
STACK_DIR = "/opt/edgefit"  # compose project directory on the host
PYTHON_HOOK_DIR = "/opt/edgefit/python"  # where sitecustomize.py is mounted in api/worker/beat

# Where files land on the host: one name per destination, so roles find a file by what it is.
PLAN_OF_RECORD = "/etc/edgefit/plan.json"  # what the last deploy decided; verify and the timer read it
DAEMON_JSON = "/etc/docker/daemon.json"
SYSCTL_CONF = "/etc/sysctl.d/90-edgefit.conf"
JOURNALD_CONF = "/etc/systemd/journald.conf.d/90-edgefit.conf"
THP_UNIT = "/etc/systemd/system/edgefit-thp.service"
DOCKER_DATA_DISK_DROP_IN = "/etc/systemd/system/docker.service.d/edgefit-data-disk.conf"
# nginx's certificate and key, as cert.pem and key.pem, mounted read-only at TLS_DIR_IN_CONTAINER:
# a provided pair is rendered (0600) into the stack; a self-signed one is made on the host once
# (roles/tls.py) where no deploy overwrites it.
TLS_DIR_IN_CONTAINER = "/etc/nginx/tls"
# nginx.conf's directory is mounted, not the file alone: a file mounted alone stays the inode it
# was when the container started, and a deploy replaces files, so nginx's reload (roles/stack.py)
# would re-read the old one.
NGINX_CONF_DIR_IN_CONTAINER = "/etc/nginx/edgefit"
NGINX_CONF_IN_CONTAINER = f"{NGINX_CONF_DIR_IN_CONTAINER}/nginx.conf"
PROVIDED_TLS_DIR = "/opt/edgefit/conf/nginx/tls"
SELF_SIGNED_TLS_DIR = "/etc/edgefit/tls/self-signed"
# edgefit_tls = "acme": certbot's certificate, put here by its deploy hook (a self-signed
# placeholder until the first is issued); the CA reads HTTP-01 tokens from the webroot through nginx.
ACME_TLS_DIR = "/etc/edgefit/tls/acme"
ACME_ISSUED = f"{ACME_TLS_DIR}/issued"  # the name the pair in place was issued for
ACME_WEBROOT = "/var/lib/edgefit/acme"
ACME_WEBROOT_IN_CONTAINER = "/var/www/acme"  # nginx.conf's root for /.well-known/acme-challenge/
ACME_HOOK = "/etc/edgefit/acme-deploy-hook.sh"
ACME_CA_BUNDLE = "/etc/edgefit/tls/acme-directory-ca.pem"
CERTBOT_DROP_IN = "/etc/systemd/system/certbot.service.d/edgefit.conf"
# Postgres roles: Dify and the plugin daemon (which runs third-party plugin code) log in as roles
# of their own that own only their database; the superuser stays for admin, backups and verify.
DB_APP_ROLE, DB_PLUGIN_ROLE = "dify_app", "dify_plugin"
DB_ROLES_SQL = f"{STACK_DIR}/conf/postgres/roles.sql"
DB_ROLES_SQL_IN_CONTAINER = "/etc/postgresql/roles.sql"
FIREWALL_RULES = "/etc/edgefit/firewall.nft"  # edgefit's nftables table, loaded whole
FIREWALL_UNIT = "/etc/systemd/system/edgefit-firewall.service"
VERIFY_LIB_DIR = "/usr/local/lib/edgefit"  # the verify timer's standard-library modules, as edgefit/*.py
VERIFY_MODULES = ("sampler.py", "expectations.py", "judge.py", "report.py", "verify_host.py")
VERIFY_SERVICE = "/etc/systemd/system/edgefit-verify.service"
VERIFY_TIMER = "/etc/systemd/system/edgefit-verify.timer"
VERIFY_REPORT = "/var/lib/edgefit/verify-last.json"
VERIFY_TIMER_WINDOW_S, VERIFY_TIMER_INTERVAL_S = 20, 5
MODULES_DIR = Path(__file__).resolve().parent


@dataclass(frozen=True)
class StackFile:
    dest: str  # absolute path on the host
    content: str
    mode: int = 0o644
    owner_uid: int | None = None  # the uid the container's process reads it as
    services: tuple[str, ...] = ()  # restart these when the file changes
    systemd_unit: bool = False  # a unit or drop-in: systemd reloads when it changes

    @property
    def path(self) -> str:
        """Where `edgefit render --out` puts it: stack files relative to the stack directory,
        host files under host/ mirroring the host's root."""
        if self.dest.startswith(STACK_DIR + "/"):
            return self.dest[len(STACK_DIR) + 1:]
        return "host" + self.dest

    @property
    def is_host_file(self) -> bool:
        return not self.dest.startswith(STACK_DIR + "/")


def _environment() -> jinja2.Environment:
    env = jinja2.Environment(
        loader=jinja2.FileSystemLoader(TEMPLATES_DIR),
        undefined=jinja2.StrictUndefined,  # a missing plan field is a bug, not an empty string
        keep_trailing_newline=True,
        trim_blocks=True,
        lstrip_blocks=True,
    )
    env.filters["mib"] = lambda value: f"{int(value)}m"
    return env


def verify_timer_since_s(every: str) -> int:
    """OOM kills and crashes count back three timer periods (at least 15 minutes)."""
    return max(900, 3 * checks.timespan_seconds(every))


def tls_dir(plan: Plan) -> str:
    """Where nginx's cert.pem and key.pem live on the host."""
    return {"provided": PROVIDED_TLS_DIR, "acme": ACME_TLS_DIR}.get(plan.tls, SELF_SIGNED_TLS_DIR)


def render_stack(plan: Plan, secrets: Secrets, tls_pair: tuple[str, str] | None = None,
                 acme_ca_bundle: str | None = None) -> list[StackFile]:
    """Every file the deploy puts on the host, the plan of record last (it holds the others' hashes).
    tls_pair: the provided certificate and key (PEM texts) when plan.tls is "provided";
    acme_ca_bundle: the CA certificate(s) of a private ACME directory (PEM text) when plan.tls is "acme"."""
    if plan.tls == "provided" and tls_pair is None:
        raise ValueError("edgefit_tls = 'provided' needs the certificate and key to render")
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
        "tls_dir": tls_dir(plan),
        "tls_dir_in_container": TLS_DIR_IN_CONTAINER,
        "nginx_conf_dir_in_container": NGINX_CONF_DIR_IN_CONTAINER,
        "nginx_conf_in_container": NGINX_CONF_IN_CONTAINER,
        "acme_webroot": ACME_WEBROOT,
        "acme_webroot_in_container": ACME_WEBROOT_IN_CONTAINER,
        "python_hook_dir": PYTHON_HOOK_DIR,
        "db_app_role": DB_APP_ROLE,
        "db_plugin_role": DB_PLUGIN_ROLE,
        "db_roles_sql_in_container": DB_ROLES_SQL_IN_CONTAINER,
        "dify_python_services": [name for name in ("api", "worker", "worker_beat") if name in present],
    }

    def render(template: str, **extra) -> str:
        return env.get_template(template).render(**context, **extra)

    def stack(relative: str, content: str, *args, **kwargs) -> StackFile:
        return StackFile(f"{STACK_DIR}/{relative}", content, *args, **kwargs)

    files = [
        stack("docker-compose.yml", render("docker-compose.yml.j2")),
        # No restart list: compose folds env_file into each service's config hash, so
        # `docker compose up -d` recreates exactly the services whose environment changed.
        stack(".env", render("dify.env.j2"), 0o600),
        stack("conf/redis/redis.conf",
              render("redis.conf.j2", redis=plan.redis, password=secrets.redis_password, role="cache",
                     container_mib=plan.services["redis"].mem_limit_mib),
              0o600, RUN_AS_UID["redis"], ("redis",)),
        stack("conf/redis-broker/redis.conf",
              render("redis.conf.j2", redis=plan.redis_broker, password=secrets.redis_broker_password,
                     role="broker", container_mib=plan.services["redis_broker"].mem_limit_mib),
              0o600, RUN_AS_UID["redis_broker"], ("redis_broker",)),
        stack("conf/postgres/postgresql.conf", render("postgresql.conf.j2"), 0o644, services=("db",)),
        stack("conf/postgres/pg_hba.conf", render("pg_hba.conf.j2"), 0o644, services=("db",)),
        stack("conf/postgres/initdb/10-edgefit.sql", render("initdb.sql.j2"), 0o644),
        # the superuser's password reaches the db container only (its own env file)
        stack("conf/postgres/superuser.env", render("postgres-superuser.env.j2"), 0o600),
        stack("conf/postgres/roles.sql", render("roles.sql.j2"), 0o644),
        stack("conf/pgbouncer/pgbouncer.ini", render("pgbouncer.ini.j2"), 0o644, services=("pgbouncer",)),
        stack("conf/pgbouncer/userlist.txt", render("userlist.txt.j2"), 0o600,
              RUN_AS_UID["pgbouncer"], ("pgbouncer",)),
        stack("conf/nginx/nginx.conf", render("nginx.conf.j2"), 0o644, services=("nginx",)),
        stack("conf/python/sitecustomize.py", render("sitecustomize.py.j2"), 0o644,
              services=tuple(context["dify_python_services"])),
        # cgroupfs, not systemd: with the systemd driver runc writes memory.swap.max = 0
        # itself and the next `systemctl daemon-reload` resets it to "max" (measured on the
        # test VMs), so every container could swap past its limit. JSON has no comments.
        StackFile(DAEMON_JSON, render("daemon.json.j2")),
        StackFile(SYSCTL_CONF, render("sysctl.conf.j2")),
        StackFile(JOURNALD_CONF, render("journald.conf.j2")),
        StackFile(THP_UNIT, render("thp.service.j2"), systemd_unit=True),
    ]
    if plan.firewall:
        files += [StackFile(FIREWALL_RULES, render("firewall.nft.j2", ssh_ports=sorted({22, plan.ssh_port})), 0o600),
                  StackFile(FIREWALL_UNIT, render("edgefit-firewall.service.j2", firewall_rules=FIREWALL_RULES),
                            systemd_unit=True)]
    if plan.tls == "provided":
        certificate, key = tls_pair
        files += [StackFile(f"{PROVIDED_TLS_DIR}/cert.pem", certificate, 0o600, services=("nginx",)),
                  StackFile(f"{PROVIDED_TLS_DIR}/key.pem", key, 0o600, services=("nginx",))]
    if plan.tls == "acme":
        files += _acme_files(render, plan, acme_ca_bundle)
    if "ssrf_proxy" in present:
        files.append(stack("conf/ssrf_proxy/squid.conf", render("squid.conf.j2"), 0o644, services=("ssrf_proxy",)))
    if plan.data_disk:
        # Docker must not start its containers before the data disk is mounted: Postgres would
        # find an empty directory on the root filesystem and initialise a new, empty cluster.
        files.append(StackFile(DOCKER_DATA_DISK_DROP_IN, render("docker-data-disk.conf.j2"), systemd_unit=True))
    if plan.verify_timer_every:
        files += _verify_timer_files(render, plan.verify_timer_every)
    files.append(StackFile(PLAN_OF_RECORD, plan_of_record(plan, files), 0o600))
    return files


def _acme_files(render, plan: Plan, ca_bundle: str | None) -> list[StackFile]:
    """certbot's deploy hook, and for a private ACME directory its CA and certbot.service's drop-in."""
    hook = render("acme-deploy-hook.sh.j2", acme_tls_dir=shlex.quote(ACME_TLS_DIR),
                  domain=shlex.quote(checks.hostname(plan.domain)),
                  reload_nginx=f"docker exec {COMPOSE_PROJECT}-nginx-1 nginx -c {NGINX_CONF_IN_CONTAINER} -s reload")
    files = [StackFile(ACME_HOOK, hook, 0o700)]
    if ca_bundle:
        files += [StackFile(ACME_CA_BUNDLE, ca_bundle, 0o644),
                  StackFile(CERTBOT_DROP_IN, render("certbot-edgefit.conf.j2", ca_bundle=ACME_CA_BUNDLE),
                            systemd_unit=True)]
    return files


def _verify_timer_files(render, every: str) -> list[StackFile]:
    """`edgefit verify` on the host itself: its standard-library modules and the units."""
    units = {"lib_dir": VERIFY_LIB_DIR, "expect_path": PLAN_OF_RECORD, "report_path": VERIFY_REPORT,
             "window": VERIFY_TIMER_WINDOW_S, "interval": VERIFY_TIMER_INTERVAL_S,
             "since": verify_timer_since_s(every), "every": every,
             # systemd's bound on one run: the sampler's own (slow hosts included), then python's start
             "timeout_s": int(run_bound(VERIFY_TIMER_WINDOW_S)) + 30}
    return [
        *(StackFile(f"{VERIFY_LIB_DIR}/edgefit/{name}", (MODULES_DIR / name).read_text()) for name in VERIFY_MODULES),
        StackFile(VERIFY_SERVICE, render("edgefit-verify.service.j2", **units), systemd_unit=True),
        StackFile(VERIFY_TIMER, render("edgefit-verify.timer.j2", **units), systemd_unit=True),
    ]


def plan_of_record(plan: Plan, files: list[StackFile]) -> str:
    """What this deploy decided, for verify, the timer, rebuild and the tests: the whole plan, and
    the expectations verify judges by (limits, settings, the sha256 of every other file). No
    secret value; deterministic, so an unchanged plan uploads nothing."""
    record = {"schema": PLAN_OF_RECORD_SCHEMA, "plan": plan.to_dict(),
              "expect": expectations(plan, files)}
    return json.dumps(record, indent=1, sort_keys=True) + "\n"


def file_at(files: list[StackFile], dest: str) -> StackFile:
    """The rendered file that lands at dest (one of the names above)."""
    return next(stack_file for stack_file in files if stack_file.dest == dest)


def write_stack(files: list[StackFile], out_dir: Path) -> list[Path]:
    """Write files under out_dir with their modes (ownership is the deploy's job), each whole or
    not at all (edgefit.safe_write)."""
    written = []
    for stack_file in files:
        target = out_dir / stack_file.path
        target.parent.mkdir(parents=True, exist_ok=True)
        written.append(write_atomic(target, stack_file.content, stack_file.mode))
    return written
