"""The rendered roles.sql on a real Postgres 15 (Debian's), run as the deploy and a restore run it
(issue 10, least privilege): Dify and the plugin daemon get roles of their own that own only their
database, tables the superuser made before are handed over, a second run changes nothing, and a run
without the passwords (a restore's) makes the roles without touching their passwords. The server
listens on 127.0.0.1 and a free port and is stopped by its PID.
"""

from __future__ import annotations

import signal
import subprocess

import pytest

from edgefit.plan import HostSize, Options, make_plan
from edgefit.render import DB_APP_ROLE, DB_PLUGIN_ROLE, render_stack
from edgefit.secrets import Secrets
from servers_helpers import (Server, base_env, free_port, postgres_programs, run_checked, server_dir, service_user,
                             write_file)

pytestmark = pytest.mark.servers


@pytest.fixture(scope="module")
def cluster():
    """A cluster as an older edgefit left it: the superuser made dify and dify_plugin and tables in them."""
    initdb, postgres, _, psql, _ = postgres_programs()
    owner = service_user()
    secrets = Secrets.generate()
    files = {f.path: f.content for f in render_stack(make_plan(HostSize(2, 4096), Options()), secrets)}
    port = free_port()
    with server_dir("roles", owner) as tmp:
        env = base_env(tmp)
        pwfile = write_file(tmp / "pw", secrets.db_password + "\n", 0o600, owner)
        run_checked([initdb, "-D", str(tmp / "data"), "-U", "postgres", f"--pwfile={pwfile}", "-A", "scram-sha-256",
                     "--no-sync"], what="initdb", timeout=120, owner=owner, env=env, cwd=tmp)
        server = Server("postgres", [postgres, "-D", str(tmp / "data"), "-c", f"port={port}", "-c",
                                     "listen_addresses=127.0.0.1", "-c", f"unix_socket_directories={tmp}"],
                        workdir=tmp, env=env, run_as=owner, stop_signal=signal.SIGINT)
        roles_sql = write_file(tmp / "roles.sql", files["conf/postgres/roles.sql"], 0o644, owner)

        def psql_as(user: str, password: str, database: str, sql: str, check: bool = True):
            return subprocess.run([psql, "-X", "-q", "-At", "-v", "ON_ERROR_STOP=1", "-h", "127.0.0.1", "-p", str(port),
                                   "-U", user, "-d", database, "-c", sql], capture_output=True, text=True, timeout=60,
                                  env={**env, "PGPASSWORD": password}, check=check)

        def superuser(database: str, sql: str):
            return psql_as("postgres", secrets.db_password, database, sql).stdout.strip()

        def run_roles(with_passwords: bool = True):
            extra = {"DB_APP_PASSWORD": secrets.db_app_password,
                     "DB_PLUGIN_PASSWORD": secrets.db_plugin_password} if with_passwords else {}
            return subprocess.run([psql, "-X", "-q", "-h", "127.0.0.1", "-p", str(port), "-U", "postgres", "-d", "postgres",
                                   "-f", str(roles_sql)], capture_output=True, text=True, timeout=120,
                                  env={**env, "PGPASSWORD": secrets.db_password, **extra})

        def ready():
            return psql_as("postgres", secrets.db_password, "postgres", "SELECT 1", check=False).returncode == 0

        with server.running(ready, timeout=60, what="postgres"):
            superuser("postgres", "CREATE DATABASE dify")
            superuser("postgres", "CREATE DATABASE dify_plugin")
            superuser("dify", "CREATE TYPE app_mode AS ENUM ('chat', 'workflow'); "
                              "CREATE TABLE apps (id serial PRIMARY KEY, mode app_mode, name text); "
                              "INSERT INTO apps (mode, name) VALUES ('chat', 'kept'); "
                              "CREATE VIEW app_names AS SELECT name FROM apps; "
                              "CREATE FUNCTION app_count() RETURNS bigint LANGUAGE sql AS 'SELECT count(*) FROM apps'")
            superuser("dify_plugin", "CREATE TABLE plugins (id bigint GENERATED ALWAYS AS IDENTITY, name text)")
            yield {"secrets": secrets, "psql_as": psql_as, "superuser": superuser, "run_roles": run_roles}


def test_roles_sql_gives_each_its_own_role_owning_only_its_database(cluster):
    secrets, psql_as, superuser = cluster["secrets"], cluster["psql_as"], cluster["superuser"]
    first = cluster["run_roles"]()
    assert first.returncode == 0, first.stderr
    assert secrets.db_app_password not in first.stdout + first.stderr
    roles = superuser("postgres", f"SELECT rolname, rolsuper, rolcreatedb, rolcreaterole, rolcanlogin FROM pg_roles "
                                  f"WHERE rolname IN ('{DB_APP_ROLE}', '{DB_PLUGIN_ROLE}') ORDER BY 1")
    assert roles.splitlines() == [f"{DB_APP_ROLE}|f|f|f|t", f"{DB_PLUGIN_ROLE}|f|f|f|t"]
    assert superuser("postgres", "SELECT datname, pg_get_userbyid(datdba) FROM pg_database "
                                 "WHERE datname LIKE 'dify%' ORDER BY 1").splitlines() == [
        f"dify|{DB_APP_ROLE}", f"dify_plugin|{DB_PLUGIN_ROLE}"]
    # what the superuser made before is the app's now: it reads, writes and alters it (migrations)
    app = lambda sql, **kw: psql_as(DB_APP_ROLE, secrets.db_app_password, "dify", sql, **kw)  # noqa: E731
    assert app("SELECT name FROM app_names; SELECT app_count()").stdout.split() == ["kept", "1"]
    app("INSERT INTO apps (mode, name) VALUES ('workflow', 'new'); ALTER TABLE apps ADD COLUMN icon text; "
        "ALTER TYPE app_mode ADD VALUE 'agent'; CREATE TABLE later (id int)")
    plugin = lambda sql, **kw: psql_as(DB_PLUGIN_ROLE, secrets.db_plugin_password, "dify_plugin", sql, **kw)  # noqa: E731
    plugin("INSERT INTO plugins (name) VALUES ('p'); ALTER TABLE plugins ADD COLUMN v text; CREATE TABLE more (id int)")
    # and neither reaches the other's data, nor can make roles or databases
    refused = psql_as(DB_PLUGIN_ROLE, secrets.db_plugin_password, "dify", "SELECT name FROM apps", check=False)
    assert refused.returncode != 0 and "permission denied" in refused.stderr
    assert psql_as(DB_PLUGIN_ROLE, secrets.db_plugin_password, "dify", "CREATE TABLE x (id int)",
                   check=False).returncode != 0
    assert app("CREATE ROLE intruder", check=False).returncode != 0
    assert app("CREATE DATABASE other", check=False).returncode != 0
    assert psql_as(DB_APP_ROLE, secrets.db_app_password, "dify_plugin", "SELECT * FROM plugins",
                   check=False).returncode != 0

    again = cluster["run_roles"]()  # every deploy that may have a new cluster runs it again
    assert again.returncode == 0, again.stderr
    assert app("SELECT count(*) FROM apps").stdout.strip() == "2"

    restore = cluster["run_roles"](with_passwords=False)  # a restore's run: roles only
    assert restore.returncode == 0, restore.stderr
    assert app("SELECT 1").stdout.strip() == "1", "a run without the passwords left them as they were"
    wrong = psql_as(DB_APP_ROLE, secrets.db_app_password + "x", "dify", "SELECT 1", check=False)
    assert wrong.returncode != 0
