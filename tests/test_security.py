"""Safe by default (issue 10): the init password, secrets kept off every output, TLS, the firewall.

Pure tests: rendered files, commands and the stand-in's setup gate, no host and no VM.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import re
import subprocess
import sys
import threading
import urllib.error
import urllib.request
from http.server import ThreadingHTTPServer
from pathlib import Path

import pytest

from edgefit import lifecycle
from edgefit.plan import HostSize, Options, make_plan
from edgefit.render import render_stack
from edgefit.secrets import INIT_PASSWORD_MAX_LENGTH, Secrets, SecretsError
from roles.secrets import _generate_missing_command

REPO = Path(__file__).resolve().parent.parent
STANDIN = REPO / "tests" / "images" / "standin" / "dify_standin.py"
PLAN = make_plan(HostSize(2, 4096), Options())


def rendered(secrets: Secrets, plan=PLAN) -> dict[str, str]:
    return {f.dest: f.content for f in render_stack(plan, secrets)}


# ---------------------------------------------------------------------------------------------
# INIT_PASSWORD

def test_the_init_password_is_generated_short_enough_for_dify():
    for _ in range(20):
        value = Secrets.generate().init_password
        assert 24 <= len(value) <= INIT_PASSWORD_MAX_LENGTH
        assert re.fullmatch(r"[A-Za-z0-9_-]+", value)


def test_the_host_generates_it_from_18_random_bytes_and_the_others_from_32():
    command = _generate_missing_command()
    assert "INIT_PASSWORD=$(head -c 18 /dev/urandom" in command
    assert "SECRET_KEY=$(head -c 32 /dev/urandom" in command


def test_the_host_command_makes_a_valid_secrets_file(tmp_path):
    target = tmp_path / "secrets.env"
    command = _generate_missing_command().replace("/etc/edgefit/secrets.env", str(target)).replace(
        "mkdir -p /etc/edgefit", f"mkdir -p {tmp_path}")
    subprocess.run(["sh", "-c", command], check=True)
    secrets = Secrets.from_env(target.read_text())
    assert len(secrets.init_password) == 24


def test_a_too_long_init_password_is_refused_without_showing_it():
    text = Secrets.generate().to_env()
    long = "x" * 31 + "Y" * 3
    text = re.sub(r"^INIT_PASSWORD=.*$", f"INIT_PASSWORD={long}", text, flags=re.M)
    with pytest.raises(SecretsError, match="INIT_PASSWORD must be at most 30") as caught:
        Secrets.from_env(text, "given")
    assert long not in str(caught.value)


def test_the_api_gets_the_init_password():
    secrets = Secrets.generate()
    env = rendered(secrets)["/opt/edgefit/.env"]
    assert f"INIT_PASSWORD={secrets.init_password}\n" in env
    compose = rendered(secrets)["/opt/edgefit/docker-compose.yml"]
    assert secrets.init_password not in compose


# ---------------------------------------------------------------------------------------------
# `edgefit secret`

def test_only_the_init_password_is_shown_by_default():
    assert lifecycle.secret_name("init_password", False) == "init_password"
    assert lifecycle.secret_name("INIT_PASSWORD", False) == "init_password"
    with pytest.raises(lifecycle.Refused, match="--show-any"):
        lifecycle.secret_name("secret_key", False)
    assert lifecycle.secret_name("secret_key", True) == "secret_key"
    with pytest.raises(lifecycle.Refused, match="not an edgefit secret"):
        lifecycle.secret_name("root_password", True)


def test_the_command_reads_one_line_only():
    command = lifecycle.secret_command("init_password")
    assert command == "grep -m1 -e '^INIT_PASSWORD=' /etc/edgefit/secrets.env || true"
    assert lifecycle.secret_from_lines(["INIT_PASSWORD=abc"], "init_password") == "abc"
    assert lifecycle.secret_from_lines([], "init_password") is None
    assert lifecycle.secret_from_lines(["INIT_PASSWORD="], "init_password") is None


def _edgefit(*args: str, cwd: Path = REPO) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "edgefit", *args], capture_output=True, text=True,
                          timeout=60, cwd=cwd)


@pytest.mark.parametrize("args, words", [
    (["inventory/edge.py", "--limit", "h", "secret_key"], ["--show-any"]),
    (["inventory/edge.py", "--limit", "h", "nope"], ["not an edgefit secret"]),
    (["inventory/nowhere.py", "--limit", "h", "init_password"], ["does not exist"]),
    (["inventory/edge.py", "--limit", "no-such-host-anywhere", "init_password"], ["no host"]),
])
def test_bad_input_to_edgefit_secret_is_one_sentence_and_exit_2(args, words):
    result = _edgefit("secret", *args)
    assert result.returncode == 2, result.stderr
    assert result.stdout == ""
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in result.stderr
    for word in words:
        assert word in lines[0]


def test_edgefit_secret_needs_one_host():
    result = _edgefit("secret", "inventory/edge.py", "init_password")
    assert result.returncode == 2 and "--limit" in result.stderr


# ---------------------------------------------------------------------------------------------
# The stand-in api follows Dify's rule for the first admin

def _standin():
    spec = importlib.util.spec_from_file_location("dify_standin_security_under_test", STANDIN)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture
def standin_api():
    module = _standin()
    server = ThreadingHTTPServer(("127.0.0.1", 0), module.make_handler("api", {"INIT_PASSWORD": "right-init-password-000000"}))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


def _call(url: str, body: dict | None = None, cookie: str | None = None) -> tuple[int, dict, str | None]:
    request = urllib.request.Request(url, data=None if body is None else json.dumps(body).encode(),
                                     headers={"Content-Type": "application/json", **({"Cookie": cookie} if cookie else {})})
    try:
        with urllib.request.urlopen(request, timeout=5) as response:
            return response.status, json.loads(response.read()), response.headers.get("Set-Cookie")
    except urllib.error.HTTPError as error:
        return error.code, json.loads(error.read()), None


ADMIN = {"email": "owner@example.net", "name": "owner", "password": "Owner-password-1"}


def test_setup_is_refused_without_the_init_password(standin_api):
    assert _call(f"{standin_api}/console/api/init")[1] == {"status": "not_started"}
    code, body, _ = _call(f"{standin_api}/console/api/setup", ADMIN)
    assert (code, body["code"]) == (401, "not_init_validated")
    code, body, _ = _call(f"{standin_api}/console/api/init", {"password": "wrong"})
    assert (code, body["code"]) == (401, "init_validate_failed")
    code, body, _ = _call(f"{standin_api}/console/api/init", {"password": "x" * 31})
    assert code == 400
    assert _call(f"{standin_api}/console/api/setup")[1] == {"step": "not_started"}


def test_setup_with_the_init_password_makes_one_admin_only(standin_api):
    code, body, cookie = _call(f"{standin_api}/console/api/init", {"password": "right-init-password-000000"})
    assert (code, body) == (201, {"result": "success"}) and cookie
    session = cookie.split(";")[0]
    assert _call(f"{standin_api}/console/api/init", cookie=session)[1] == {"status": "finished"}
    assert _call(f"{standin_api}/console/api/setup", ADMIN, cookie=session)[:2] == (201, {"result": "success"})
    code, body, _ = _call(f"{standin_api}/console/api/setup", ADMIN, cookie=session)
    assert (code, body["code"]) == (403, "already_setup")
    assert _call(f"{standin_api}/console/api/setup")[1]["step"] == "finished"


def test_fixtures_keep_the_dataclass_fields_in_step():
    assert "init_password" in {f.name for f in dataclasses.fields(Secrets)}


# ---------------------------------------------------------------------------------------------
# No secret in any operation a deploy builds

class _Recorder:
    """Stands in for pyinfra's operation modules and host: records every call instead of running it."""

    def __init__(self, facts=None):
        self.calls: list[tuple[str, tuple, dict]] = []
        self.facts = facts or {}

    def __getattr__(self, name):
        def call(*args, **kwargs):
            self.calls.append((name, args, kwargs))
            return self.facts.get(getattr(args[0], "__name__", ""), True) if name == "get_fact" else None
        return call


