"""The plan's rules (issue 2), checked across many host sizes with hypothesis.

Every rule is stated from the outside (the notes' "Sizing references", the issue's list), not by
re-running plan.py's own arithmetic: a test here fails when the plan breaks a rule, whatever the
code underneath looks like.
"""

from __future__ import annotations

import dataclasses
import math
import re

import pytest
from hypothesis import HealthCheck, assume, example, given, settings
from hypothesis import strategies as st

from edgefit import images as img
from edgefit.plan import (
    CORE_SERVICES,
    MIN_DISK_GIB,
    OPTIONAL_SERVICES,
    PRESETS,
    SERVICE_RULES,
    VECTOR_STORES,
    HostSize,
    HostTooSmall,
    Options,
    Plan,
    PlanError,
    AUTO_LEAVE_OUT,
    make_plan,
    minimum_host_mib,
    minimum_memory_mib,
    plan_services,
)
from edgefit.secrets import UPSTREAM_DEFAULTS, Secrets, SecretsError, load_or_create
from edgefit.units import SizeError, parse_gib, parse_mib

MAX_CORES = 64
MAX_MIB = 256 * 1024
MIB_PER_GIB = 1024

RULES = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
PAIRS = settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])

# ---------------------------------------------------------------------------------------------
# Strategies


@st.composite
def stack_options(draw) -> Options:
    """Every valid service set: any vector store, any optional services left out (the sandbox
    only together with its ssrf_proxy, which it needs)."""
    vector = draw(st.sampled_from(VECTOR_STORES))
    without = set(draw(st.sets(st.sampled_from(["worker_beat", "web", "plugin_daemon"]))))
    sandbox = draw(st.sampled_from(["both", "neither", "proxy only"]))
    if sandbox == "neither":
        without |= {"sandbox", "ssrf_proxy"}
    elif sandbox == "proxy only":
        without |= {"sandbox"}
    return Options(vector_store=vector, without=frozenset(without))


def memory_from(minimum: int):
    """Memory from the minimum up to 256 GiB, denser near the small hosts this tool is for."""
    return st.one_of(
        st.integers(minimum, minimum + 8 * MIB_PER_GIB),
        st.integers(minimum, MAX_MIB),
    )


cores_st = st.integers(1, MAX_CORES)
disk_st = st.none() | st.integers(MIN_DISK_GIB, 4096)


@st.composite
def sized_hosts(draw, options: Options | None = None) -> tuple[HostSize, Options]:
    options = options or draw(stack_options())
    minimum = minimum_host_mib(plan_services(options))
    host = HostSize(draw(cores_st), draw(memory_from(minimum)), draw(disk_st))
    return host, options


def all_services(plan: Plan) -> list[str]:
    return list(plan.services)


# ---------------------------------------------------------------------------------------------
# Memory: the budget ledger


@RULES
@given(sized_hosts())
@example((HostSize(2, 4096), Options()))
@example((HostSize(1, minimum_host_mib(list(CORE_SERVICES))), Options()))
@example((HostSize(64, MAX_MIB, 4096), Options(vector_store="weaviate")))
def test_hard_limits_plus_reserve_fit_the_host(case):
    host, options = case
    plan = make_plan(host, options)
    assert plan.total_mem_limit_mib == sum(s.mem_limit_mib for s in plan.services.values())
    assert plan.total_mem_limit_mib + plan.reserve_mib <= host.memory_mib, (
        f"{host}: limits {plan.total_mem_limit_mib} + reserve {plan.reserve_mib} MiB "
        f"exceed {host.memory_mib} MiB")
    assert plan.reserve_mib >= 256, "the kernel, Docker and sshd need memory of their own"
    # every service asked for runs, or the plan names it as a trade-off it took
    requested = plan_services(options)
    left_out = set(requested) - set(plan.services)
    assert set(plan.services) <= set(requested)
    assert left_out <= {name for name, _ in AUTO_LEAVE_OUT}
    assert len(plan.tradeoffs) == len(left_out)
    for name in left_out:
        assert any(note.startswith(f"{name} left out") for note in plan.tradeoffs)
    if not left_out:
        assert minimum_memory_mib(requested) <= host.memory_mib
    for name, service in plan.services.items():
        rule = SERVICE_RULES[name]
        assert service.mem_limit_mib >= rule.floor_mib, f"{name} below its floor on {host}"
        if rule.cap_mib is not None:
            assert service.mem_limit_mib <= rule.cap_mib, f"{name} above its cap on {host}"


@RULES
@given(sized_hosts())
def test_the_budget_is_shared_out_not_left_idle(case):
    """Most of the memory goes to the services: a plan that leaves gigabytes unassigned on a big
    host (or a reserve that eats a quarter of a small one) wastes the host."""
    host, options = case
    plan = make_plan(host, options)
    unassigned = host.memory_mib - plan.reserve_mib - plan.total_mem_limit_mib
    assert 0 <= unassigned <= len(plan.services), "rounding may lose at most 1 MiB per service"
    assert plan.reserve_mib <= 0.1 * host.memory_mib + 320


