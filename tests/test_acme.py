"""edgefit_tls = "acme" end to end on this machine (issue 10): Let's Encrypt's own test CA (pebble,
Debian's package) with its mock DNS, the rendered nginx.conf served by Debian's nginx with the
deploy's placeholder pair, and the deploy's certbot command (roles/tls.py) with the rendered deploy
hook. The CA checks HTTP-01 through nginx, the hook puts the certificate in place and reloads
nginx, a renewal as Debian's certbot.timer runs it does the same again, and a second run of the
deploy's command keeps the valid certificate. Everything listens on 127.0.0.1 and free ports;
every process is stopped by its PID.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import socket
import ssl
import subprocess
import tempfile
import time
import urllib.request
from pathlib import Path

import pytest

from edgefit.plan import HostSize, Options, make_plan
from edgefit.render import ACME_TLS_DIR, ACME_WEBROOT_IN_CONTAINER, TLS_DIR_IN_CONTAINER, render_stack
from edgefit.secrets import Secrets
from edgefit.settings import AcmeSettings
from roles.tls import CERT_NAME, certbot_command, issued_for, self_signed_command
from servers_helpers import free_port, require_executable

pytestmark = pytest.mark.servers
DOMAIN = "dify.edgefit.test"
OPENSSL = "openssl"


def _run(argv, **kwargs):
    return subprocess.run(argv, capture_output=True, text=True, timeout=120, check=True, **kwargs)


def _ca_for_pebble(directory: Path) -> tuple[Path, Path, Path]:
    """A CA, and a certificate for 127.0.0.1 signed by it, for pebble's own HTTPS listener."""
    ca_key, ca_cert = directory / "ca.key", directory / "ca.pem"
    key, csr, cert = directory / "pebble.key", directory / "pebble.csr", directory / "pebble.pem"
    _run([OPENSSL, "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
          "-days", "2", "-subj", "/CN=edgefit test ACME API CA", "-keyout", str(ca_key), "-out", str(ca_cert)])
    _run([OPENSSL, "req", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
          "-subj", "/CN=127.0.0.1", "-keyout", str(key), "-out", str(csr)])
    extensions = directory / "san.cnf"
    extensions.write_text("subjectAltName=IP:127.0.0.1\n")
    _run([OPENSSL, "x509", "-req", "-in", str(csr), "-CA", str(ca_cert), "-CAkey", str(ca_key), "-CAcreateserial",
          "-days", "2", "-extfile", str(extensions), "-out", str(cert)])
    return ca_cert, cert, key


def _wait_for(probe, what: str, processes, timeout_s: float = 30) -> None:
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            if probe():
                return
        except OSError:
            pass
        for name, process in processes.items():
            assert process.poll() is None, f"{name} exited with {process.returncode}"
        assert time.monotonic() < deadline, f"{what} not within {timeout_s}s"
        time.sleep(0.1)


def _served_once_reloaded(port: int, old_serial: str, timeout_s: float = 10) -> dict:
    """The certificate nginx serves once its reload took effect: a HUP returns before the new
    workers answer, so a connection right after it may still meet an old worker."""
    deadline = time.monotonic() + timeout_s
    while (served := _served_certificate(port))["serial"] == old_serial:
        assert time.monotonic() < deadline, f"nginx still serves serial {old_serial} after {timeout_s}s"
        time.sleep(0.2)
    return served


def _served_certificate(port: int) -> dict:
    """Subject, issuer and serial of what nginx serves on 127.0.0.1:port (SNI: the domain)."""
    context = ssl.create_default_context()
    context.check_hostname, context.verify_mode = False, ssl.CERT_NONE
    with socket.create_connection(("127.0.0.1", port), timeout=10) as raw:
        with context.wrap_socket(raw, server_hostname=DOMAIN) as tls:
            der = tls.getpeercert(binary_form=True)
    pem = ssl.DER_cert_to_PEM_cert(der)
    shown = _run([OPENSSL, "x509", "-noout", "-subject", "-issuer", "-serial"], input=pem).stdout
    return dict(line.split("=", 1) for line in shown.strip().splitlines())