BARE = {"files": {}, "directories": {}, "units": {}, "sysctl": {}, "images": [], "compose_version": "2.29.0",
        "snapshot": None, "units_need_reload": []}


def _operations(monkeypatch, secrets: Secrets, live: dict) -> list[tuple[str, tuple, dict]]:
    import roles.docker
    import roles.host
    import roles.place_files
    import roles.record
    import roles.stack
    import roles.verify_timer
    import roles.volumes
    from edgefit.converge import decide
    from edgefit.settings import read_settings

    recorder = _Recorder()
    for module in (roles.docker, roles.host, roles.place_files, roles.record, roles.stack, roles.verify_timer,
                   roles.volumes):
        for name in ("files", "server", "apt", "host"):
            if hasattr(module, name):
                monkeypatch.setattr(module, name, recorder)
    settings = read_settings({})
    files = render_stack(PLAN, secrets)
    changes = decide(PLAN, files, live)
    facts = {"swap_mib": 0, "root_free_mib": 50000, "os_id": "debian", "docker_installed": False,
             "data_device": {"exists": True, "empty": True, "mountpoint": None}}
    roles.docker.install_docker.__wrapped__(settings, live, facts)
    roles.volumes.prepare_volumes.__wrapped__(PLAN, live, facts)
    roles.place_files.place_files.__wrapped__(changes)
    roles.host.tune_host.__wrapped__(PLAN, changes, live, facts)
    roles.docker.run_docker.__wrapped__(changes, live)
    roles.stack.deploy_stack.__wrapped__(PLAN, settings, changes)
    roles.verify_timer.install_verify_timer.__wrapped__(PLAN, live)
    roles.record.record_plan.__wrapped__(changes)
    return recorder.calls