# Things a service or a pool gets: none of them may shrink when the host grows.
def resources(plan: Plan) -> dict[str, float]:
    values = {f"{name}.mem_limit_mib": s.mem_limit_mib for name, s in plan.services.items()}
    values |= {f"{name}.cpus": s.cpus for name, s in plan.services.items()}
    values |= {
        "server_worker_amount": plan.dify.server_worker_amount,
        "celery_worker_amount": plan.dify.celery_worker_amount,
        "graph_engine_max_workers": plan.dify.graph_engine_max_workers,
        "web_pm2_instances": plan.dify.web_pm2_instances,
        "redis.maxmemory_mib": plan.redis.maxmemory_mib,
        "redis_broker.maxmemory_mib": plan.redis_broker.maxmemory_mib,
        "postgres.shared_buffers_mib": plan.postgres.shared_buffers_mib,
        "postgres.effective_cache_size_mib": plan.postgres.effective_cache_size_mib,
        "postgres.maintenance_work_mem_mib": plan.postgres.maintenance_work_mem_mib,
        "postgres.max_connections": plan.postgres.max_connections,
        "pgbouncer.default_pool_size": plan.pgbouncer.default_pool_size,
        "pgbouncer.reserve_pool_size": plan.pgbouncer.reserve_pool_size,
        "pgbouncer.max_client_conn": plan.pgbouncer.max_client_conn,
        "pgbouncer.nofile_limit": plan.pgbouncer.nofile_limit,
        "plugin_db_max_open_conns": plan.dify.plugin_db_max_open_conns,
    }
    for role, pool in plan.dify.pools.items():
        values[f"pools.{role}.client_connections"] = pool.client_connections
    return values


def assert_no_less(small: Plan, big: Plan, keys=None) -> None:
    before, after = resources(small), resources(big)
    for key in keys or before:
        assert after[key] >= before[key], (
            f"{key}: {before[key]} on {small.host} but only {after[key]} on the bigger {big.host}")


@PAIRS
@given(st.data())
def test_more_memory_never_gives_a_service_less(data):
    options = data.draw(stack_options())
    minimum = minimum_host_mib(plan_services(options))
    cores = data.draw(cores_st)
    m1 = data.draw(memory_from(minimum), label="m1")
    m2 = data.draw(st.one_of(st.integers(m1, min(MAX_MIB, m1 + 64)), st.integers(m1, MAX_MIB)), label="m2")
    small = make_plan(HostSize(cores, m1), options)
    big = make_plan(HostSize(cores, m2), options)
    # A bigger host never leaves out more. Where it runs a service the smaller one left out,
    # that service's floor comes out of the others' shares: the trade-off the plan names.
    assert set(small.services) <= set(big.services)
    if set(small.services) != set(big.services):
        return
    assert_no_less(small, big)
    # work_mem follows the database's memory at fixed connections
    assert big.postgres.work_mem_mib >= small.postgres.work_mem_mib


@PAIRS
@given(st.data())
def test_more_cores_never_give_a_service_less(data):
    options = data.draw(stack_options())
    memory = data.draw(memory_from(minimum_host_mib(plan_services(options))))
    c1 = data.draw(cores_st, label="c1")
    c2 = data.draw(st.integers(c1, MAX_CORES), label="c2")
    small = make_plan(HostSize(c1, memory), options)
    big = make_plan(HostSize(c2, memory), options)
    assert_no_less(small, big)


@PAIRS
@given(st.data())
def test_a_bigger_disk_never_shrinks_the_wal(data):
    host, options = data.draw(sized_hosts())
    d1 = data.draw(st.integers(MIN_DISK_GIB, 4096))
    d2 = data.draw(st.integers(d1, 8192))
    small = make_plan(dataclasses.replace(host, disk_gib=d1), options)
    big = make_plan(dataclasses.replace(host, disk_gib=d2), options)
    assert big.postgres.max_wal_size_mib >= small.postgres.max_wal_size_mib
    # the disk changes WAL sizes only, never memory
    assert {n: s.mem_limit_mib for n, s in small.services.items()} == \
           {n: s.mem_limit_mib for n, s in big.services.items()}


@RULES
@given(sized_hosts())
def test_cpu_ceilings_are_positive_and_within_the_host(case):
    host, options = case
    plan = make_plan(host, options)
    for name, service in plan.services.items():
        assert 0 < service.cpus <= host.cpus, f"{name}: {service.cpus} CPUs on a {host.cpus}-core host"
    if host.cpus > 1:  # api and worker leave room for the rest even when they spin
        assert plan.services["api"].cpus < host.cpus
        assert plan.services["worker"].cpus < host.cpus


# ---------------------------------------------------------------------------------------------
# Postgres: PGTune's web profile fed with the database's own budget


