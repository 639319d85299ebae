"""Role "facts": read the host, validate its inventory data, and plan the stack for it.

Runs first and changes nothing. Every check that can refuse a host is made here, so a bad
input stops the deploy before any operation runs on any host.
"""

from pyinfra import host
from pyinfra.api import DeployError, deploy

from edgefit.facts import BlockDevice, DockerInstalled, HostSizeFacts
from edgefit.plan import HostSize, Plan, PlanError, make_plan
from edgefit.settings import DeploySettings, SettingsError, read_settings

SUPPORTED_OS = {"debian", "ubuntu"}


def refuse(problem: str) -> DeployError:
    return DeployError(f"{host.name}: {problem}. Nothing was changed on any host.")


@deploy("Plan the stack from host facts")
def plan_host() -> tuple[Plan, DeploySettings, dict]:
    try:
        settings = read_settings(host.data)
    except SettingsError as error:
        raise refuse(f"{error}; fix it in the inventory or group_data") from None

    facts = host.get_fact(HostSizeFacts)
    if facts["os_id"] not in SUPPORTED_OS:
        raise refuse(f"{facts['os_id'] or 'this system'} is not Debian or Ubuntu, which edgefit supports")
    if not facts["cgroup2"]:
        raise refuse("the kernel has no cgroup v2; memory limits cannot be enforced or verified")
    if settings.docker_source == "preinstalled" and not host.get_fact(DockerInstalled):
        raise refuse("edgefit_docker_source is 'preinstalled' but dockerd is not installed; "
                     "install docker.io or choose edgefit_docker_source 'debian' or 'docker'")

    disk_gib = facts["root_size_gib"]
    if settings.data_disk:
        device = host.get_fact(BlockDevice, path=settings.data_disk)
        if not device["exists"]:
            raise refuse(f"data disk {settings.data_disk} does not exist; attach it, or set "
                         "edgefit_data_disk to the right device (lsblk lists them) or to None")
        if not device["empty"] and device["fstype"] is None:
            raise refuse(f"data disk {settings.data_disk} holds {device['signature']}, not a filesystem, and "
                         "edgefit formats only a disk on which `blkid -p` finds nothing; wipe it yourself "
                         "if its data is not needed, or name another disk")
        if device["empty"] and not settings.data_disk_format:
            raise refuse(f"data disk {settings.data_disk} holds no filesystem; set "
                         "edgefit_data_disk_format = True to format it with ext4")
        mountpoint = device["mountpoint"]
        if mountpoint and mountpoint.rstrip("/") != settings.options.data_root.rstrip("/"):
            raise refuse(f"data disk {settings.data_disk} is mounted at {mountpoint}, not at "
                         f"{settings.options.data_root}; unmount it or set edgefit_data_root")
        disk_gib = device["size_gib"]

    cpus, memory = facts["cpus"], facts["memory_mib"]
    if settings.size_override:
        cpus, memory = settings.size_override
        host.noop(f"size override from inventory: planning for {cpus} cores, {memory} MiB "
                  f"(host reports {facts['cpus']} cores, {facts['memory_mib']} MiB)")
    try:
        plan = make_plan(HostSize(cpus, memory, disk_gib), settings.options)
    except PlanError as error:
        raise refuse(str(error).rstrip(".")) from None
    host.noop(f"plan {plan.preset}-class: {cpus} cores, {memory} MiB, {len(plan.services)} services, "
              f"{plan.total_mem_limit_mib} MiB of limits + {plan.reserve_mib} MiB reserve")
    return plan, settings, facts