@pytest.fixture
def acme_world(tmp_path):
    """pebble + its mock DNS + nginx with the rendered config and placeholder, all on 127.0.0.1."""
    pebble = require_executable("pebble", "pebble")
    challtestsrv = require_executable("pebble-challtestsrv", "pebble")
    require_executable("certbot", "certbot")
    nginx = require_executable("nginx", "nginx-light")
    api_ca, pebble_cert, pebble_key = _ca_for_pebble(tmp_path)
    http, https, acme_port, dns_port = free_port(), free_port(), free_port(), free_port()
    plan = make_plan(HostSize(2, 4096), Options(tls="acme", domain=DOMAIN))
    files = {f.dest: f.content for f in render_stack(plan, Secrets.generate(), None, api_ca.read_text())}
    tls_dir, certbot_dir = tmp_path / "tls", tmp_path / "letsencrypt"
    # nginx's workers run as nobody: the webroot must be reachable, and pytest's tmp_path is not (0700)
    webroot = Path(tempfile.mkdtemp(prefix="edgefit-acme-webroot-"))
    webroot.chmod(0o755)
    _run(["sh", "-c", self_signed_command(DOMAIN, str(tls_dir))])  # the deploy's placeholder
    pid = tmp_path / "nginx.pid"
    conf = (files["/opt/edgefit/conf/nginx/nginx.conf"].replace(TLS_DIR_IN_CONTAINER, str(tls_dir))
            .replace(f"root {ACME_WEBROOT_IN_CONTAINER};", f"root {webroot};")
            .replace("listen 80;", f"listen 127.0.0.1:{http};").replace("listen 443 ssl;", f"listen 127.0.0.1:{https} ssl;")
            .replace("pid /tmp/nginx.pid;", f"pid {pid};"))
    (tmp_path / "nginx.conf").write_text(conf)
    hook = tmp_path / "hook.sh"
    hook.write_text(files["/etc/edgefit/acme-deploy-hook.sh"].replace(ACME_TLS_DIR, str(tls_dir))
                    .replace("docker exec edgefit-dify-nginx-1 nginx -c /etc/nginx/edgefit/nginx.conf -s reload", f"kill -HUP $(cat {pid})"))
    hook.chmod(0o700)
    config = tmp_path / "pebble.json"
    config.write_text(json.dumps({"pebble": {
        "listenAddress": f"127.0.0.1:{acme_port}", "managementListenAddress": f"127.0.0.1:{free_port()}",
        "certificate": str(pebble_cert), "privateKey": str(pebble_key), "httpPort": http, "tlsPort": free_port(),
        "ocspResponderURL": "", "externalAccountBindingRequired": False}}))
    env = {**os.environ, "PEBBLE_VA_NOSLEEP": "1", "PEBBLE_WFE_NONCEREJECT": "0"}
    logs = {name: open(tmp_path / f"{name}.log", "w") for name in ("dns", "pebble", "nginx")}
    processes = {}
    try:
        processes["dns"] = subprocess.Popen(
            [challtestsrv, "-defaultIPv4", "127.0.0.1", "-defaultIPv6", "", "-dns01", f"127.0.0.1:{dns_port}",
             "-http01", "", "-https01", "", "-tlsalpn01", "", "-management", f"127.0.0.1:{free_port()}"],
            stdout=logs["dns"], stderr=subprocess.STDOUT)
        processes["pebble"] = subprocess.Popen([pebble, "-config", str(config), "-dnsserver", f"127.0.0.1:{dns_port}"],
                                               env=env, stdout=logs["pebble"], stderr=subprocess.STDOUT)
        processes["nginx"] = subprocess.Popen([nginx, "-p", str(tmp_path), "-e", "stderr", "-c", str(tmp_path / "nginx.conf"),
                                               "-g", "daemon off;"], stdout=logs["nginx"], stderr=subprocess.STDOUT)
        api = ssl.create_default_context(cafile=str(api_ca))
        _wait_for(lambda: urllib.request.urlopen(f"https://127.0.0.1:{acme_port}/dir", context=api, timeout=2).status == 200,
                  "pebble's directory", processes)
        _wait_for(lambda: urllib.request.urlopen(f"http://127.0.0.1:{http}/edgefit-health", timeout=2).status == 200,
                  "nginx", processes)
        acme = AcmeSettings(domain=DOMAIN, email="ops@example.com", directory=f"https://127.0.0.1:{acme_port}/dir",
                            ca_bundle=api_ca.read_text())
        command = certbot_command(acme, webroot=str(webroot), hook=str(hook), ca_bundle=str(api_ca),
                                  config_dir=str(certbot_dir), own_dirs=True)
        yield {"command": command, "https": https, "webroot": webroot, "tls_dir": tls_dir, "certbot_dir": certbot_dir, "api_ca": api_ca,
               "tmp": tmp_path}
    finally:
        shutil.rmtree(webroot, ignore_errors=True)
        for process in processes.values():
            process.terminate()
        for process in processes.values():
            try:
                process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                process.kill()
        for log in logs.values():
            log.close()