def test_no_operation_of_a_deploy_from_bare_names_or_shows_a_secret(monkeypatch):
    import io

    secrets = Secrets.generate()
    values = [getattr(secrets, f.name) for f in dataclasses.fields(Secrets)]
    calls = _operations(monkeypatch, secrets, BARE)
    assert any(name == "put" for name, _, _ in calls), "a deploy from bare uploads files"
    for name, args, kwargs in calls:
        shown = []
        for value in [*args, *kwargs.values()]:
            if isinstance(value, io.BytesIO):
                # The one archive of changed files: gzip, never diffed, to a new path named by its hash.
                assert value.getvalue()[:2] == b"\x1f\x8b"
                assert re.fullmatch(r"/var/lib/edgefit/incoming-[0-9a-f]{16}\.tar\.gz", kwargs["dest"])
            elif isinstance(value, io.StringIO):
                shown.append(value.getvalue())  # the plan of record: text pyinfra may diff
            else:
                shown.append(repr(value))
        text = "\n".join(shown)
        for secret in values:
            assert secret not in text, f"{name} shows a secret"


def test_secrets_are_read_by_a_command_whose_output_is_not_printed(monkeypatch):
    import roles.secrets

    seen = {}

    class Host:
        name = "h"

        def run_shell_command(self, command, **kwargs):
            seen.update(kwargs, command=command)
            return True, type("Output", (), {"stdout_lines": ["SECRET_KEY=x"]})()

    monkeypatch.setattr(roles.secrets, "host", Host())
    monkeypatch.setattr("edgefit.remote.executor_arguments", lambda state, host: {"_sudo": True})
    assert roles.secrets._read_secrets_file() == "SECRET_KEY=x\n"
    assert seen["print_output"] is False and seen["print_input"] is False and seen["_sudo"] is True
    assert roles.secrets.parse_read([roles.secrets.ABSENT]) is None
    import edgefit.facts
    assert not hasattr(edgefit.facts, "SecretsFile"), "no fact holds the secrets (facts print with --debug)"


# ---------------------------------------------------------------------------------------------
# TLS: nginx on 443, 80 redirects, the certificate

def _nginx_conf(**options) -> str:
    plan = make_plan(HostSize(2, 4096), Options(**options))
    pair = _test_pair() if options.get("tls") == "provided" else None
    return {f.path: f.content for f in render_stack(plan, Secrets.generate(), pair)}["conf/nginx/nginx.conf"]


_PAIR: dict = {}


def _test_pair(tmp: Path | None = None) -> tuple[str, str]:
    """A self-signed pair made by the deploy's own command, in a temporary directory."""
    if "pair" not in _PAIR:
        import atexit
        import shutil
        import tempfile

        from roles.tls import self_signed_command
        directory = Path(tempfile.mkdtemp(prefix="edgefit-tls-test-"))
        atexit.register(shutil.rmtree, directory, True)
        command = self_signed_command("dify.example.net").replace("/etc/edgefit/tls/self-signed", str(directory))
        subprocess.run(["sh", "-c", command], check=True, timeout=60)
        _PAIR["pair"] = ((directory / "cert.pem").read_text(), (directory / "key.pem").read_text())
        _PAIR["dir"] = directory
    return _PAIR["pair"]


def test_nginx_serves_https_and_port_80_only_redirects():
    conf = _nginx_conf()
    assert "listen 443 ssl;" in conf and "listen 80;" in conf
    assert "return 301 https://$host$request_uri;" in conf
    assert '"~^http:/\\.well-known/acme-challenge/" 0;' in conf
    assert "ssl_certificate /etc/nginx/tls/cert.pem;" in conf
    assert "Strict-Transport-Security" not in conf, "no HSTS with a self-signed certificate"
    assert "$http_x_forwarded_proto" not in conf, "a client's X-Forwarded-Proto is not trusted"


