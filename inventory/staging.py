"""Example inventory of staging hosts (`edgefit rebuild` is meant for these).

A private registry mirror stands in for Docker Hub, as on an air-gapped network.
"""

MIRROR = "registry.staging.lan:5000"

staging = [
    ("staging-1.lan", {
        "ssh_user": "deploy",
        "_sudo": True,
        "edgefit_docker_source": "debian",  # docker.io from the host's apt mirror
        "edgefit_images": {
            "db": f"{MIRROR}/pgvector/pgvector:0.8.0-pg15",
            "redis": f"{MIRROR}/library/redis:7.2.7-alpine",
            "redis_broker": f"{MIRROR}/library/redis:7.2.7-alpine",
        },
    }),
]