@RULES
@given(sized_hosts())
@example((HostSize(4, 8192), Options()))
@example((HostSize(3, 8192), Options()))
@example((HostSize(64, MAX_MIB), Options()))
def test_postgres_follows_pgtune_with_the_db_budget(case):
    host, options = case
    plan = make_plan(host, options)
    pg = plan.postgres
    m = plan.services["db"].mem_limit_mib  # not host.memory_mib

    # within one MiB of the real-number formula, never above it
    assert m / 4 - 1 < pg.shared_buffers_mib <= m / 4
    assert 3 * m / 4 - 1 < pg.effective_cache_size_mib <= 3 * m / 4
    assert min(8192, m / 16) - 1 < pg.maintenance_work_mem_mib <= min(8192, m / 16)
    # wal_buffers: 3 % of shared_buffers, at most 16 MB
    assert pg.wal_buffers_kib <= 16 * 1024
    assert pg.wal_buffers_kib <= max(64, 0.03 * pg.shared_buffers_mib * 1024)
    assert pg.min_wal_size_mib <= pg.max_wal_size_mib <= 4096

    # work_mem = (M - shared_buffers) / ((max_connections + max_worker_processes) * 3), floor 4 MB
    per_op = (m - pg.shared_buffers_mib) / ((pg.max_connections + pg.max_worker_processes) * 3)
    assert pg.work_mem_mib >= 4
    assert pg.work_mem_mib == max(4, math.floor(per_op)), (pg.work_mem_mib, per_op)

    # parallel settings only with >= 4 cores
    if host.cpus >= 4:
        assert pg.max_worker_processes == host.cpus
        assert pg.max_parallel_workers == host.cpus
        assert pg.max_parallel_workers_per_gather == min(4, math.ceil(host.cpus / 2))
        assert 1 <= pg.max_parallel_maintenance_workers <= min(4, math.ceil(host.cpus / 2))
    else:
        assert pg.max_parallel_workers == 0
        assert pg.max_parallel_workers_per_gather == 0
        assert pg.max_parallel_maintenance_workers == 0

    # huge pages only pay off (and only get reserved) with big shared_buffers
    assert pg.huge_pages == ("try" if pg.shared_buffers_mib >= 2048 else "off")

    # The database's fixed memory must leave room for backends inside its own container.
    assert pg.shared_buffers_mib + pg.maintenance_work_mem_mib + pg.wal_buffers_kib / 1024 < m


@pytest.mark.parametrize("preset", PRESETS)
def test_postgres_is_sized_from_the_container_not_the_host(preset):
    cores, memory = PRESETS[preset]
    plan = make_plan(HostSize(cores, memory))
    db = plan.services["db"].mem_limit_mib
    assert db < memory / 2
    # PGTune fed with host RAM would give shared_buffers = memory / 4: far above the container
    assert plan.postgres.shared_buffers_mib <= db // 4 < memory // 4
    assert plan.postgres.effective_cache_size_mib < db


@RULES
@given(sized_hosts())
def test_max_connections_cover_pgbouncer_and_direct_clients(case):
    host, options = case
    plan = make_plan(host, options)
    pg, bouncer, dify = plan.postgres, plan.pgbouncer, plan.dify
    server_pools = bouncer.default_pool_size + bouncer.reserve_pool_size
    direct = dify.plugin_db_max_open_conns
    # ordinary (non-superuser) slots hold PgBouncer's server pools and the plugin daemon's pool
    assert pg.max_connections - pg.superuser_reserved_connections >= server_pools + direct, (
        f"{host}: max_connections {pg.max_connections} < pools {server_pools} + plugin daemon "
        f"{direct} + superuser reserve {pg.superuser_reserved_connections}")
    assert pg.superuser_reserved_connections >= 1
    # PgBouncer itself never opens more than that
    assert bouncer.max_db_connections <= server_pools
    assert bouncer.max_db_connections + direct + pg.superuser_reserved_connections <= pg.max_connections
    # "nothing more": idle backends cost memory; upstream's 100 is not the answer for small hosts
    assert pg.max_connections <= server_pools + direct + pg.superuser_reserved_connections + 10
    # the plugin daemon's pool exists exactly when the daemon does
    assert (direct > 0) == ("plugin_daemon" in plan.services)
    assert 0 <= dify.plugin_db_max_idle_conns <= direct


# ---------------------------------------------------------------------------------------------
# PgBouncer


def client_demand(plan: Plan) -> int:
    """Connections the Dify processes may hold open to PgBouncer at once: each process's
    SQLAlchemy pool (pool_size + max_overflow), plus pgvector's own pool in every api and
    worker process."""
    sqlalchemy = sum(p.processes * (p.pool_size + p.max_overflow) for p in plan.dify.pools.values())
    vector_processes = plan.dify.pools["api"].processes + plan.dify.pools["worker"].processes
    return sqlalchemy + vector_processes * plan.dify.pgvector_max_connection


@RULES
@given(sized_hosts())
@example((HostSize(64, MAX_MIB), Options()))
def test_pgbouncer_holds_every_client_pool(case):
    host, options = case
    plan = make_plan(host, options)
    bouncer, dify = plan.pgbouncer, plan.dify
    assert bouncer.pool_mode == "transaction"
    assert client_demand(plan) <= bouncer.max_client_conn, (
        f"{host}: pools may open {client_demand(plan)} client connections, "
        f"PgBouncer accepts {bouncer.max_client_conn}")
    # the processes counted are the processes that run
    assert dify.pools["api"].processes == dify.server_worker_amount
    assert dify.pools["worker"].processes == 1  # gevent: one Celery process
    assert dify.pools["worker_beat"].processes == (1 if "worker_beat" in plan.services else 0)
    # each process's pool covers its own concurrency
    api_pool = dify.pools["api"]
    assert api_pool.pool_size + api_pool.max_overflow >= dify.server_worker_connections
    worker_pool = dify.pools["worker"]
    assert worker_pool.pool_size + worker_pool.max_overflow >= dify.celery_worker_amount
    # PgBouncer needs a descriptor per client and per server connection, plus its own
    server = bouncer.default_pool_size + bouncer.reserve_pool_size
    assert bouncer.nofile_limit > bouncer.max_client_conn + server
    assert bouncer.nofile_limit >= 1024