def test_hsts_only_with_a_real_certificate_and_the_proxy_header_only_behind_one():
    assert 'Strict-Transport-Security "max-age=31536000" always' in _nginx_conf(tls="provided")
    assert "default $http_x_forwarded_proto;" in _nginx_conf(behind_proxy=True)


def test_compose_publishes_80_and_443_and_mounts_the_certificate():
    plan = make_plan(HostSize(2, 4096), Options())
    compose = rendered(Secrets.generate(), plan)["/opt/edgefit/docker-compose.yml"]
    assert '- "80:80"' in compose and '- "443:443"' in compose
    assert "- /etc/edgefit/tls/self-signed:/etc/nginx/tls:ro" in compose
    provided = make_plan(HostSize(2, 4096), Options(tls="provided"))
    files = {f.dest: f for f in render_stack(provided, Secrets.generate(), _test_pair())}
    assert "- /opt/edgefit/conf/nginx/tls:/etc/nginx/tls:ro" in files["/opt/edgefit/docker-compose.yml"].content
    key = files["/opt/edgefit/conf/nginx/tls/key.pem"]
    assert key.mode == 0o600 and key.services == ("nginx",) and "PRIVATE KEY" in key.content


def test_the_self_signed_command_is_for_the_name_and_quoted():
    from roles.tls import certificate_name, self_signed_command
    assert certificate_name("dify.example.net", "10.0.0.5") == "dify.example.net"
    assert certificate_name(None, "10.0.0.5") == "10.0.0.5"
    assert certificate_name(None, "@vagrant/edge-small") == "localhost"
    command = self_signed_command("dify.example.net")
    assert "-subj /CN=dify.example.net -addext subjectAltName=DNS:dify.example.net" in command
    assert "subjectAltName=IP:10.0.0.5" in self_signed_command("10.0.0.5")
    assert command.index("mv /etc/edgefit/tls/self-signed/cert.pem.new") > command.index("key.pem.new /etc")
    with pytest.raises(Exception):
        self_signed_command("x; rm -rf /")


def test_the_self_signed_certificate_is_made_only_when_missing(monkeypatch):
    import roles.tls
    recorder = _Recorder()
    monkeypatch.setattr(roles.tls, "host", type("H", (), {"name": "edge", "noop": staticmethod(recorder.noop)})())
    monkeypatch.setattr(roles.tls, "server", recorder)
    plan = make_plan(HostSize(2, 4096), Options())
    roles.tls.make_certificate.__wrapped__(plan, BARE)
    assert [name for name, _, _ in recorder.calls] == ["noop", "shell"]
    assert "self-signed" in recorder.calls[0][1][0]
    recorder.calls.clear()
    kept = {**BARE, "files": {roles.tls.SELF_SIGNED_CERT: {}, roles.tls.SELF_SIGNED_KEY: {}}}
    roles.tls.make_certificate.__wrapped__(plan, kept)
    assert [name for name, _, _ in recorder.calls] == ["noop"], "kept across deploys: no operation"


def test_a_provided_pair_is_checked(tmp_path):
    from edgefit.settings import SettingsError, read_settings
    cert, key = _test_pair()
    (tmp_path / "cert.pem").write_text(cert)
    (tmp_path / "key.pem").write_text(key)
    settings = read_settings({"edgefit_tls": "provided", "edgefit_tls_certificate": str(tmp_path / "cert.pem"),
                              "edgefit_tls_key": str(tmp_path / "key.pem")})
    assert settings.tls_pair == (cert, key) and settings.options.tls == "provided"
    other = subprocess.run(["openssl", "genpkey", "-algorithm", "EC", "-pkeyopt", "ec_paramgen_curve:P-256"],
                           capture_output=True, text=True, check=True).stdout
    (tmp_path / "other.pem").write_text(other)
    for data, words in [
        ({"edgefit_tls": "provided"}, "needs edgefit_tls_certificate"),
        ({"edgefit_tls": "provided", "edgefit_tls_certificate": str(tmp_path / "cert.pem"),
          "edgefit_tls_key": str(tmp_path / "other.pem")}, "is not the key of"),
        ({"edgefit_tls": "provided", "edgefit_tls_certificate": str(tmp_path / "key.pem"),
          "edgefit_tls_key": str(tmp_path / "key.pem")}, "is not a PEM certificate"),
        ({"edgefit_tls_certificate": str(tmp_path / "cert.pem")}, "set edgefit_tls = \"provided\""),
        ({"edgefit_tls": "acme", "edgefit_acme_email": "ops@example.com"}, "needs edgefit_domain"),
        ({"edgefit_tls": "acme", "edgefit_domain": "192.0.2.7", "edgefit_acme_email": "ops@example.com"},
         "needs edgefit_domain"),
        ({"edgefit_tls": "acme", "edgefit_domain": "dify.example.com"}, "needs edgefit_acme_email"),
        ({"edgefit_tls": "acme", "edgefit_domain": "dify.example.com", "edgefit_acme_email": "ops@example.com",
          "edgefit_acme_ca_bundle": str(tmp_path / "key.pem")}, "holds no PEM certificate"),
        ({"edgefit_acme_email": "ops@example.com"}, "set edgefit_tls = \"acme\""),
        ({"edgefit_acme_directory": "https://acme-staging-v02.api.letsencrypt.org/directory"},
         "set edgefit_tls = \"acme\""),
        ({"edgefit_tls": "acme", "edgefit_domain": "dify.example.com", "edgefit_acme_email": "ops@example.com",
          "edgefit_acme_directory": "http://acme.example.com/directory"}, "edgefit_acme_directory"),
        ({"edgefit_tls": "acme", "edgefit_domain": "dify.example.com", "edgefit_acme_email": "ops; rm -rf /"},
         "is not an e-mail address"),
    ]:
        with pytest.raises(SettingsError, match=re.escape(words)) as caught:
            read_settings(data)
        assert "PRIVATE KEY" not in str(caught.value)


