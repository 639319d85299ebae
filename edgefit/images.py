"""Pinned images of the stack, and the checks every image reference passes.

The defaults are the real upstream images. A user with a private registry or mirror (and the
test VMs, which can pull nothing) overrides them per service in host data (`images = {...}`).
"""

import re
from dataclasses import dataclass

# Dify 1.3.0 with plugin daemon 0.0.8 fixed the image-streaming blow-up (4 MB sent, 277 MB
# returned, api at 100 % CPU: langgenius/dify#17799); older pins reproduce it.
MIN_DIFY_VERSION = (1, 3, 0)
MIN_PLUGIN_DAEMON_VERSION = (0, 0, 8)

DIFY_VERSION = "1.13.3"
PLUGIN_DAEMON_VERSION = "0.5.3-local"

DEFAULT_IMAGES = {
    "api": f"langgenius/dify-api:{DIFY_VERSION}",
    "worker": f"langgenius/dify-api:{DIFY_VERSION}",
    "worker_beat": f"langgenius/dify-api:{DIFY_VERSION}",
    "web": f"langgenius/dify-web:{DIFY_VERSION}",
    "sandbox": "langgenius/dify-sandbox:0.2.14",
    "plugin_daemon": f"langgenius/dify-plugin-daemon:{PLUGIN_DAEMON_VERSION}",
    # Debian-based (uid 999) so that one Postgres holds both Dify's tables and pgvector.
    "db": "pgvector/pgvector:0.8.0-pg15",
    "pgbouncer": "edoburu/pgbouncer:v1.24.1-p1",
    # 7.2 is the last BSD-licensed line; upstream Dify still ships redis:6-alpine.
    "redis": "redis:7.2.7-alpine",
    "redis_broker": "redis:7.2.7-alpine",
    "ssrf_proxy": "ubuntu/squid:6.6-24.04_beta",
    "nginx": "nginx:1.27.5-alpine",
    "weaviate": "semitechnologies/weaviate:1.27.0",
    "qdrant": "langgenius/qdrant:v1.8.3",
}

# Tags that move: a deploy from them is not reproducible and may jump past a fix or a break.
FLOATING_TAGS = {"latest", "main", "master", "nightly", "edge", "dev", "stable"}

_REF = re.compile(r"(?P<name>[a-z0-9][a-z0-9._/:-]*?)(?::(?P<tag>[\w][\w.-]{0,127}))?(?:@(?P<digest>sha256:[0-9a-f]{64}))?")


class ImageError(ValueError):
    """An image reference that must not be deployed."""


@dataclass(frozen=True)
class ImageRef:
    name: str
    tag: str | None  # None only when a digest pins the image
    digest: str | None = None  # "sha256:<64 hex>", kept as given: it is the pin

    def __str__(self) -> str:
        tag = f":{self.tag}" if self.tag else ""
        digest = f"@{self.digest}" if self.digest else ""
        return f"{self.name}{tag}{digest}"


def _version_tuple(tag: str) -> tuple[int, ...] | None:
    match = re.match(r"^v?(\d+)\.(\d+)\.(\d+)", tag)
    return tuple(int(part) for part in match.groups()) if match else None


def check_image(service: str, ref: str) -> ImageRef:
    """Refuse floating tags and Dify releases older than the image-streaming fix. A digest
    (name[:tag]@sha256:...) is kept; with one, the tag may be left out, except for the Dify
    images, whose version is read from their tag."""
    match = _REF.fullmatch(ref.strip())
    if not match:
        raise ImageError(f"{service}: {ref!r} is not an image reference (expected name:tag or name@sha256:DIGEST)")
    name, tag, digest = match.group("name"), match.group("tag"), match.group("digest")
    if not tag and not digest:
        raise ImageError(f"{service}: image {ref!r} has no tag; pin a release, e.g. {DEFAULT_IMAGES.get(service, 'name:1.2.3')}")
    if tag and tag.lower() in FLOATING_TAGS:
        raise ImageError(
            f"{service}: image {ref!r} uses the floating tag {tag!r}; pin a release "
            f"(e.g. {DEFAULT_IMAGES.get(service, 'name:1.2.3')}) so every deploy runs the same code"
        )
    basename = name.rsplit("/", 1)[-1]
    minimum = {
        "dify-api": MIN_DIFY_VERSION,
        "dify-web": MIN_DIFY_VERSION,
        "dify-plugin-daemon": MIN_PLUGIN_DAEMON_VERSION,
    }.get(basename)
    if minimum:
        wanted = ".".join(map(str, minimum))
        if not tag:
            raise ImageError(f"{service}: image {ref!r} has a digest but no tag; keep its release tag too "
                             f"(name:TAG@sha256:...), from which the version >= {wanted} is read")
        version = _version_tuple(tag)
        if version is None:
            raise ImageError(f"{service}: cannot read a version from tag {tag!r} of {name}; pin a release >= {wanted}")
        if version < minimum:
            raise ImageError(
                f"{service}: {ref} is older than {wanted}, which fixed the image-streaming memory "
                f"blow-up (langgenius/dify#17799); pin {wanted} or newer"
            )
    return ImageRef(name, tag, digest)


def resolve_images(services: list[str], overrides: dict[str, str] | None = None,
                   dify_version: str | None = None) -> dict[str, str]:
    """The image of each service: host-data overrides over the pinned defaults, all checked."""
    overrides = dict(overrides or {})
    unknown = sorted(set(overrides) - set(DEFAULT_IMAGES))
    if unknown:
        raise ImageError(f"unknown service(s) in images: {', '.join(unknown)}; known: {', '.join(sorted(DEFAULT_IMAGES))}")
    chosen = {}
    for service in services:
        ref = DEFAULT_IMAGES[service]
        if dify_version and ref.split(":")[0].endswith(("/dify-api", "/dify-web")):
            ref = f"{ref.split(':')[0]}:{dify_version}"
        ref = overrides.get(service, ref)
        chosen[service] = str(check_image(service, ref))
    return chosen


# The uid each image's main process runs as: bind-mounted data directories and 0600 config
# files must belong to it. The test images under tests/images/ keep the same uids.
RUN_AS_UID = {
    "db": 999,  # postgres in Debian-based postgres/pgvector images
    "pgbouncer": 70,  # postgres user of Alpine's postgresql packages (edoburu/pgbouncer)
    "redis": 999,
    "redis_broker": 999,
    "api": 1001,  # Dify's api image runs as uid 1001 (upstream's init_permissions chowns storage)
    "plugin_daemon": 0,
    "sandbox": 0,
    "weaviate": 0,
    "qdrant": 0,
}