@pytest.mark.parametrize("vector", VECTOR_STORES)
def test_pgvector_pools_only_with_pgvector(vector):
    plan = make_plan(HostSize(4, 8192), Options(vector_store=vector))
    assert (plan.dify.pgvector_max_connection > 0) == (vector == "pgvector")


# ---------------------------------------------------------------------------------------------
# Redis


@RULES
@given(sized_hosts())
def test_redis_maxmemory_leaves_headroom_and_the_broker_never_evicts(case):
    host, options = case
    plan = make_plan(host, options)
    for name, redis in (("redis", plan.redis), ("redis_broker", plan.redis_broker)):
        limit = plan.services[name].mem_limit_mib
        # maxmemory 0 would mean "no limit" to Redis
        assert 1 <= redis.maxmemory_mib < limit
        assert redis.maxmemory_mib * 100 <= limit * 60, f"{name}: {redis.maxmemory_mib} of {limit} MiB"
    # the broker's Celery keys have no TTL: an evicting policy loses tasks (measured, notes)
    assert plan.redis_broker.maxmemory_policy == "noeviction"
    assert plan.redis_broker.appendonly, "queued tasks survive a broker restart"
    # the cache evicts, but on its own instance with its own limit
    assert plan.redis.maxmemory_policy != plan.redis_broker.maxmemory_policy
    assert plan.redis.maxmemory_policy in {"allkeys-lru", "allkeys-lfu", "volatile-lru", "volatile-lfu"}
    assert "redis" in plan.services and "redis_broker" in plan.services


# ---------------------------------------------------------------------------------------------
# Worker counts


@RULES
@given(sized_hosts())
@example((HostSize(1, MAX_MIB), Options()))
@example((HostSize(64, minimum_memory_mib(list(CORE_SERVICES))), Options()))
def test_worker_counts_follow_cores_and_budget(case):
    host, options = case
    plan = make_plan(host, options)
    dify = plan.dify
    assert 1 <= dify.server_worker_amount <= host.cpus, "never more gunicorn workers than cores"
    assert dify.celery_worker_amount >= 1
    assert dify.graph_engine_max_workers >= 1
    assert dify.web_pm2_instances >= 1
    if "web" in plan.services:
        assert dify.web_pm2_instances <= host.cpus
    # A Dify api process sits near 450 MiB: extra workers only where the budget holds them.
    if dify.server_worker_amount > 1:
        assert plan.services["api"].mem_limit_mib / dify.server_worker_amount >= 450


@pytest.mark.parametrize("preset", ["8C16G", "16C32G"])
def test_big_presets_run_more_than_one_of_everything(preset):
    plan = make_plan(HostSize(*PRESETS[preset]))
    assert plan.dify.server_worker_amount > 1
    assert plan.dify.celery_worker_amount > 1


# ---------------------------------------------------------------------------------------------
# Vector stores and service sets


def test_small_hosts_default_to_pgvector_inside_postgres():
    assert Options().vector_store == "pgvector"
    plan = make_plan(HostSize(*PRESETS["2C4G"]))
    assert plan.vector_store == "pgvector"
    assert not {"weaviate", "qdrant", "pgvector"} & set(plan.services)
    assert set(plan.services) <= set(CORE_SERVICES)


@pytest.mark.parametrize("vector", ["weaviate", "qdrant"])
@pytest.mark.parametrize("preset", PRESETS)
def test_an_external_vector_store_is_a_service_of_its_own(vector, preset):
    cores, memory = PRESETS[preset]
    plan = make_plan(HostSize(cores, memory + 2048), Options(vector_store=vector))
    assert vector in plan.services
    assert plan.services[vector].mem_limit_mib >= SERVICE_RULES[vector].floor_mib
    assert len(plan.services) == len(CORE_SERVICES) + 1
    assert plan.total_mem_limit_mib + plan.reserve_mib <= memory + 2048
    assert minimum_memory_mib(plan_services(Options(vector_store=vector))) > \
        minimum_memory_mib(plan_services(Options()))


def test_service_choices_are_checked():
    with pytest.raises(PlanError, match="unknown service"):
        make_plan(HostSize(2, 4096), Options(without=frozenset({"foo"})))
    with pytest.raises(PlanError, match="cannot leave out db"):
        make_plan(HostSize(2, 4096), Options(without=frozenset({"db"})))
    with pytest.raises(PlanError, match="ssrf_proxy"):
        make_plan(HostSize(2, 4096), Options(without=frozenset({"ssrf_proxy"})))
    with pytest.raises(PlanError, match="vector store"):
        make_plan(HostSize(2, 4096), Options(vector_store="milvus"))
    with pytest.raises(PlanError):
        make_plan(HostSize(0, 4096))
    with pytest.raises(HostTooSmall, match=str(MIN_DISK_GIB)):
        make_plan(HostSize(2, 4096, MIN_DISK_GIB - 1))
    make_plan(HostSize(2, 4096, MIN_DISK_GIB))