def test_acme_settings_are_read_with_the_ca_bundle_text(tmp_path):
    from edgefit.settings import ACME_DIRECTORY, read_settings
    cert, _ = _test_pair()
    (tmp_path / "ca.pem").write_text(cert)
    base = {"edgefit_tls": "acme", "edgefit_domain": "Dify.Example.com", "edgefit_acme_email": "ops@example.com"}
    plain = read_settings(base).acme
    assert (plain.domain, plain.email, plain.directory, plain.ca_bundle) == (
        "dify.example.com", "ops@example.com", ACME_DIRECTORY, None)
    private = read_settings({**base, "edgefit_acme_directory": "https://127.0.0.1:14000/dir",
                             "edgefit_acme_ca_bundle": str(tmp_path / "ca.pem")}).acme
    assert private.directory == "https://127.0.0.1:14000/dir" and private.ca_bundle == cert
    assert read_settings({}).acme is None


def test_acme_renders_the_hook_the_webroot_mount_and_hsts_and_a_private_ca_only_when_given():
    plan = make_plan(HostSize(2, 4096), Options(tls="acme", domain="dify.example.com"))
    files = {f.dest: f for f in render_stack(plan, Secrets.generate())}
    hook = files["/etc/edgefit/acme-deploy-hook.sh"]
    assert hook.mode == 0o700 and "printf '%s\\n' dify.example.com" in hook.content
    compose = files["/opt/edgefit/docker-compose.yml"].content
    assert "- /etc/edgefit/tls/acme:/etc/nginx/tls:ro" in compose
    assert "- /var/lib/edgefit/acme:/var/www/acme:ro" in compose
    assert 'Strict-Transport-Security "max-age=31536000" always' in files["/opt/edgefit/conf/nginx/nginx.conf"].content
    assert not any("certbot" in dest or "acme-directory-ca" in dest for dest in files)
    private = {f.dest: f for f in render_stack(plan, Secrets.generate(), None, "-----BEGIN CERTIFICATE-----\n")}
    drop_in = private["/etc/systemd/system/certbot.service.d/edgefit.conf"]
    assert drop_in.systemd_unit and "REQUESTS_CA_BUNDLE=/etc/edgefit/tls/acme-directory-ca.pem" in drop_in.content
    other = {f.dest: f.content for f in render_stack(make_plan(HostSize(2, 4096), Options()), Secrets.generate())}
    assert "/var/www/acme:ro" not in other["/opt/edgefit/docker-compose.yml"]
    assert not any("acme-deploy-hook" in dest for dest in other)


def test_the_certbot_command_quotes_its_values_and_says_what_to_do_when_it_fails():
    from edgefit.settings import AcmeSettings
    from roles.tls import certbot_command
    acme = AcmeSettings(domain="dify.example.com", email="o'ps@example.com", directory="https://ca.example/dir")
    command = certbot_command(acme)
    assert "--email 'o'\"'\"'ps@example.com'" in command and "REQUESTS_CA_BUNDLE" not in command
    assert "--webroot -w /var/lib/edgefit/acme -d dify.example.com --cert-name edgefit --keep-until-expiring" in command
    assert "--deploy-hook /etc/edgefit/acme-deploy-hook.sh" in command
    assert "RENEWED_LINEAGE=/etc/letsencrypt/live/edgefit /etc/edgefit/acme-deploy-hook.sh" in command
    assert "REQUESTS_CA_BUNDLE=/etc/edgefit/tls/acme-directory-ca.pem certbot" in certbot_command(
        AcmeSettings(domain="dify.example.com", email="ops@example.com", directory="https://ca.example/dir",
                     ca_bundle="PEM"))


