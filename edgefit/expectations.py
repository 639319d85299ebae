"""What a plan says about a running stack, in the units verify's samples come in.

expectations() is written into the plan of record by the deploy (edgefit/render.py); verify, on
the control machine and on the host, judges by it. Standard library only: the verify timer runs
it on the host.
"""

from __future__ import annotations

import hashlib

MIB = 1024 * 1024


def postgres_expected(postgres) -> dict:
    """Plan values in the canonical units of canonical_pg(): bytes, milliseconds, plain values."""
    return {
        "max_connections": postgres.max_connections,
        "superuser_reserved_connections": postgres.superuser_reserved_connections,
        "shared_buffers": postgres.shared_buffers_mib * MIB,
        "effective_cache_size": postgres.effective_cache_size_mib * MIB,
        "maintenance_work_mem": postgres.maintenance_work_mem_mib * MIB,
        "work_mem": postgres.work_mem_mib * MIB,
        "wal_buffers": postgres.wal_buffers_kib * 1024,
        "min_wal_size": postgres.min_wal_size_mib * MIB,
        "max_wal_size": postgres.max_wal_size_mib * MIB,
        "max_worker_processes": postgres.max_worker_processes,
        "max_parallel_workers": postgres.max_parallel_workers,
        "max_parallel_workers_per_gather": postgres.max_parallel_workers_per_gather,
        "max_parallel_maintenance_workers": postgres.max_parallel_maintenance_workers,
        "huge_pages": postgres.huge_pages,
        "idle_in_transaction_session_timeout": postgres.idle_in_transaction_session_timeout_s * 1000,
    }


def expectations(plan, rendered, *, root: str = "") -> dict:
    """plan: edgefit.plan.Plan; rendered: render_stack()'s files (each with .dest and .content).
    root prefixes every destination (a test tree). The deploy writes this into the plan of
    record; verify and the timer judge by it."""
    files = {root + f.dest: hashlib.sha256(f.content.encode()).hexdigest() for f in rendered}
    reported = getattr(plan, "reported_host", None) or plan.host
    python_services = [name for name in ("api", "worker", "worker_beat") if name in plan.services]
    return {
        "schema": 1,
        "host": {"cpus": plan.host.cpus, "memory_mib": plan.host.memory_mib, "disk_gib": plan.host.disk_gib},
        # what the host itself reported at deploy time (the plan may be for an override size)
        "reported_host": {"cpus": reported.cpus, "memory_mib": reported.memory_mib, "disk_gib": reported.disk_gib},
        "preset": plan.preset,
        "reserve_mib": plan.reserve_mib,
        "total_mem_limit_mib": plan.total_mem_limit_mib,
        "services": {name: {"mem_limit_mib": service.mem_limit_mib, "cpus": service.cpus}
                     for name, service in plan.services.items()},
        "redis": {
            "redis": {"maxmemory_bytes": plan.redis.maxmemory_mib * MIB, "policy": plan.redis.maxmemory_policy},
            "redis_broker": {"maxmemory_bytes": plan.redis_broker.maxmemory_mib * MIB,
                             "policy": plan.redis_broker.maxmemory_policy},
        },
        "postgres": postgres_expected(plan.postgres),
        "gc_threshold": list(plan.dify.gc_threshold),
        "gc_services": python_services,
        "files": files,
        # nginx's certificate: "self-signed" is a warning in verify (browsers warn too)
        "tls": getattr(plan, "tls", None),
    }