@RULES
@given(sized_hosts())
def test_wal_fits_a_small_disk(case):
    host, options = case
    plan = make_plan(host, options)
    if host.disk_gib is not None:
        assert plan.postgres.max_wal_size_mib * 32 <= host.disk_gib * 1024


# ---------------------------------------------------------------------------------------------
# A host too small: the message, and the exactness of the minimum it names

SERVICE_SETS = [
    Options(),
    Options(without=frozenset(OPTIONAL_SERVICES)),
    Options(without=frozenset({"sandbox", "ssrf_proxy"})),
    Options(without=frozenset({"web", "worker_beat"})),
    Options(vector_store="weaviate"),
    Options(vector_store="qdrant", without=frozenset({"plugin_daemon"})),
]


def named_minimum(message: str) -> int:
    match = re.search(r"needs at least (\d+) MiB", message)
    assert match, f"the message names no minimum: {message}"
    return int(match.group(1))


@pytest.mark.parametrize("options", SERVICE_SETS, ids=lambda o: f"{o.vector_store}-without-{'+'.join(sorted(o.without)) or 'none'}")
@pytest.mark.parametrize("cores", [1, 2, 16])
def test_the_minimum_named_is_exact(options, cores):
    requested = plan_services(options)
    with pytest.raises(HostTooSmall) as error:
        make_plan(HostSize(cores, 1024), options)
    message = str(error.value)
    minimum = named_minimum(message)
    assert minimum == minimum_host_mib(requested)
    make_plan(HostSize(cores, minimum), options)  # that size plans fine ...
    with pytest.raises(HostTooSmall) as below:  # ... and one MiB less does not
        make_plan(HostSize(cores, minimum - 1), options)
    assert named_minimum(str(below.value)) == minimum

    # the services the plan would leave out by itself are named, with the host that runs all
    auto = [name for name, _ in AUTO_LEAVE_OUT if name in requested]
    for name in auto:
        assert name in message
    if auto:
        assert f"{minimum_memory_mib(requested)} MiB with all {len(requested)}" in message
    # the other optional services still in the set are named, and how to leave them out
    droppable = [name for name in OPTIONAL_SERVICES if name in requested and name not in auto]
    for name in droppable:
        assert name in message
    if droppable:
        assert "--without" in message
        lean = re.search(r"lowers that to (\d+) MiB", message)
        assert lean, message
        lean_options = dataclasses.replace(options, without=frozenset(OPTIONAL_SERVICES))
        lean_minimum = int(lean.group(1))
        assert lean_minimum < minimum
        make_plan(HostSize(cores, lean_minimum), lean_options)
        with pytest.raises(HostTooSmall):
            make_plan(HostSize(cores, lean_minimum - 1), lean_options)
    else:
        assert "--without" not in message
    assert "\n" not in message.strip(), "one sentence for the CLI's one line"
    assert message.count(". ") == 0 and message.endswith("."), "one sentence"


@RULES
@given(stack_options(), cores_st)
def test_minimum_is_exact_for_every_service_set(options, cores):
    minimum = minimum_host_mib(plan_services(options))
    make_plan(HostSize(cores, minimum), options)
    with pytest.raises(HostTooSmall):
        make_plan(HostSize(cores, minimum - 1), options)


@RULES
@given(stack_options(), cores_st, st.integers(1, 4096))
def test_below_the_minimum_always_refuses(options, cores, short_by):
    minimum = minimum_host_mib(plan_services(options))
    assume(minimum - short_by >= 1)
    with pytest.raises(HostTooSmall, match=f"at least {minimum} MiB"):
        make_plan(HostSize(cores, minimum - short_by), options)


@RULES
@given(stack_options(), cores_st, st.integers(0, 2048))
def test_a_host_that_holds_every_floor_leaves_nothing_out(options, cores, spare):
    requested = plan_services(options)
    plan = make_plan(HostSize(cores, minimum_memory_mib(requested) + spare), options)
    assert set(plan.services) == set(requested)
    assert plan.tradeoffs == []


# ---------------------------------------------------------------------------------------------
# Presets: checkpoints


@pytest.mark.parametrize("preset", PRESETS)
def test_presets_fit_and_name_what_they_leave_out(preset):
    cores, memory = PRESETS[preset]
    plan = make_plan(HostSize(cores, memory))
    assert plan.preset == preset
    assert plan.total_mem_limit_mib + plan.reserve_mib <= memory
    if minimum_memory_mib(list(CORE_SERVICES)) <= memory:
        assert len(plan.services) == 12 == len(CORE_SERVICES)
    else:
        assert plan.tradeoffs, "a preset that cannot run all 12 services says what it left out"


def test_2c4g_runs_everything_but_beat_and_says_why():
    """The real footprints (notes: dify-memory.md) no longer fit 12 services into 4 GiB: beat,
    a whole Dify interpreter of ~460 MiB for periodic tasks, goes first, and the plan says so."""
    plan = make_plan(HostSize(2, 4096))
    assert set(plan.services) == set(CORE_SERVICES) - {"worker_beat"}
    assert plan.total_mem_limit_mib + plan.reserve_mib <= 4096
    assert len(plan.tradeoffs) == 1
    note = plan.tradeoffs[0]
    assert note.startswith("worker_beat left out") and "periodic tasks" in note
    assert f"{minimum_memory_mib(list(CORE_SERVICES))} MiB" in note
    assert minimum_memory_mib(list(CORE_SERVICES)) > 4096
    assert plan.dify.pools["worker_beat"].processes == 0


