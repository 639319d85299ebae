"""A host's live facts + its checked settings -> its Plan, or the sentence that refuses it.

The one place facts become a plan (pure: the facts come in as the dicts of edgefit/facts.py).
The deploy's first role calls it before anything runs; the plan it returns is written to the
host as the plan of record, which verify, the timer and the tests read instead of planning again.
"""

from __future__ import annotations

import dataclasses

from edgefit.plan import HostSize, Plan, PlanError, make_plan
from edgefit.settings import DeploySettings

SUPPORTED_OS = {"debian", "ubuntu"}


class HostRefused(ValueError):
    """The host cannot be deployed as its data stands; the message says what to change."""


def check_and_plan(settings: DeploySettings, facts: dict, device: dict | None, docker_installed: bool) -> Plan:
    """facts: HostSizeFacts; device: BlockDevice of edgefit_data_disk (None without one)."""
    if facts["os_id"] not in SUPPORTED_OS:
        raise HostRefused(f"{facts['os_id'] or 'this system'} is not Debian or Ubuntu, which edgefit supports")
    if not facts["cgroup2"]:
        raise HostRefused("the kernel has no cgroup v2; memory limits cannot be enforced or verified")
    if settings.docker_source == "preinstalled" and not docker_installed:
        raise HostRefused("edgefit_docker_source is 'preinstalled' but dockerd is not installed; "
                          "install docker.io or choose edgefit_docker_source 'debian' or 'docker'")
    data_disk = settings.options.data_disk
    disk_gib = facts["root_size_gib"]
    if data_disk:
        if not device or not device["exists"]:
            raise HostRefused(f"data disk {data_disk} does not exist; attach it, or set edgefit_data_disk "
                              "to the right device (lsblk lists them) or to None")
        if not device["empty"] and device["fstype"] is None:
            raise HostRefused(f"data disk {data_disk} holds {device['signature']}, not a filesystem, and edgefit "
                              "formats only a disk on which `blkid -p` finds nothing; wipe it yourself if its data "
                              "is not needed, or name another disk")
        if device["empty"] and not settings.data_disk_format:
            raise HostRefused(f"data disk {data_disk} holds no filesystem; set edgefit_data_disk_format = True "
                              "to format it with ext4")
        mountpoint = device["mountpoint"]
        if mountpoint and mountpoint.rstrip("/") != settings.options.data_root.rstrip("/"):
            raise HostRefused(f"data disk {data_disk} is mounted at {mountpoint}, not at "
                              f"{settings.options.data_root}; unmount it or set edgefit_data_root")
        disk_gib = device["size_gib"]

    reported = HostSize(facts["cpus"], facts["memory_mib"], disk_gib, facts["root_size_gib"])
    size = reported
    if settings.size_override:
        cpus, memory = settings.size_override
        size = dataclasses.replace(reported, cpus=cpus, memory_mib=memory)
    try:
        plan = make_plan(size, settings.options)
    except PlanError as error:
        raise HostRefused(str(error).rstrip(".")) from None
    return dataclasses.replace(plan, reported_host=reported)
