"""Role "tls": nginx's certificate when the host makes it: self-signed, or from an ACME CA.

With edgefit_tls = "self-signed" (the default) nginx needs a certificate before it starts: the
host's own openssl makes one (P-256, ten years) for edgefit_domain or the host's name into
/etc/edgefit/tls/self-signed/ (0600), only when it is missing, so a re-deploy keeps it and
browsers that accepted it once are not asked again. Every deploy says it is self-signed (verify
does too). A provided certificate is a rendered file (edgefit/render.py) and needs nothing here.

With edgefit_tls = "acme" the same openssl makes a placeholder in /etc/edgefit/tls/acme/ so nginx
can start and serve the CA's HTTP-01 tokens; once the stack is up, certbot (Debian's package)
asks the CA, and its deploy hook (rendered: edgefit/render.py) puts the certificate in place and
reloads nginx. Debian's certbot.timer renews it; a deploy asks again only when the certificate
in place was issued for another name (its `issued` file), so a host at its plan runs nothing.
"""

import hashlib

import ipaddress
import shlex

from pyinfra import host
from pyinfra.api import deploy
from pyinfra.operations import server

from edgefit import checks
from edgefit.plan import Plan
from edgefit.render import (ACME_CA_BUNDLE, ACME_HOOK, ACME_ISSUED, ACME_TLS_DIR, ACME_WEBROOT,
                            SELF_SIGNED_TLS_DIR)
from edgefit.settings import AcmeSettings, DeploySettings

SELF_SIGNED_CERT = f"{SELF_SIGNED_TLS_DIR}/cert.pem"
SELF_SIGNED_KEY = f"{SELF_SIGNED_TLS_DIR}/key.pem"
ACME_CERT, ACME_KEY = f"{ACME_TLS_DIR}/cert.pem", f"{ACME_TLS_DIR}/key.pem"
CERT_NAME = "edgefit"  # certbot's name for the certificate: /etc/letsencrypt/live/edgefit
CERTBOT_DIR = "/etc/letsencrypt"


def certificate_name(domain: str | None, host_name: str) -> str:
    """The name the certificate is for: the domain, else the host's name when it is a DNS name or
    an address, else localhost (an inventory name such as @vagrant/edge-small is neither)."""
    for candidate in (domain, host_name):
        if not candidate:
            continue
        try:
            return str(ipaddress.ip_address(candidate))
        except ValueError:
            pass
        try:
            return checks.hostname(candidate)
        except checks.CheckError:
            continue
    return "localhost"


def self_signed_command(name: str, directory: str = SELF_SIGNED_TLS_DIR) -> str:
    """openssl on the host; written under temporary names and renamed, the certificate last, so a
    half-made pair is never taken for a finished one."""
    try:
        alt = f"IP:{ipaddress.ip_address(name)}"
    except ValueError:
        alt = f"DNS:{checks.hostname(name)}"
    directory, cert, key = (shlex.quote(p) for p in (directory, f"{directory}/cert.pem", f"{directory}/key.pem"))
    return " && ".join([
        "set -e",
        "command -v openssl >/dev/null || DEBIAN_FRONTEND=noninteractive apt-get install -y -q openssl",
        "umask 077",
        f"mkdir -p {directory}",
        f"openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes -days 3650 "
        f"-subj {shlex.quote('/CN=' + name)} -addext {shlex.quote('subjectAltName=' + alt)} "
        f"-keyout {key}.new -out {cert}.new 2>/dev/null",
        f"mv {key}.new {key}",
        f"mv {cert}.new {cert}",
    ])


def certbot_command(acme: AcmeSettings, webroot: str = ACME_WEBROOT, hook: str = ACME_HOOK,
                    ca_bundle: str = ACME_CA_BUNDLE, config_dir: str = CERTBOT_DIR,
                    own_dirs: bool = False) -> str:
    """certbot on the host, HTTP-01 through nginx's webroot: a certificate for the domain, kept
    while it is valid (--keep-until-expiring), then the deploy hook, so the pair in place is the
    one certbot holds whether it was issued now or before. certbot saves the webroot, the CA and
    the hook in its renewal file, which Debian's certbot.timer uses. own_dirs: certbot's config,
    work and log directories under config_dir (the tests' certbot runs as a user's process)."""
    q = shlex.quote
    env = f"REQUESTS_CA_BUNDLE={q(ca_bundle)} " if acme.ca_bundle else ""
    dirs = (f" --config-dir {q(config_dir)} --work-dir {q(config_dir + '/work')} --logs-dir {q(config_dir + '/logs')}"
            if own_dirs else "")
    advice = (f"certbot could not get a certificate for {acme.domain} from {acme.directory}: its reason is above. "
              f"Check that {acme.domain} points at this host and that port 80 is open to the CA, then re-run the "
              "deploy; until then nginx serves a self-signed placeholder")
    return "\n".join([
        "set -e",
        "command -v certbot >/dev/null || DEBIAN_FRONTEND=noninteractive apt-get install -y -q certbot",
        # nginx's workers (not root) read the CA's tokens: the webroot and what certbot writes are 0755/0644
        f"mkdir -p {q(webroot)} && chmod 0755 {q(webroot)}",
        f"{env}certbot certonly --non-interactive --agree-tos --email {q(acme.email)} --server {q(acme.directory)}"
        f" --webroot -w {q(webroot)} -d {q(acme.domain)} --cert-name {CERT_NAME} --keep-until-expiring"
        f" --deploy-hook {q(hook)}{dirs} || {{ echo {q(advice)} >&2; exit 1; }}",
        f"RENEWED_LINEAGE={q(config_dir + '/live/' + CERT_NAME)} {q(hook)}",
    ])


def issued_for(domain: str) -> str:
    """The sha256 of the deploy hook's `issued` file for this name (what HostState reads)."""
    return hashlib.sha256(f"{domain}\n".encode()).hexdigest()


@deploy("HTTPS certificate")
def make_certificate(plan: Plan, live: dict) -> None:
    if plan.tls == "acme":
        if ACME_CERT not in live["files"] or ACME_KEY not in live["files"]:
            name = checks.hostname(plan.domain)
            server.shell(name=f"Placeholder certificate for {name} until the CA issues one (made once)",
                         commands=[self_signed_command(name, ACME_TLS_DIR)])
        return
    if plan.tls != "self-signed":
        return
    name = certificate_name(plan.domain, host.name)
    host.noop(f"HTTPS uses a self-signed certificate for {name}: browsers will warn; set edgefit_tls = "
              "\"provided\" with your certificate and key to replace it")
    if SELF_SIGNED_CERT not in live["files"] or SELF_SIGNED_KEY not in live["files"]:
        server.shell(name=f"Self-signed certificate for {name} (made once, kept)",
                     commands=[self_signed_command(name)])


@deploy("HTTPS certificate from the ACME CA")
def request_acme_certificate(plan: Plan, settings: DeploySettings, live: dict) -> None:
    """After the stack is up (nginx serves the CA's tokens): certbot, unless the pair in place was
    issued for this domain already."""
    acme = settings.acme
    if plan.tls != "acme" or acme is None:
        return
    if (live["files"].get(ACME_ISSUED) or {}).get("sha256") == issued_for(acme.domain):
        return
    server.shell(name=f"Certificate for {acme.domain} from {acme.directory} (certbot, HTTP-01 through nginx)",
                 commands=[certbot_command(acme)])