@pytest.mark.parametrize("memory", range(3850, 3951, 5))
def test_a_real_4_gib_vps_still_plans(memory):
    """A "4 GiB" VPS reports ~3850-3950 MiB MemTotal (kernel and firmware keep the rest): it
    plans, with the UI, the plugin daemon (models) and the SSRF proxy kept."""
    plan = make_plan(HostSize(2, memory))
    assert {"api", "worker", "web", "plugin_daemon", "ssrf_proxy", "db", "nginx"} <= set(plan.services)
    assert plan.total_mem_limit_mib + plan.reserve_mib <= memory
    assert plan.preset == "2C4G"
    assert len(plan.tradeoffs) == len(set(CORE_SERVICES) - set(plan.services))


def test_presets_grow_in_order():
    plans = [make_plan(HostSize(*PRESETS[name])) for name in ("2C4G", "4C8G", "8C16G", "16C32G")]
    for small, big in zip(plans, plans[1:]):
        assert set(small.services) <= set(big.services)
        if set(small.services) == set(big.services):
            assert_no_less(small, big)
        assert big.services["db"].mem_limit_mib > small.services["db"].mem_limit_mib


# ---------------------------------------------------------------------------------------------
# The real Dify's measured peaks (../shared/notes/dify-memory.md): each limit holds them with margin

MEASURED = {  # MiB, the notes' tables; restated here so a change in plan.py cannot hide
    "api_one_worker_peak_charge": 801,  # cgroup table: 1 gunicorn worker at the 806 limit
    "api_three_workers_peak_pss": 1413,  # figures table: 3 gunicorn workers, 4C8G settings
    "worker_c2_peak_charge": 742,  # cgroup table: gevent -c 2 at the 742 limit
    "worker_floor": 645,  # cgroup table: rss + mapped, unlimited
    "worker_idle_plus_jieba_anon": 320 + 220,  # figures: idle anon; +220 jieba, kept
    "beat_peak_charge_unlimited": 460,  # cgroup table: beat unlimited
    "web_one_node_peak_rss": 291,  # web table: node x1, old=128 + semi=16
    "web_pm2_manager_pss": 45,  # web notes: the pm2 manager
}
MIN_MARGIN = 1.05  # at least 5 % above a measured peak: one run each, on a busy machine


@given(st.integers(0, 4096), cores_st)
@settings(max_examples=100, deadline=None)
@example(0, 2)
@example(4096 - minimum_host_mib(list(CORE_SERVICES)), 2)
def test_small_plans_hold_the_measured_peaks(extra, cores):
    plan = make_plan(HostSize(cores, minimum_host_mib(list(CORE_SERVICES)) + extra))
    limits = {name: s.mem_limit_mib for name, s in plan.services.items()}
    dify = plan.dify
    assert limits["api"] >= MIN_MARGIN * MEASURED["api_one_worker_peak_charge"]
    if dify.server_worker_amount >= 3:
        assert limits["api"] >= MIN_MARGIN * MEASURED["api_three_workers_peak_pss"] * dify.server_worker_amount / 3
    assert limits["worker"] >= MIN_MARGIN * MEASURED["worker_c2_peak_charge"]
    if "worker_beat" in limits:
        assert limits["worker_beat"] >= MEASURED["beat_peak_charge_unlimited"]
    if "web" in limits:
        need = MEASURED["web_pm2_manager_pss"] + MEASURED["web_one_node_peak_rss"] * dify.web_pm2_instances
        assert limits["web"] >= MIN_MARGIN * need
        assert "--max-old-space-size=128" in dify.web_node_options
        assert "--max-semi-space-size=16" in dify.web_node_options


@RULES
@given(sized_hosts())
@example((HostSize(2, 4096), Options()))
def test_the_worker_restarts_itself_before_its_limit(case):
    host, options = case
    plan = make_plan(host, options)
    limit = plan.services["worker"].mem_limit_mib
    threshold = plan.dify.worker_restart_anon_mib
    # above idle + jieba + the high-water of a large document per task at once, which gevent
    # keeps: below it the worker would restart after every indexing task ...
    in_flight = plan.dify.celery_worker_amount * (774 - 439 - 220)  # the 8 MB document's own growth
    assert threshold > MEASURED["worker_idle_plus_jieba_anon"] + in_flight
    # ... and below the limit by one large document per running task (warm shutdown lets them
    # finish) plus the worker's mapped files (~47 MiB at its peak)
    assert threshold + in_flight + 47 < limit
    assert 0 < plan.dify.worker_watchdog_interval_s <= 5
    # documents no larger than the largest one measured
    assert 1 <= plan.dify.upload_file_size_limit_mb <= 8


@RULES
@given(sized_hosts())
def test_gunicorn_never_recycles_a_lone_worker_nor_all_at_once(case):
    host, options = case
    plan = make_plan(host, options)
    args = plan.dify.gunicorn_cmd_args
    if plan.dify.server_worker_amount == 1:
        assert "--max-requests" not in args, "recycling one worker leaves nothing serving for 14-37 s"
    match = re.search(r"--max-requests (\d+)", args)
    if match:  # several workers: jitter at least as wide as the interval itself
        jitter = re.search(r"--max-requests-jitter (\d+)", args)
        assert jitter and int(jitter.group(1)) >= int(match.group(1))


