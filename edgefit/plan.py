"""The plan: one host's size in, every budget and setting of the Dify stack out.

Pure functions over dataclasses, no I/O. Deploy, render, verify and the tests all read the
Plan made here, so every number of the stack is decided in this file (or in images.py for image
pins) and nowhere else. Each rule says why next to where it is applied.

The plan is a continuous, monotone function of the host's cores, memory and disk: memory left
after the reserve is shared out by water-filling (each service gets its floor, then the rest
in proportion to its weight until it reaches its cap). The presets below are checkpoints the
tests look at, not a lookup table.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field

from edgefit.images import resolve_images

# ---------------------------------------------------------------------------------------------
# Inputs

PRESETS = {  # name -> (cores, memory MiB): the sizes users run, used as test checkpoints
    "2C4G": (2, 4 * 1024),
    "4C8G": (4, 8 * 1024),
    "8C16G": (8, 16 * 1024),
    "16C32G": (16, 32 * 1024),
}

VECTOR_STORES = ("pgvector", "weaviate", "qdrant")


@dataclass(frozen=True)
class HostSize:
    """What the plan is a function of: read from the live host, or given on the command line."""

    cpus: int
    memory_mib: int
    disk_gib: int | None = None  # the data's disk; None: unknown, disk-derived settings fall back to PGTune's
    root_disk_gib: int | None = None  # the root filesystem (the swap file lives there); None: unknown


@dataclass(frozen=True)
class Options:
    """Choices from inventory/host data (documented in group_data/all.py)."""

    vector_store: str = "pgvector"
    without: frozenset[str] = frozenset()
    data_root: str = "/srv/dify"
    images: dict[str, str] = field(default_factory=dict)
    dify_version: str | None = None
    domain: str | None = None  # nginx answers for this name (None: any)
    data_disk: str | None = None  # device mounted at data_root; Docker waits for its mount
    verify_timer_every: str | None = None  # systemd span of the on-host verify timer; None: no timer


class PlanError(ValueError):
    """Input the plan cannot be made from (exit code 2 at the CLI)."""


class HostTooSmall(PlanError):
    """The host cannot hold the chosen services within their floors."""


# ---------------------------------------------------------------------------------------------
# The services and their memory rules

@dataclass(frozen=True)
class ServiceRule:
    floor_mib: int  # below this the service fails to start or thrashes (observed upstream sizes)
    weight: float  # share of the memory above all floors
    cap_mib: int | None  # beyond this more memory only hides a leak; None: takes what is left
    cpus_share: float  # fraction of the host's cores it may use ...
    cpus_min: float  # ... but never less than this
    cpus_max: float | None = None  # single-threaded servers gain nothing past one core
    optional: bool = False  # may be left out with --without


# Floors: api/worker import the whole Dify code base (~450-550 MiB RSS at rest, more while
# indexing); Postgres needs shared_buffers plus backends; the plugin daemon holds plugin
# runtimes. Caps on api/worker catch the slow leaks users report (#11510: 6 GB over weeks)
# before they starve the host; the database has no cap and absorbs the rest as cache.
SERVICE_RULES: dict[str, ServiceRule] = {
    "api": ServiceRule(704, 4.0, 8192, 1.0, 1.0),
    "worker": ServiceRule(640, 4.0, 8192, 1.0, 1.0),
    "worker_beat": ServiceRule(160, 0.25, 512, 0.0, 0.25, 0.5, optional=True),
    "web": ServiceRule(256, 0.5, 1024, 0.5, 0.5, optional=True),
    "db": ServiceRule(512, 3.0, None, 1.0, 1.0),
    "pgbouncer": ServiceRule(32, 0.02, 128, 0.0, 0.5, 1.0),
    "redis": ServiceRule(128, 0.75, 4096, 0.0, 0.5, 1.0),
    "redis_broker": ServiceRule(64, 0.1, 512, 0.0, 0.25, 1.0),
    "sandbox": ServiceRule(192, 0.5, 2048, 0.5, 0.5, optional=True),
    "plugin_daemon": ServiceRule(384, 1.0, 4096, 0.5, 0.5, optional=True),
    "ssrf_proxy": ServiceRule(64, 0.05, 256, 0.0, 0.25, 1.0, optional=True),
    "nginx": ServiceRule(32, 0.05, 128, 0.25, 0.25),
    "weaviate": ServiceRule(768, 2.0, None, 1.0, 1.0),
    "qdrant": ServiceRule(384, 1.5, None, 1.0, 1.0),
}

CORE_SERVICES = ("api", "worker", "worker_beat", "web", "db", "pgbouncer", "redis",
                 "redis_broker", "sandbox", "plugin_daemon", "ssrf_proxy", "nginx")
OPTIONAL_SERVICES = tuple(name for name, rule in SERVICE_RULES.items() if rule.optional)

# Kept back for the kernel, Docker, sshd, journald and page cache: a fixed part for the daemons
# and a proportional part because page cache and kernel tables grow with the machine.
RESERVE_FIXED_MIB = 320
RESERVE_FRACTION = 0.06

# The disk Dify's data lives on (the data disk when one is named; images stay on the root
# filesystem under /var/lib/docker): the database, uploads, Redis dumps and bounded logs.
MIN_DISK_GIB = 8

MIN_MAX_CLIENT_CONN = 1000  # PgBouncer clients; 0 errors at 1000 in the notes' measurement
SUPERUSER_RESERVED_CONNECTIONS = 3  # Postgres's default: room for an admin when all else is taken

# Swap for the host's own daemons (containers cannot use it: memswap_limit == mem_limit): on
# hosts up to 8 GiB, half the memory up to 2 GiB, never more than an eighth of the root disk,
# and none when that comes to less than MIN_SWAP_MIB (too little to matter).
SWAP_MAX_MIB = 2048
SWAP_HOST_MAX_MEMORY_MIB = 8192
MIN_SWAP_MIB = 256
# Go's soft memory limit for Weaviate: GC works harder from 80 % of the container's limit on,
# leaving the rest for memory outside the Go heap (mmapped segments, cgo).
GOMEMLIMIT_SHARE = 0.8


def reserve_mib(memory_mib: int) -> int:
    return RESERVE_FIXED_MIB + int(RESERVE_FRACTION * memory_mib)


def swap_mib(size: HostSize) -> int:
    """Swap lets the host's own daemons (sshd, dockerd, journald) survive a spike on small hosts."""
    if size.memory_mib > SWAP_HOST_MAX_MEMORY_MIB:
        return 0
    swap = min(SWAP_MAX_MIB, size.memory_mib // 2)
    if size.root_disk_gib is not None:
        swap = min(swap, size.root_disk_gib * 1024 // 8)
    return swap if swap >= MIN_SWAP_MIB else 0


def minimum_memory_mib(services: list[str]) -> int:
    """Smallest host memory whose budget (memory - reserve) holds every floor."""
    floors = sum(SERVICE_RULES[name].floor_mib for name in services)
    memory = math.ceil((floors + RESERVE_FIXED_MIB) / (1 - RESERVE_FRACTION))
    # The real-number bound above is not exact: reserve_mib() truncates its proportional part
    # to whole MiB, so the budget (memory - reserve) can reach the floors a MiB below it (all 12
    # services: 3710 MiB plans, the bound said 3711). The budget never shrinks as memory grows,
    # so step to the smallest memory whose budget holds the floors: the minimum the
    # HostTooSmall message names is then exact (that size plans, one MiB less does not).
    while memory > 1 and memory - 1 - reserve_mib(memory - 1) >= floors:
        memory -= 1
    while memory - reserve_mib(memory) < floors:
        memory += 1
    return memory


def water_fill(budget_mib: int, rules: dict[str, ServiceRule]) -> dict[str, int]:
    """Floors first, then the rest by weight up to each cap.

    Each share is min(cap, floor + weight * level) with one water level for all, found by
    bisection. Every share is non-decreasing in the budget, so a bigger host never gives a
    service less; rounding down keeps the sum within the budget.
    """
    floors = sum(rule.floor_mib for rule in rules.values())
    if floors > budget_mib:
        raise HostTooSmall(f"floors {floors} MiB exceed budget {budget_mib} MiB")

    def share(rule: ServiceRule, level: float) -> float:
        grown = rule.floor_mib + rule.weight * level
        return grown if rule.cap_mib is None else min(rule.cap_mib, max(rule.floor_mib, grown))

    low, high = 0.0, float(budget_mib)
    for _ in range(100):  # bisection halves the interval: 100 steps is far below 1 MiB
        mid = (low + high) / 2
        if sum(share(rule, mid) for rule in rules.values()) > budget_mib:
            high = mid
        else:
            low = mid
    return {name: int(share(rule, low)) for name, rule in rules.items()}


def service_cpus(rule: ServiceRule, cores: int) -> float:
    """A CPU ceiling, not a reservation: it keeps one runaway service (the image-streaming bug
    pinned api at 100 %) from starving the others. api/worker leave half a core free."""
    cpus = max(rule.cpus_min, rule.cpus_share * cores)
    if rule.cpus_share >= 1.0 and cores > 1:
        cpus = max(rule.cpus_min, cores - 0.5)
    if rule.cpus_max is not None:
        cpus = min(cpus, rule.cpus_max)
    return round(min(cpus, float(cores)), 2)


# ---------------------------------------------------------------------------------------------
# Results

@dataclass(frozen=True)
class ServicePlan:
    mem_limit_mib: int
    cpus: float
    image: str


@dataclass(frozen=True)
class PostgresPlan:
    max_connections: int
    superuser_reserved_connections: int
    shared_buffers_mib: int
    effective_cache_size_mib: int
    maintenance_work_mem_mib: int
    work_mem_mib: int
    wal_buffers_kib: int
    min_wal_size_mib: int
    max_wal_size_mib: int
    max_worker_processes: int
    max_parallel_workers: int
    max_parallel_workers_per_gather: int
    max_parallel_maintenance_workers: int
    huge_pages: str
    shm_size_mib: int
    idle_in_transaction_session_timeout_s: int


@dataclass(frozen=True)
class PgBouncerPlan:
    pool_mode: str
    default_pool_size: int
    reserve_pool_size: int
    max_client_conn: int
    max_db_connections: int
    nofile_limit: int


@dataclass(frozen=True)
class RedisPlan:
    maxmemory_mib: int
    maxmemory_policy: str
    appendonly: bool


@dataclass(frozen=True)
class PoolPlan:
    """SQLAlchemy's pool of one process (Dify: SQLALCHEMY_POOL_SIZE / SQLALCHEMY_MAX_OVERFLOW)."""

    processes: int
    pool_size: int
    max_overflow: int

    @property
    def client_connections(self) -> int:
        return self.processes * (self.pool_size + self.max_overflow)


@dataclass(frozen=True)
class DifyPlan:
    server_worker_amount: int
    server_worker_connections: int
    celery_worker_amount: int
    graph_engine_max_workers: int
    web_pm2_instances: int
    pools: dict[str, PoolPlan]
    pgvector_max_connection: int
    plugin_db_max_open_conns: int
    plugin_db_max_idle_conns: int
    gunicorn_cmd_args: str
    gc_threshold: tuple[int, int, int]
    malloc_arena_max: int


@dataclass(frozen=True)
class Plan:
    host: HostSize
    preset: str
    reserve_mib: int
    swap_mib: int
    vector_store: str
    data_root: str
    domain: str | None
    data_disk: str | None
    verify_timer_every: str | None
    weaviate_gomemlimit_mib: int | None
    services: dict[str, ServicePlan]
    postgres: PostgresPlan
    pgbouncer: PgBouncerPlan
    redis: RedisPlan
    redis_broker: RedisPlan
    dify: DifyPlan
    log_max_size_mib: int
    log_max_files: int
    reported_host: HostSize | None = None  # what the host reported, when the plan is for its live facts

    @property
    def total_mem_limit_mib(self) -> int:
        return sum(service.mem_limit_mib for service in self.services.values())

    @classmethod
    def from_dict(cls, data: dict) -> Plan:
        """The inverse of to_dict(): a plan of record read back (verify, rebuild, the tests)."""
        def host(value):
            return HostSize(**value) if value else None
        dify = dict(data["dify"])
        dify["pools"] = {role: PoolPlan(**{k: v for k, v in pool.items() if k != "client_connections"})
                         for role, pool in dify["pools"].items()}
        dify["gc_threshold"] = tuple(dify["gc_threshold"])
        fields = {k: v for k, v in data.items() if k != "total_mem_limit_mib"}
        return cls(**{
            **fields,
            "host": host(data["host"]),
            "reported_host": host(data.get("reported_host")),
            "services": {name: ServicePlan(**service) for name, service in data["services"].items()},
            "postgres": PostgresPlan(**data["postgres"]),
            "pgbouncer": PgBouncerPlan(**data["pgbouncer"]),
            "redis": RedisPlan(**data["redis"]),
            "redis_broker": RedisPlan(**data["redis_broker"]),
            "dify": DifyPlan(**dify),
        })

    def to_dict(self) -> dict:
        data = asdict(self)
        data["total_mem_limit_mib"] = self.total_mem_limit_mib
        data["dify"]["gc_threshold"] = list(self.dify.gc_threshold)
        for role, pool in self.dify.pools.items():
            data["dify"]["pools"][role]["client_connections"] = pool.client_connections
        return data


# ---------------------------------------------------------------------------------------------
# Rules

def nearest_preset(size: HostSize) -> str:
    def distance(item):
        cores, memory = item[1]
        return abs(math.log2(cores / size.cpus)) + abs(math.log2(memory / size.memory_mib))
    return min(PRESETS.items(), key=distance)[0]


def plan_services(options: Options) -> list[str]:
    unknown = sorted(set(options.without) - set(SERVICE_RULES))
    if unknown:
        raise PlanError(f"unknown service(s) to leave out: {', '.join(unknown)}; "
                        f"these may be left out: {', '.join(OPTIONAL_SERVICES)}")
    required = sorted(name for name in options.without if not SERVICE_RULES[name].optional)
    if required:
        raise PlanError(f"cannot leave out {', '.join(required)}: Dify does not run without it; "
                        f"these may be left out: {', '.join(OPTIONAL_SERVICES)}")
    if options.vector_store not in VECTOR_STORES:
        raise PlanError(f"unknown vector store {options.vector_store!r}; choose one of {', '.join(VECTOR_STORES)}")
    services = [name for name in CORE_SERVICES if name not in options.without]
    if "sandbox" in services and "ssrf_proxy" not in services:
        raise PlanError("the sandbox reaches the network only through ssrf_proxy: leave out both or neither")
    if options.vector_store != "pgvector":  # pgvector lives in the one Postgres: no extra service
        services.append(options.vector_store)
    return services


def too_small_message(size: HostSize, services: list[str]) -> str:
    needed = minimum_memory_mib(services)
    droppable = [name for name in OPTIONAL_SERVICES if name in services]
    lean = [name for name in services if name not in droppable]
    hint = ""
    if droppable:
        hint = (f"; leaving out {','.join(droppable)} (--without {','.join(droppable)}) "
                f"lowers that to {minimum_memory_mib(lean)} MiB")
    return (f"a host with {size.memory_mib} MiB is too small for Dify with "
            f"{len(services)} services: it needs at least {needed} MiB{hint}.")


def plan_postgres(db_mib: int, cores: int, max_connections: int, disk_gib: int | None) -> PostgresPlan:
    """PGTune's "web" profile fed with the database container's own budget, not the host's RAM:
    the container limit is all the memory Postgres will ever have."""
    shared_buffers = db_mib // 4
    # Postgres's default is 8 worker processes; PGTune sets parallelism only from 4 cores up.
    parallel = cores >= 4
    max_worker_processes = cores if parallel else 8
    work_mem = max(4, (db_mib - shared_buffers) // ((max_connections + max_worker_processes) * 3))
    if disk_gib is None:
        max_wal = 4096  # PGTune's web profile
    else:  # WAL must not crowd a small disk: at most 1/32 of it
        max_wal = max(256, min(4096, disk_gib * 1024 // 32))
    return PostgresPlan(
        max_connections=max_connections,
        superuser_reserved_connections=SUPERUSER_RESERVED_CONNECTIONS,
        shared_buffers_mib=shared_buffers,
        effective_cache_size_mib=db_mib * 3 // 4,
        maintenance_work_mem_mib=min(8192, db_mib // 16),
        work_mem_mib=work_mem,
        # Postgres counts wal_buffers in 8 kB pages: round down so SHOW gives what the plan says.
        wal_buffers_kib=min(16 * 1024, max(64, shared_buffers * 1024 * 3 // 100)) // 8 * 8,
        min_wal_size_mib=max_wal // 4,
        max_wal_size_mib=max_wal,
        max_worker_processes=max_worker_processes,
        max_parallel_workers=cores if parallel else 0,
        max_parallel_workers_per_gather=min(4, math.ceil(cores / 2)) if parallel else 0,
        max_parallel_maintenance_workers=min(4, math.ceil(cores / 2)) if parallel else 0,
        huge_pages="try" if shared_buffers >= 2048 else "off",
        # /dev/shm holds parallel-query segments only (shared_buffers is mmap'd): Docker's 64 MiB
        # default fails parallel hash joins on bigger hosts.
        shm_size_mib=256 if parallel else 128,
        idle_in_transaction_session_timeout_s=600,  # a leaked transaction holds a pooled server
    )


def make_plan(size: HostSize, options: Options = Options()) -> Plan:
    if size.cpus < 1:
        raise PlanError(f"cpus must be at least 1, got {size.cpus}")
    if size.memory_mib < 1:
        raise PlanError(f"memory must be positive, got {size.memory_mib} MiB")
    if size.disk_gib is not None and size.disk_gib < MIN_DISK_GIB:
        raise HostTooSmall(f"a disk of {size.disk_gib} GiB is too small for Dify: it needs at least "
                           f"{MIN_DISK_GIB} GiB for the database, uploads and Redis dumps.")
    services = plan_services(options)
    images = resolve_images(services, options.images, options.dify_version)

    # Rule: the sum of all hard limits plus the reserve fits the host's memory.
    reserve = reserve_mib(size.memory_mib)
    budget = size.memory_mib - reserve
    rules = {name: SERVICE_RULES[name] for name in services}
    if sum(rule.floor_mib for rule in rules.values()) > budget:
        raise HostTooSmall(too_small_message(size, services))
    memory = water_fill(budget, rules)
    cores = size.cpus

    # Rule: worker counts follow cores and budget. One gevent gunicorn process per 512 MiB
    # above a 128 MiB base (a Dify api process sits near 450 MiB), never more than the cores
    # (gevent already multiplexes I/O within one process).
    api_workers = max(1, min(cores, (memory["api"] - 128) // 512, 8))
    worker_connections = 10  # upstream default: greenlets per gunicorn process
    # Celery runs gevent greenlets in ONE process; each running task (document indexing can
    # take hundreds of MiB) needs ~192 MiB above a 256 MiB base.
    celery_amount = max(1, min(4 * cores, (memory["worker"] - 256) // 192))
    graph_workers = max(2, min(10, 2 * cores, memory["worker"] // 128))
    # Dify's web runs Next.js under pm2 (upstream default 2 instances, ~150-250 MiB each).
    web_instances = max(1, min(cores, memory.get("web", 0) // 256))
    pgvector_max = 2 if options.vector_store == "pgvector" else 0

    # Rule: PgBouncer (transaction mode) sits between api/worker/beat and Postgres. Each
    # process's SQLAlchemy pool covers its own concurrency; max_client_conn covers them all.
    pools = {
        "api": PoolPlan(api_workers, worker_connections, worker_connections // 2),
        "worker": PoolPlan(1, celery_amount + 2, max(2, celery_amount // 2)),
        "worker_beat": PoolPlan(1 if "worker_beat" in services else 0, 2, 2),
    }
    vector_clients = (api_workers + 1) * pgvector_max  # pgvector's own psycopg2 pool per process
    client_demand = sum(pool.client_connections for pool in pools.values()) + vector_clients
    admin_clients = 10  # psql, verify, migrations while a deploy swaps containers
    # A waiting client costs PgBouncer a few KiB (measured: 3 -> 10 MiB from 50 to 1000 clients),
    # so the floor is generous: clients the pools do not model (a second engine, a one-off
    # script, a burst) queue for a server connection instead of being refused.
    max_client_conn = max(MIN_MAX_CLIENT_CONN, int(math.ceil((client_demand + admin_clients) * 1.25 / 10) * 10))
    # Server side: ~5 busy backends per core keeps Postgres's CPUs fed in transaction mode.
    default_pool_size = max(10, min(60, 5 * cores))
    reserve_pool = max(2, default_pool_size // 4)

    # The plugin daemon (Go/GORM) connects directly: session state we have not proven safe
    # under transaction pooling.
    plugin_open = max(5, min(30, 4 * cores)) if "plugin_daemon" in services else 0
    # Rule: max_connections covers PgBouncer's server pools plus the direct clients and the
    # superuser reserve, and nothing more: every idle backend costs memory.
    direct_admin = 5  # pg_dump, psql, verify straight to Postgres
    max_connections = default_pool_size + reserve_pool + plugin_open + SUPERUSER_RESERVED_CONNECTIONS + direct_admin

    postgres = plan_postgres(memory["db"], cores, max_connections, size.disk_gib)

    # Rule: Redis's maxmemory leaves 40 % of its container for fork copy-on-write during RDB/AOF
    # rewrites and allocator fragmentation. Two instances, because no single policy is safe
    # for both jobs (measured, notes "Redis at maxmemory"): allkeys-lru evicted Celery's
    # queue and binding keys; noeviction keeps them but then refuses cache writes.
    def redis_plan(container_mib: int, policy: str, appendonly: bool) -> RedisPlan:
        return RedisPlan(int(container_mib * 0.6), policy, appendonly)

    per_process_api_mib = memory["api"] // api_workers
    # GC: lower gen-0 threshold collects cycles sooner (measured: higher thresholds raised peak
    # RSS 1.75x-3.3x). Set explicitly everywhere: Python 3.13's own default moved to 2000.
    gc_threshold = (500, 10, 10) if per_process_api_mib < 1024 else (700, 10, 10)
    max_requests = 500 if per_process_api_mib < 1024 else 1000
    return Plan(
        host=size,
        preset=nearest_preset(size),
        reserve_mib=reserve,
        swap_mib=swap_mib(size),
        vector_store=options.vector_store,
        data_root=options.data_root,
        domain=options.domain,
        data_disk=options.data_disk,
        verify_timer_every=options.verify_timer_every,
        weaviate_gomemlimit_mib=(int(memory["weaviate"] * GOMEMLIMIT_SHARE) if "weaviate" in memory else None),
        services={name: ServicePlan(memory[name], service_cpus(SERVICE_RULES[name], cores), images[name])
                  for name in services},
        postgres=postgres,
        pgbouncer=PgBouncerPlan(
            pool_mode="transaction",
            default_pool_size=default_pool_size,
            reserve_pool_size=reserve_pool,
            max_client_conn=max_client_conn,
            max_db_connections=default_pool_size + reserve_pool,
            # PgBouncer needs one descriptor per client and per server ("accept() failed: Too
            # many open files" at 1000 clients with the default 1024, measured).
            nofile_limit=max(4096, 2 * (max_client_conn + max_connections) + 100),
        ),
        redis=redis_plan(memory["redis"], "allkeys-lru", appendonly=False),
        redis_broker=redis_plan(memory["redis_broker"], "noeviction", appendonly=True),
        dify=DifyPlan(
            server_worker_amount=api_workers,
            server_worker_connections=worker_connections,
            celery_worker_amount=celery_amount,
            graph_engine_max_workers=graph_workers,
            web_pm2_instances=web_instances,
            pools=pools,
            pgvector_max_connection=pgvector_max,
            plugin_db_max_open_conns=plugin_open,
            plugin_db_max_idle_conns=plugin_open // 2,
            # Recycling bounds slow leaks (#11510, #22233) to one worker's lifetime.
            gunicorn_cmd_args=f"--max-requests {max_requests} --max-requests-jitter {max_requests // 10}",
            gc_threshold=gc_threshold,
            malloc_arena_max=2,  # threaded CPython RSS: fewer glibc arenas
        ),
        log_max_size_mib=10,
        log_max_files=3,
    )