def _logs(world) -> str:
    return "\n".join(f"--- {name}\n{(world['tmp'] / f'{name}.log').read_text()[-2000:]}" for name in ("pebble", "nginx"))


def test_certbot_gets_a_certificate_through_nginx_the_hook_serves_it_and_a_renewal_replaces_it(acme_world):
    world = acme_world
    before = _served_certificate(world["https"])
    assert before["issuer"].strip().endswith(DOMAIN), f"the placeholder is self-signed: {before}"

    first = subprocess.run(["sh", "-c", world["command"]], capture_output=True, text=True, timeout=300)
    assert first.returncode == 0, first.stdout + first.stderr + _logs(world)
    issued = _served_once_reloaded(world["https"], before["serial"])
    assert "Pebble" in issued["issuer"] and issued["subject"].strip().endswith(DOMAIN), issued
    issued_file = world["tls_dir"] / "issued"
    assert hashlib.sha256(issued_file.read_bytes()).hexdigest() == issued_for(DOMAIN), "a re-deploy would ask again"
    assert oct((world["tls_dir"] / "key.pem").stat().st_mode & 0o777) == "0o600"

    again = subprocess.run(["sh", "-c", world["command"]], capture_output=True, text=True, timeout=300)
    assert again.returncode == 0, again.stderr
    assert _served_certificate(world["https"])["serial"] == issued["serial"], "a valid certificate is kept"

    # what Debian's certbot.timer runs (certbot -q renew), forced: the renewal file carries the
    # webroot, the CA and the hook, and the drop-in gives it the CA bundle
    # (the timer's run sleeps a random while first; the test does not wait for that)
    renew = subprocess.run(["certbot", "-q", "renew", "--force-renewal", "--no-random-sleep-on-renew", "--config-dir", str(world["certbot_dir"]),
                            "--work-dir", str(world["certbot_dir"] / "work"), "--logs-dir", str(world["certbot_dir"] / "logs")],
                           capture_output=True, text=True, timeout=300,
                           env={**os.environ, "REQUESTS_CA_BUNDLE": str(world["api_ca"])})
    assert renew.returncode == 0, renew.stdout + renew.stderr + _logs(world)
    renewed = _served_once_reloaded(world["https"], issued["serial"])
    assert "Pebble" in renewed["issuer"]
    renewal = (world["certbot_dir"] / "renewal" / f"{CERT_NAME}.conf").read_text()
    assert "authenticator = webroot" in renewal and "renew_hook" in renewal


def test_a_ca_that_cannot_reach_the_host_fails_with_what_to_do(acme_world, tmp_path):
    world = acme_world
    elsewhere = tmp_path / "not-served-by-nginx"  # the token lands where the CA cannot read it
    broken = world["command"].replace(f"-w {world['webroot']}", f"-w {elsewhere}")
    assert broken != world["command"]
    failed = subprocess.run(["sh", "-c", broken], capture_output=True, text=True, timeout=300)
    assert failed.returncode == 1
    assert "then re-run the deploy; until then nginx serves a self-signed placeholder" in failed.stderr
    assert "Traceback" not in failed.stderr
    assert not (world["tls_dir"] / "issued").exists(), "the hook must not run after a failure"