@pytest.mark.parametrize("short_by", [1, 800, 2800])
def test_a_host_too_small_is_refused_in_one_sentence(short_by):
    memory = minimum_host_mib(list(CORE_SERVICES)) - short_by
    with pytest.raises(HostTooSmall) as error:
        make_plan(HostSize(2, memory))
    message = str(error.value)
    assert message.startswith(f"a host with {memory} MiB is too small")
    assert "\n" not in message and message.endswith(".") and ". " not in message


# ---------------------------------------------------------------------------------------------
# Images


def test_default_images_pass():
    services = list(CORE_SERVICES) + ["weaviate", "qdrant"]
    assert img.resolve_images(services) == {name: img.DEFAULT_IMAGES[name] for name in services}
    for name, ref in img.DEFAULT_IMAGES.items():
        img.check_image(name, ref)
        tag = ref.rsplit(":", 1)[1]
        assert tag.lower() not in img.FLOATING_TAGS


@given(st.sampled_from(sorted(img.FLOATING_TAGS)), st.sampled_from(sorted(img.DEFAULT_IMAGES)), st.booleans())
@settings(max_examples=60, deadline=None)
def test_floating_tags_are_refused(tag, service, upper):
    name = img.DEFAULT_IMAGES[service].rsplit(":", 1)[0]
    ref = f"{name}:{tag.upper() if upper else tag}"
    with pytest.raises(img.ImageError, match="floating tag"):
        img.check_image(service, ref)
    with pytest.raises(img.ImageError):
        make_plan(HostSize(4, 8192), Options(images={service: ref},
                                             vector_store=service if service in VECTOR_STORES else "pgvector"))


@pytest.mark.parametrize("ref", ["langgenius/dify-api", "registry.local:5000/langgenius/dify-api", "", "Not An Image"])
def test_untagged_or_malformed_references_are_refused(ref):
    with pytest.raises(img.ImageError):
        img.check_image("api", ref)


DIGEST = "sha256:" + "0123456789abcdef" * 4


@pytest.mark.parametrize("ref,name,tag", [
    (f"registry.lan/pgvector@{DIGEST}", "registry.lan/pgvector", None),
    (f"registry.lan:5000/pgvector/pgvector:0.8.0-pg15@{DIGEST}", "registry.lan:5000/pgvector/pgvector", "0.8.0-pg15"),
])
def test_digest_pins_are_kept(ref, name, tag):
    checked = img.check_image("db", ref)
    assert (checked.name, checked.tag, checked.digest) == (name, tag, DIGEST)
    assert str(checked) == ref
    assert img.resolve_images(["db"], {"db": ref}) == {"db": ref}
    assert make_plan(HostSize(2, 4096), Options(images={"db": ref})).services["db"].image == ref


@pytest.mark.parametrize("ref,needle", [
    (f"langgenius/dify-api@{DIGEST}", "no tag"),  # the version is read from the tag
    (f"langgenius/dify-api:1.2.0@{DIGEST}", "17799"),
    (f"langgenius/dify-api:latest@{DIGEST}", "floating tag"),
    ("langgenius/dify-api:1.13.3@sha256:abc", "not an image reference"),
    (f"langgenius/dify-api:1.13.3@sha256:{'A' * 64}", "not an image reference"),
    (f"langgenius/dify-api:1.13.3@{DIGEST}\nprivileged: true", "not an image reference"),
])
def test_bad_digest_references_are_refused(ref, needle):
    with pytest.raises(img.ImageError, match=needle):
        img.check_image("api", ref)


def test_dify_with_tag_and_digest_passes():
    ref = f"langgenius/dify-api:1.13.3@{DIGEST}"
    assert str(img.check_image("api", ref)) == ref


version_st = st.tuples(st.integers(0, 3), st.integers(0, 20), st.integers(0, 20))


@given(version_st, st.sampled_from(["dify-api", "dify-web"]), st.sampled_from(["", "v"]),
       st.sampled_from(["", "-rc1", "-local"]), st.sampled_from(["langgenius/", "registry.local:5000/mirror/"]))
@settings(max_examples=150, deadline=None)
def test_dify_before_1_3_0_is_refused(version, image, prefix, suffix, registry):
    ref = f"{registry}{image}:{prefix}{'.'.join(map(str, version))}{suffix}"
    if version < (1, 3, 0):
        with pytest.raises(img.ImageError, match="17799"):
            img.check_image("api", ref)
    else:
        assert img.check_image("api", ref).tag == f"{prefix}{'.'.join(map(str, version))}{suffix}"


@given(version_st, st.sampled_from(["", "-local", "-serverless"]))
@settings(max_examples=100, deadline=None)
def test_plugin_daemon_before_0_0_8_is_refused(version, suffix):
    ref = f"langgenius/dify-plugin-daemon:{'.'.join(map(str, version))}{suffix}"
    if version < (0, 0, 8):
        with pytest.raises(img.ImageError):
            img.check_image("plugin_daemon", ref)
    else:
        img.check_image("plugin_daemon", ref)


