"""Role "check_and_plan": check the host's data and facts, and plan the stack for it.

Runs first and changes nothing. Every setting is checked (edgefit/settings.py) and every
refusal made (edgefit/host_plan.py) here, so bad input stops the deploy before any operation
runs on any host, the secrets role included.
"""

from pyinfra import host
from pyinfra.api import DeployError, deploy

from edgefit.facts import HostSizeFacts
from edgefit.host_plan import HostRefused, check_and_plan
from edgefit.plan import Plan
from edgefit.settings import DeploySettings, SettingsError, read_settings


def refuse(problem: str) -> DeployError:
    return DeployError(f"{host.name}: {problem}. Nothing was changed on any host.")


@deploy("Check the host and plan the stack")
def check_host_and_plan() -> tuple[Plan, DeploySettings, dict]:
    try:
        settings = read_settings(host.data)
    except SettingsError as error:
        raise refuse(f"{error}; fix it in the inventory or group_data") from None

    facts = host.get_fact(HostSizeFacts, data_disk=settings.options.data_disk)  # the data disk too
    device = facts["data_device"]
    docker_installed = facts["docker_installed"] if settings.docker_source == "preinstalled" else True
    try:
        plan = check_and_plan(settings, facts, device, docker_installed)
    except HostRefused as error:
        raise refuse(str(error)) from None
    if settings.size_override:
        host.noop(f"size override from inventory: planning for {plan.host.cpus} cores, {plan.host.memory_mib} MiB "
                  f"(host reports {facts['cpus']} cores, {facts['memory_mib']} MiB)")
    host.noop(f"plan {plan.preset}-class: {plan.host.cpus} cores, {plan.host.memory_mib} MiB, "
              f"{len(plan.services)} services, {plan.total_mem_limit_mib} MiB of limits + {plan.reserve_mib} MiB reserve")
    return plan, settings, facts  # read once: the later roles use these (data_device, docker_installed)