def test_verify_warns_about_a_self_signed_certificate():
    from edgefit.expectations import expectations
    plan = make_plan(HostSize(2, 4096), Options())
    assert expectations(plan, [])["tls"] == "self-signed"
    assert expectations(make_plan(HostSize(2, 4096), Options(tls="provided")), [])["tls"] == "provided"


def _free_port() -> int:
    import socket
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _nginx_binary() -> str:
    """Debian's nginx: a failure in CI when it is missing, a skip elsewhere."""
    import shutil

    from tests.servers_helpers import require_executable
    return require_executable(shutil.which("nginx") or "/usr/sbin/nginx", "nginx-light")


def _local_nginx_conf(tmp_path: Path, http: int, https: int) -> str:
    """The rendered nginx.conf moved onto loopback ports, the test pair and a pid file of its own."""
    _test_pair()
    return (_nginx_conf().replace("/etc/nginx/tls", str(_PAIR["dir"]))
            .replace("listen 80;", f"listen 127.0.0.1:{http};").replace("listen 443 ssl;", f"listen 127.0.0.1:{https} ssl;")
            .replace("pid /tmp/nginx.pid;", f"pid {tmp_path}/nginx.pid;"))


@pytest.mark.servers
def test_real_nginx_redirects_to_https_and_serves_the_certificate(tmp_path):
    import ssl
    import time
    nginx = _nginx_binary()
    http, https = _free_port(), _free_port()
    (tmp_path / "nginx.conf").write_text(_local_nginx_conf(tmp_path, http, https))
    test = subprocess.run([nginx, "-t", "-q", "-p", str(tmp_path), "-e", "stderr", "-c", str(tmp_path / "nginx.conf")],
                          capture_output=True, text=True, timeout=30)
    assert test.returncode == 0, test.stderr
    server = subprocess.Popen([nginx, "-p", str(tmp_path), "-e", "stderr", "-c", str(tmp_path / "nginx.conf"),
                               "-g", "daemon off;"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        class NoRedirect(urllib.request.HTTPRedirectHandler):
            def redirect_request(self, *args, **kwargs):
                return None
        opener = urllib.request.build_opener(NoRedirect)
        for _ in range(50):
            try:
                opener.open(f"http://127.0.0.1:{http}/edgefit-health", timeout=2)
                break
            except (urllib.error.URLError, ConnectionError):
                time.sleep(0.1)
        with pytest.raises(urllib.error.HTTPError) as redirect:
            opener.open(f"http://127.0.0.1:{http}/console/api/setup?x=1", timeout=5)
        assert redirect.value.code == 301
        assert redirect.value.headers["Location"] == "https://127.0.0.1/console/api/setup?x=1"
        with pytest.raises(urllib.error.HTTPError) as challenge:
            opener.open(f"http://127.0.0.1:{http}/.well-known/acme-challenge/token", timeout=5)
        assert challenge.value.code == 404, "the ACME challenge path is not redirected"
        context = ssl.create_default_context(cafile=str(_PAIR["dir"] / "cert.pem"))
        context.check_hostname = False
        with urllib.request.urlopen(f"https://127.0.0.1:{https}/edgefit-health", context=context, timeout=5) as ok:
            assert ok.status == 200 and "Strict-Transport-Security" not in ok.headers
    finally:
        server.terminate()
        server.wait(timeout=10)


@pytest.mark.servers
def test_real_nginx_reloads_a_replaced_conf_and_keeps_serving_when_it_refuses_one(tmp_path):
    """roles/stack.py's reload of nginx, run against Debian's nginx with the rendered nginx.conf: a
    deploy replaces the file (tar: a new inode) and nginx serves the new one after the reload; a
    file nginx refuses fails the reload and nginx serves on with the one it had."""
    import time

    from edgefit.render import NGINX_CONF_IN_CONTAINER
    from roles.stack import RELOAD_COMMANDS
    nginx = _nginx_binary()
    http, https = _free_port(), _free_port()
    conf_path = tmp_path / "nginx.conf"
    conf = _local_nginx_conf(tmp_path, http, https)
    conf_path.write_text(conf)
    reload = (RELOAD_COMMANDS["nginx"].replace(f"-c {NGINX_CONF_IN_CONTAINER}", f"-p {tmp_path} -e stderr -c {conf_path}")
              .replace("nginx ", f"{nginx} "))

    def replace_conf(text: str) -> None:  # as the deploy's tar does: a new file, renamed over the old
        staged = tmp_path / "nginx.conf.new"
        staged.write_text(text)
        staged.rename(conf_path)

    def health() -> str:
        with urllib.request.urlopen(f"http://127.0.0.1:{http}/edgefit-health", timeout=5) as answer:
            return answer.read().decode()

    server = subprocess.Popen([nginx, "-p", str(tmp_path), "-e", "stderr", "-c", str(conf_path), "-g", "daemon off;"],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        for _ in range(50):
            try:
                assert health() == "ok\n"
                break
            except (urllib.error.URLError, ConnectionError):
                time.sleep(0.1)
        replace_conf(conf.replace('return 200 "ok\\n";', 'return 200 "reloaded\\n";'))
        done = subprocess.run(["sh", "-c", reload], capture_output=True, text=True, timeout=30)
        assert done.returncode == 0, done.stderr
        # A HUP returns before the new workers answer, and an old worker may take one more
        # connection before it stops: wait for ten new answers in a row.
        in_a_row, deadline = 0, time.monotonic() + 20
        while in_a_row < 10 and time.monotonic() < deadline:
            in_a_row = in_a_row + 1 if health() == "reloaded\n" else 0
            time.sleep(0.05)
        assert in_a_row == 10, "nginx did not serve the replaced nginx.conf after the reload"
        replace_conf(conf.replace("server_tokens off;", "server_tokens off"))
        done = subprocess.run(["sh", "-c", reload], capture_output=True, text=True, timeout=30)
        assert done.returncode != 0 and "nginx.conf" in done.stderr
        assert server.poll() is None and health() == "reloaded\n"
    finally:
        server.terminate()
        server.wait(timeout=10)


# ---------------------------------------------------------------------------------------------
# The firewall

def _ruleset(**options) -> str:
    plan = make_plan(HostSize(2, 4096), Options(**options))
    return {f.dest: f.content for f in render_stack(plan, Secrets.generate())}.get("/etc/edgefit/firewall.nft")


def _accepted_ports(ruleset: str, chain: str) -> set[int]:
    body = ruleset.split(f"chain {chain} {{", 1)[1].split("}\n\n", 1)[0].split("\n    }", 1)[0]
    ports = set()
    for line in body.splitlines():
        found = re.search(r"tcp dport \{ ([0-9, ]+) \} accept", line)
        if found:
            ports |= {int(port) for port in found.group(1).split(",")}
    return ports


def test_the_ruleset_lets_in_only_ssh_80_and_443():
    rules = _ruleset()
    assert _accepted_ports(rules, "input") == {22, 80, 443}
    assert "policy drop;" in rules.split("chain input", 1)[1].split("chain forward", 1)[0]
    assert _accepted_ports(_ruleset(ssh_port=2222), "input") == {22, 2222, 80, 443}
    first = rules.split("chain input", 1)[1].splitlines()
    assert "ct state established,related accept" in first[3], "the running SSH session is kept first"


def test_the_ruleset_closes_what_docker_publishes_except_80_and_443():
    rules = _ruleset()
    forward = rules.split("chain forward", 1)[1]
    assert "hook forward priority filter - 10" in forward, "before Docker's filter chains (priority 0)"
    assert 'oifname "br-*" ct status dnat tcp dport { 80, 443 } accept' in forward
    assert forward.index('oifname "br-*" drop') > forward.index("ct status dnat")
    assert rules.count("table inet edgefit {") == 2 and "delete table inet edgefit" in rules
    assert "flush ruleset" not in rules, "only edgefit's own table is touched"


def test_no_firewall_files_when_it_is_off():
    assert _ruleset(firewall=False) is None


def test_ssh_port_is_checked():
    from edgefit.settings import SettingsError, read_settings
    assert read_settings({"ssh_port": 2222}).options.ssh_port == 2222
    assert read_settings({"ssh_port": "2222"}).options.ssh_port == 2222
    assert read_settings({}).options.ssh_port == 22
    for bad in (0, 70000, "22; rm -rf /", True):
        with pytest.raises(SettingsError, match="ssh_port"):
            read_settings({"ssh_port": bad})


def _firewall_calls(monkeypatch, plan, changes, live):
    import roles.firewall
    recorder = _Recorder()
    monkeypatch.setattr(roles.firewall, "server", recorder)
    monkeypatch.setattr(roles.firewall, "apt", recorder)
    roles.firewall.configure_firewall.__wrapped__(plan, changes, live)
    return recorder.calls


def test_the_firewall_role_acts_only_when_the_host_asks_for_it(monkeypatch):
    from edgefit.converge import decide
    import roles.firewall
    plan = make_plan(HostSize(2, 4096), Options())
    files = render_stack(plan, Secrets.generate())
    bare = _firewall_calls(monkeypatch, plan, decide(plan, files, BARE), BARE)
    assert [name for name, _, _ in bare] == ["packages", "shell"]
    command = bare[1][2]["commands"][0]
    assert command.startswith("/usr/sbin/nft -c -f /etc/edgefit/firewall.nft && ")
    assert "sshd listens on port" in command and command.endswith("/usr/sbin/nft list table inet edgefit >/dev/null")
    from edgefit.converge import sha256
    at_plan = {**BARE, "files": {f.dest: {"sha256": sha256(f.content), "mode": f.mode, "uid": f.owner_uid or 0}
                                 for f in files} | {roles.firewall.NFT: {}},
               "units": {"edgefit-firewall.service": {"enabled": "enabled", "active": "active"}}}
    changes = decide(plan, files, at_plan)
    assert not [f.dest for f in changes.upload if "firewall" in f.dest]
    assert _firewall_calls(monkeypatch, plan, changes, at_plan) == [], "a host at its plan: no operation"
    off = make_plan(HostSize(2, 4096), Options(firewall=False))
    removed = _firewall_calls(monkeypatch, off, changes, at_plan)
    assert [name for name, _, _ in removed] == ["shell"]
    assert "nft delete table inet edgefit" in removed[0][2]["commands"][0]
    assert _firewall_calls(monkeypatch, off, changes, BARE) == []


def test_the_ssh_guard_refuses_to_close_the_port_sshd_listens_on(tmp_path):
    from roles.firewall import ssh_guard_command
    fake = tmp_path / "ss"
    fake.write_text("#!/bin/sh\necho 'LISTEN 0 128 0.0.0.0:2200 0.0.0.0:* users:((\"sshd\",pid=1,fd=3))'\n")
    fake.chmod(0o755)
    env = {"PATH": f"{tmp_path}:/usr/bin:/bin"}
    refused = subprocess.run(["sh", "-c", ssh_guard_command([22])], env=env, capture_output=True, text=True)
    assert refused.returncode == 1 and "sshd listens on port 2200" in refused.stderr
    assert subprocess.run(["sh", "-c", ssh_guard_command([22, 2200])], env=env).returncode == 0


@pytest.mark.servers
def test_the_ruleset_loads_in_nftables_twice(tmp_path):
    import os
    import shutil
    nft, unshare = shutil.which("nft") or "/usr/sbin/nft", shutil.which("unshare")
    if not Path(nft).exists() or not unshare or os.geteuid() != 0:
        pytest.skip("needs root, nft (nftables) and unshare to load the ruleset in a network namespace of its own")
    path = tmp_path / "firewall.nft"
    path.write_text(_ruleset(ssh_port=2222))
    # In a network namespace of its own: this machine's firewall is never touched.
    done = subprocess.run([unshare, "-n", "sh", "-c", f"{nft} -f {path} && {nft} -f {path} && {nft} list ruleset"],
                          capture_output=True, text=True, timeout=30)
    assert done.returncode == 0, done.stderr
    assert done.stdout.count("table inet edgefit") == 1, "loaded again, replaced whole (not doubled)"
    assert "tcp dport { 22, 2222 } accept" in done.stdout


def test_the_plugin_daemon_gets_no_secret_key_nor_init_password_nor_a_superuser():
    secrets = Secrets.generate()
    files = rendered(secrets)
    compose = files["/opt/edgefit/docker-compose.yml"]
    daemon = compose.split("\n  plugin_daemon:\n", 1)[1].split("\n\n", 1)[0]
    assert "env_file:" not in daemon
    for name in ("SECRET_KEY", "INIT_PASSWORD", "REDIS_BROKER_PASSWORD", "CELERY_BROKER_URL"):
        assert f"{name}:" not in daemon
    # its own Postgres role, owner of its database only; never the superuser
    assert "DB_USERNAME: dify_plugin" in daemon
    assert "DB_PASSWORD: ${DB_PLUGIN_PASSWORD:?DB_PLUGIN_PASSWORD missing from .env}" in daemon
    # and the superuser's password is nowhere Dify's processes read: not in .env, only in the
    # db container's own env file
    assert secrets.db_password not in files["/opt/edgefit/.env"]
    assert f"POSTGRES_PASSWORD={secrets.db_password}" in files["/opt/edgefit/conf/postgres/superuser.env"]
    db = compose.split("\n  db:\n", 1)[1].split("\n\n", 1)[0]
    assert "env_file: ./conf/postgres/superuser.env" in db and "DB_PASSWORD" not in db