@pytest.mark.parametrize("service,ref", [
    ("api", "langgenius/dify-api:1.2.0"),
    ("web", "langgenius/dify-web:1.1.3"),
    ("plugin_daemon", "langgenius/dify-plugin-daemon:0.0.7-local"),
    ("api", "langgenius/dify-api:sometag"),
])
def test_old_or_unversioned_dify_is_refused_by_the_plan(service, ref):
    with pytest.raises(img.ImageError):
        make_plan(HostSize(2, 4096), Options(images={service: ref}))


def test_dify_version_option_applies_and_is_checked():
    plan = make_plan(HostSize(2, 4096), Options(dify_version="1.4.0"))
    assert plan.services["api"].image == "langgenius/dify-api:1.4.0"
    assert plan.services["web"].image == "langgenius/dify-web:1.4.0"
    with pytest.raises(img.ImageError):
        make_plan(HostSize(2, 4096), Options(dify_version="1.2.9"))
    with pytest.raises(img.ImageError, match="unknown service"):
        make_plan(HostSize(2, 4096), Options(images={"apii": "langgenius/dify-api:1.13.3"}))


# ---------------------------------------------------------------------------------------------
# Units


@pytest.mark.parametrize("text,mib", [
    ("4G", 4096), ("4GiB", 4096), ("4GB", 4096), ("4g", 4096), ("4096M", 4096), ("4096MiB", 4096),
    ("3.5G", 3584), ("3900M", 3900), (" 8G ", 8192), ("1T", 1024 * 1024), ("2048K", 2),
])
def test_parse_mib_accepts(text, mib):
    assert parse_mib(text) == mib


@pytest.mark.parametrize("text", ["8X", "4", "", "-1G", "0G", "G", "4 G B", "four G", "1K"])
def test_parse_mib_rejects(text):
    with pytest.raises(SizeError):
        parse_mib(text)


@given(st.integers(1, 10**6), st.sampled_from(["M", "MiB", "MB", "m", "mib"]))
@settings(max_examples=100, deadline=None)
def test_parse_mib_megabytes_roundtrip(n, unit):
    assert parse_mib(f"{n}{unit}") == n
    assert parse_mib(f"{n}G") == n * 1024
    assert parse_gib(f"{n}G") == n


# ---------------------------------------------------------------------------------------------
# Secrets

SECRET_FIELDS = [f.name for f in dataclasses.fields(Secrets)]


def test_generated_secrets_are_unique_and_long():
    first, second = Secrets.generate(), Secrets.generate()
    values = [getattr(first, name) for name in SECRET_FIELDS] + [getattr(second, name) for name in SECRET_FIELDS]
    assert len(set(values)) == len(values)
    for name, value in zip(SECRET_FIELDS * 2, values):
        assert len(value) >= (24 if name == "init_password" else 32)  # Dify takes at most 30 there
        assert re.fullmatch(r"[A-Za-z0-9_-]+", value), "no characters that need quoting"
    assert Secrets.from_env(first.to_env()) == first


def test_secrets_repr_never_shows_a_value():
    generated = Secrets.generate()
    for text in (repr(generated), str(generated), f"{generated}", repr([generated])):
        for name in SECRET_FIELDS:
            assert getattr(generated, name) not in text


def fixed_env(**overrides) -> str:
    values = {name: f"test-{name.replace('_', '-')}-0000000000000000" for name in SECRET_FIELDS}
    values["init_password"] = "test-init-password-00000000000"  # Dify takes at most 30 characters
    values.update(overrides)
    return "".join(f"{k.upper()}={v}\n" for k, v in values.items() if v is not None)


@pytest.mark.parametrize("missing", SECRET_FIELDS)
def test_from_env_refuses_missing_keys(missing):
    with pytest.raises(SecretsError, match=missing.upper()):
        Secrets.from_env(fixed_env(**{missing: None}))
    with pytest.raises(SecretsError, match=missing.upper()):
        Secrets.from_env(fixed_env(**{missing: ""}))


@pytest.mark.parametrize("default", sorted(UPSTREAM_DEFAULTS))
@pytest.mark.parametrize("field", ["secret_key", "db_password", "plugin_daemon_key", "sandbox_api_key"])
def test_from_env_refuses_upstream_defaults(default, field):
    with pytest.raises(SecretsError) as error:
        Secrets.from_env(fixed_env(**{field: default}))
    assert field.upper() in str(error.value)
    assert default not in str(error.value), "the error must not print the value"


@pytest.mark.parametrize("weak", ["short", "has a space in it 0000000000", "quote'000000000000000000000000",
                                  "dollar$00000000000000000000000"])
def test_from_env_refuses_weak_values_without_printing_them(weak):
    with pytest.raises(SecretsError) as error:
        Secrets.from_env(fixed_env(secret_key=weak))
    assert weak not in str(error.value)


def test_load_or_create_makes_a_private_file_once(tmp_path):
    path = tmp_path / "sub" / "secrets.env"
    created = load_or_create(path)
    assert path.stat().st_mode & 0o777 == 0o600
    before = path.read_bytes(), path.stat().st_mtime_ns
    again = load_or_create(path)
    assert again == created
    assert (path.read_bytes(), path.stat().st_mtime_ns) == before
