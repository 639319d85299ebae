"""The plan: one host's size in, every budget and setting of the Dify stack out.

Pure functions over dataclasses, no I/O. Deploy, render, verify and the tests all read the
Plan made here, so every number of the stack is decided in this file (or in images.py for image
pins) and nowhere else. Each rule says why next to where it is applied.

The plan is a continuous, monotone function of the host's cores, memory and disk: memory left
after the reserve is shared out by water-filling (each service gets its floor, then the rest
in proportion to its weight until it reaches its cap). The floors of Dify's own services are
the real Dify's measured peaks; where a host cannot hold every floor, the plan leaves optional
services out in a fixed order and names each trade-off (Plan.tradeoffs). The presets below are
checkpoints the tests look at, not a lookup table.
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
    tls: str = "self-signed"  # where nginx's certificate comes from: self-signed, provided or acme
    behind_proxy: bool = False  # a TLS proxy in front: keep its X-Forwarded-Proto
    firewall: bool = True  # nftables: only SSH, 80 and 443 in
    ssh_port: int = 22  # the port pyinfra connects on (host data ssh_port); the firewall keeps it open


class PlanError(ValueError):
    """Input the plan cannot be made from (exit code 2 at the CLI)."""


class HostTooSmall(PlanError):
    """The host cannot hold the chosen services within their floors."""


# ---------------------------------------------------------------------------------------------
# The services and their memory rules

@dataclass(frozen=True)
class ServiceRule:
    floor_mib: int  # below this the service is OOM-killed or thrashes (measured peaks where measured)
    weight: float  # share of the memory above all floors
    cap_mib: int | None  # beyond this more memory only hides a leak; None: takes what is left
    cpus_share: float  # fraction of the host's cores it may use ...
    cpus_min: float  # ... but never less than this
    cpus_max: float | None = None  # single-threaded servers gain nothing past one core
    optional: bool = False  # may be left out with --without


# The real Dify's memory, measured (../shared/notes/dify-memory.md: Dify 1.12.1, gunicorn
# gevent, celery -P gevent, each service in its own memory cgroup with `edgefit render --preset
# 2C4G` settings; "charge" is the cgroup's peak usage: anon + page cache + mapped files).
# Limits hold the measured peak charge times MARGIN: one run each, on a busy machine.
MARGIN = 1.10
# api: 1 gunicorn worker peaked at 801 MiB charged under an 806 MiB limit (5 to spare; rss 559,
# cache 193); unlimited it peaked at 693 charged, floor (rss + mapped) ~620. Cgroup table, rows
# "api, 1 gunicorn worker".
API_PEAK_ONE_WORKER_MIB = 801
# Each further gunicorn worker: +321 charged (2 workers unlimited: 1014 vs 693) and +403 PSS
# (3 workers 4C8G: 1413 vs 607 for one, figures table). The larger figure holds both.
API_PER_EXTRA_WORKER_MIB = 400
# worker, gevent -c 2: 742 MiB charged at its 742 limit from t=52 s (cache squeezed to ~130),
# 20 documents + one 8 MB indexed; floor ~645 (rss + mapped). Cgroup table, "worker, gevent -c 2".
WORKER_PEAK_MIB = 742
WORKER_PEAK_CONCURRENCY = 2
# One 8 MB document: peak 774 RSS - 439 idle - 220 jieba's dictionary = ~115 MiB of its own
# (figures table, "worker, gevent -c 2"); 8 documents of 1 MB at once on -c 8 took ~83 each
# ((1320 - 439 - 220) / 8). With gevent this growth is never given back.
INDEX_TASK_MIB = 115
WORKER_IDLE_ANON_MIB = 320  # figures table: idle anon at -c 2 (318-320 at any concurrency)
JIEBA_MIB = 220  # "What was learned": the first keyword-indexing task loads jieba, kept
# What a container is charged for beside anon and cannot give back: mapped files 47 at the
# worker's peak, plus the ~50 MiB of page cache it must keep to run (cgroup table).
WORKER_FILE_MIB = 96
# The largest document measured (8 MB, economy indexing): INDEX_TASK_MIB holds for documents up
# to this size, so Dify's UPLOAD_FILE_SIZE_LIMIT is capped here (upstream's .env.example: 15 MB,
# not measured). Image, audio and video upload limits stay upstream's: they are not indexed.
MEASURED_DOCUMENT_MB = 8
# beat: 460 MiB charged unlimited (314 anon + 144 cache); 384 survived at its limit with no
# margin; 166 was OOM-killed at start. Beat's anon is flat (314 idle and peak), so the charge
# unlimited is already ~20 % above a limit that held. Cgroup table, rows "beat".
BEAT_PEAK_MIB = 460
# web (Next.js under pm2): one node with NODE_OPTIONS old=128 semi=16 peaked at 291 RSS; the pm2
# manager costs 45 PSS (79 RSS, its pages shared with node). 2 instances measured 612 RSS / 506
# PSS, within 45 + 2 x 291. Web table; without the flags one node reached 789.
WEB_NODE_OPTIONS = "--max-old-space-size=128 --max-semi-space-size=16"
WEB_INSTANCE_MIB = 291
WEB_PM2_MIB = 45
# The worker's watchdog reads three cgroup files this often: an 8 MB document's ~115 MiB took
# tens of seconds to grow (sampled every 0.5 s), so 2 s sees a crossing long before the limit.
WATCHDOG_INTERVAL_S = 2.0


def api_need_mib(workers: int) -> int:
    """The api's limit that holds the measured peak of this many gunicorn workers, with margin."""
    return math.ceil(MARGIN * (API_PEAK_ONE_WORKER_MIB + API_PER_EXTRA_WORKER_MIB * (workers - 1)))


def worker_steady_anon_mib(concurrency: int) -> int:
    """The worker's anonymous memory once it has indexed: idle, jieba's dictionary, and the
    high-water of `concurrency` large documents at once. gevent keeps that high-water (later
    tasks reuse it: 20 documents and one 8 MB document at -c 2 left 653 anon), so a healthy
    worker sits here for good, and its watchdog must not fire below it."""
    return WORKER_IDLE_ANON_MIB + JIEBA_MIB + concurrency * index_task_need_mib()


def index_task_need_mib() -> int:
    """One large document's own growth, with margin."""
    return math.ceil(MARGIN * INDEX_TASK_MIB)


def worker_need_mib(concurrency: int) -> int:
    """The worker's limit at this gevent concurrency: its watchdog threshold at the lowest
    (worker_steady_anon_mib), plus, for a worker that crossed it, one large document's growth
    for each task the warm shutdown lets finish, plus the file pages it is charged for. This
    holds the measured -c 2 peak (742 charged) with room: 890 at -c 1."""
    return worker_steady_anon_mib(concurrency) + concurrency * index_task_need_mib() + WORKER_FILE_MIB


def web_need_mib(instances: int) -> int:
    return math.ceil(MARGIN * (WEB_PM2_MIB + WEB_INSTANCE_MIB * instances))


# Floors are the measured needs above for the smallest configuration (1 gunicorn worker, -c 1,
# one node); the plan then picks workers, concurrency and node instances its budget holds.
# Not measured here: db, the plugin daemon (holds plugin runtimes) and the sandbox keep their
# upstream-derived floors. Caps on api/worker catch the slow leaks users report (#11510: 6 GB
# over weeks) before they starve the host; the database has no cap and absorbs the rest as cache.
SERVICE_RULES: dict[str, ServiceRule] = {
    "api": ServiceRule(api_need_mib(1), 4.0, 8192, 1.0, 1.0),
    "worker": ServiceRule(worker_need_mib(1), 4.0, 8192, 1.0, 1.0),
    "worker_beat": ServiceRule(BEAT_PEAK_MIB, 0.25, 768, 0.0, 0.25, 0.5, optional=True),
    "web": ServiceRule(web_need_mib(1), 0.5, 1536, 0.5, 0.5, optional=True),
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

# What the plan leaves out by itself, in this order, when the host cannot hold every service it
# was asked for at its measured floor. With the real footprints above, 12 services no longer fit
# 4 GiB (2C4G: floors 3935 MiB against a budget of 3531), so a small host gets the trade-off
# below instead of limits the real Dify breaks; `edgefit plan` shows it and how to undo it.
AUTO_LEAVE_OUT: tuple[tuple[str, str], ...] = (
    # First beat: it is a whole Dify interpreter (~460 MiB charged) for a few periodic tasks,
    # and with the gevent pool it cannot share the worker's (`celery worker -B` is refused:
    # "-B option doesn't work with eventlet/gevent pools", measured).
    ("worker_beat", "Dify's periodic tasks do not run (schedule-triggered workflows, trigger provider "
                    "refresh, cleanup of old messages, unused datasets and the embedding cache, plugin "
                    "upgrade checks; api/extensions/ext_celery.py)"),
    # Then the sandbox: only workflow code nodes need it. Its ssrf_proxy stays, because the api's
    # and worker's own outbound requests go through it.
    ("sandbox", "workflow code nodes do not run"),
)

# Kept back for the kernel, Docker, sshd, journald and page cache: a fixed part for the daemons
# and a proportional part because page cache and kernel tables grow with the machine. Measured
# on edge-small (3915 MiB, the whole stack up, before and after a workload): MemTotal -
# MemAvailable - the containers' own use = 167-250 MiB; the reserve there (491) is about twice
# that, and the host's daemons also have the swap file. Not more: every MiB kept back here is
# one the real Dify's measured floors need on a "4 GiB" VPS (MemTotal ~3850 MiB).
RESERVE_FIXED_MIB = 256
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


@dataclass(frozen=True)
class HealthCheck:
    """Docker's healthcheck timing for one service (compose `healthcheck:`), in seconds."""

    interval_s: int
    timeout_s: int
    retries: int
    start_period_s: int = 0


# Every probe runs through `docker exec`, and starting a process in a container (runc, through
# containerd) alone took over 5 s on the emulated 2- and 4-core test hosts under load: with a 5 s
# timeout, redis_broker went "unhealthy" for 12 probes in a row while Redis answered at once
# (issue 14). A probe's timeout only bounds a hung probe, so it is Docker's own default, 30 s,
# everywhere.
# Probes are not free either: each is a process started in a container (runc, containerd's
# shim, dockerd). On edge-small, idle with the whole stack up, the probes were most of what the
# host did: at 10 s for four servers and 30 s for the rest (0.57 probes a second), its emulator
# used 70 % of a core; with every interval at 60 s, 31 % (2026-12-02, `top` on the host, 60 s
# windows). A 2-core VPS pays the same share at a smaller scale. So the intervals are Docker's
# default, 30 s, for the servers others wait on (compose's service_healthy gates every start on
# their first probe) and for nginx (a config change restarts it, and the deploy waits for its
# first probe); Dify's own services, whose start takes longer than that anyway, 60 s (0.23 probes
# a second in all). How soon a dead service shows, interval x retries, stays 2-3 minutes.
# start_period covers the measured cold start (the real api: migrations, then gunicorn's app
# import, 14-37 s per worker on the test machines; see dify-memory.md).
PROBE_TIMEOUT_S = 30
HEALTHCHECKS = {
    "api": HealthCheck(60, PROBE_TIMEOUT_S, 3, 180),
    "web": HealthCheck(60, PROBE_TIMEOUT_S, 3, 60),
    "db": HealthCheck(30, PROBE_TIMEOUT_S, 4, 60),
    "pgbouncer": HealthCheck(30, PROBE_TIMEOUT_S, 4, 20),
    "redis": HealthCheck(30, PROBE_TIMEOUT_S, 4),
    "redis_broker": HealthCheck(30, PROBE_TIMEOUT_S, 4),
    "sandbox": HealthCheck(60, PROBE_TIMEOUT_S, 3, 30),
    "plugin_daemon": HealthCheck(60, PROBE_TIMEOUT_S, 3, 60),
    "nginx": HealthCheck(30, PROBE_TIMEOUT_S, 5),
    "weaviate": HealthCheck(60, PROBE_TIMEOUT_S, 3),
}



@dataclass(frozen=True)
class Privileges:
    """The capabilities a container drops and gets back (compose cap_drop / cap_add); every
    container also runs with no-new-privileges (the compose template)."""

    cap_drop: tuple[str, ...]
    cap_add: tuple[str, ...] = ()


# Every container runs with no-new-privileges: each of these images drops root with a setuid()
# call of its own (gosu/setpriv in the Postgres and Redis entrypoints, nginx's and squid's
# masters, the sandbox's runner), which the flag does not stop; it stops setuid binaries only.
# The servers whose official entrypoints are known start from no capability at all and get back
# only what those entrypoints use: chown of their data directory (CHOWN, DAC_OVERRIDE, FOWNER)
# and the switch to their own user (SETUID, SETGID); nginx also binds 80/443 and signals its
# workers (NET_BIND_SERVICE, KILL); PgBouncer runs as its own user from the start and needs none.
# Dify's images, Weaviate and Qdrant cannot be started here to find their needs, so they keep
# Docker's default set minus what no such server uses: raw sockets (NET_RAW: ARP and ICMP
# spoofing on the stack's network, from the plugin daemon's third-party code too), device nodes,
# file capabilities, audit writes, and chroot (except the sandbox, which chroots its runs).
_DATA_OWNER = ("CHOWN", "DAC_OVERRIDE", "FOWNER", "SETGID", "SETUID")
_UNUSED_DEFAULTS = ("NET_RAW", "MKNOD", "SETFCAP", "AUDIT_WRITE")
PRIVILEGES = {
    "db": Privileges(("ALL",), _DATA_OWNER),
    "redis": Privileges(("ALL",), _DATA_OWNER),
    "redis_broker": Privileges(("ALL",), _DATA_OWNER),
    "pgbouncer": Privileges(("ALL",)),
    "nginx": Privileges(("ALL",), _DATA_OWNER + ("KILL", "NET_BIND_SERVICE")),
    "ssrf_proxy": Privileges(("ALL",), _DATA_OWNER + ("KILL",)),
    "sandbox": Privileges(_UNUSED_DEFAULTS),
}
DEFAULT_PRIVILEGES = Privileges(_UNUSED_DEFAULTS + ("SYS_CHROOT",))


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
    web_node_options: str  # NODE_OPTIONS of the web: V8's heaps bounded as measured
    worker_restart_anon_mib: int  # the worker's watchdog asks for a warm shutdown above this
    worker_watchdog_interval_s: float
    upload_file_size_limit_mb: int  # Dify's UPLOAD_FILE_SIZE_LIMIT (documents)
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
    # What the plan gave up to fit this host (services left out), each with how to undo it.
    tradeoffs: list[str] = field(default_factory=list)
    reported_host: HostSize | None = None  # what the host reported, when the plan is for its live facts
    tls: str = "self-signed"  # nginx's certificate: self-signed (made on the host), provided or acme (certbot)
    behind_proxy: bool = False
    firewall: bool = True
    ssh_port: int = 22

    @property
    def healthchecks(self) -> dict[str, HealthCheck]:
        """The healthcheck timing of each planned service that has one (HEALTHCHECKS)."""
        return {name: HEALTHCHECKS[name] for name in self.services if name in HEALTHCHECKS}

    @property
    def privileges(self) -> dict[str, Privileges]:
        """The capabilities of each planned service (PRIVILEGES)."""
        return {name: PRIVILEGES.get(name, DEFAULT_PRIVILEGES) for name in self.services}

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


def fit_services(services: list[str], budget_mib: int) -> tuple[list[str], list[str]]:
    """(services kept, services left out): AUTO_LEAVE_OUT in order, only as far as needed.

    A bigger budget never leaves out more, so a service present on a small host is present on
    every bigger one."""
    kept, left_out = list(services), []
    for name, _ in AUTO_LEAVE_OUT:
        if sum(SERVICE_RULES[s].floor_mib for s in kept) <= budget_mib:
            break
        if name in kept:
            kept.remove(name)
            left_out.append(name)
    return kept, left_out


def least_services(services: list[str]) -> list[str]:
    """The services a plan keeps on the smallest host it accepts for this request."""
    auto = {name for name, _ in AUTO_LEAVE_OUT}
    return [name for name in services if name not in auto]


def minimum_host_mib(services: list[str]) -> int:
    """Smallest host memory make_plan accepts for these services (some may be left out there)."""
    return minimum_memory_mib(least_services(services))


def too_small_message(size: HostSize, services: list[str]) -> str:
    least = least_services(services)
    needed = minimum_memory_mib(least)
    auto = [name for name in services if name not in least]
    droppable = [name for name in OPTIONAL_SERVICES if name in least]
    lean = [name for name in least if name not in droppable]
    left = ""
    if auto:
        left = (f" with {','.join(auto)} left out ({minimum_memory_mib(services)} MiB "
                f"with all {len(services)})")
    hint = ""
    if droppable:
        hint = (f"; leaving out {','.join(droppable)} too (--without {','.join(droppable)}) "
                f"lowers that to {minimum_memory_mib(lean)} MiB")
    return (f"a host with {size.memory_mib} MiB is too small for Dify: it needs at least "
            f"{needed} MiB for {len(least)} services{left}{hint}.")


def tradeoff_notes(left_out: list[str], requested: list[str], budget_mib: int) -> list[str]:
    """One line per service the plan left out: what is lost, and the two ways to get it back.

    AUTO_LEAVE_OUT goes in order, so a service comes back only where everything after it in
    that order fits too: on a host of minimum_memory_mib of those services, or when leaving out
    one more optional service (the smallest that frees enough) makes room for them."""
    reasons = dict(AUTO_LEAVE_OUT)
    order = [name for name, _ in AUTO_LEAVE_OUT]
    notes = []
    for name in left_out:
        earlier = set(order[:order.index(name)])
        back = [s for s in requested if s not in earlier]
        missing = sum(SERVICE_RULES[s].floor_mib for s in back) - budget_mib
        frees = sorted((SERVICE_RULES[s].floor_mib, s) for s in back
                       if SERVICE_RULES[s].optional and s not in order and SERVICE_RULES[s].floor_mib >= missing
                       and not (s == "ssrf_proxy" and "sandbox" in back))
        instead = f", or with --without {frees[0][1]}" if frees else ""
        notes.append(f"{name} left out ({SERVICE_RULES[name].floor_mib} MiB, {missing} MiB short): "
                     f"{reasons[name]}; it runs on a host of {minimum_memory_mib(back)} MiB{instead}")
    return notes


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
    requested = plan_services(options)

    # Rule: the sum of all hard limits plus the reserve fits the host's memory; where the
    # requested services' floors do not, AUTO_LEAVE_OUT decides what goes, and the plan says so.
    reserve = reserve_mib(size.memory_mib)
    budget = size.memory_mib - reserve
    services, left_out = fit_services(requested, budget)
    if sum(SERVICE_RULES[name].floor_mib for name in services) > budget:
        raise HostTooSmall(too_small_message(size, requested))
    images = resolve_images(services, options.images, options.dify_version)
    rules = {name: SERVICE_RULES[name] for name in services}
    memory = water_fill(budget, rules)
    cores = size.cpus
    dify = plan_dify(memory, cores, services, options)
    pgbouncer, max_connections = plan_connections(dify, cores)
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
        tls=options.tls,
        behind_proxy=options.behind_proxy,
        firewall=options.firewall,
        ssh_port=options.ssh_port,
        weaviate_gomemlimit_mib=(int(memory["weaviate"] * GOMEMLIMIT_SHARE) if "weaviate" in memory else None),
        services={name: ServicePlan(memory[name], service_cpus(SERVICE_RULES[name], cores), images[name])
                  for name in services},
        postgres=plan_postgres(memory["db"], cores, max_connections, size.disk_gib),
        pgbouncer=pgbouncer,
        redis=plan_redis(memory["redis"], "allkeys-lru", appendonly=False),
        redis_broker=plan_redis(memory["redis_broker"], "noeviction", appendonly=True),
        dify=dify,
        log_max_size_mib=10,
        log_max_files=3,
        tradeoffs=tradeoff_notes(left_out, requested, budget),
    )


def plan_dify(memory: dict[str, int], cores: int, services: list[str], options: Options) -> DifyPlan:
    """Dify's own processes: worker counts from the measured footprints, pools, GC, recycling."""

    # Rule: worker counts follow cores and the measured footprints. gunicorn workers: as many
    # as the api's limit holds at the measured peak per worker (api_need_mib), never more than
    # the cores (gevent already multiplexes I/O within one process).
    api_workers = max(1, max((n for n in range(1, min(cores, 8) + 1) if api_need_mib(n) <= memory["api"]),
                             default=1))
    worker_connections = 10  # upstream default: greenlets per gunicorn process
    celery_amount, worker_restart_anon_mib = plan_celery(memory["worker"], cores)
    # Uploads: the per-task growth above was measured with an 8 MB document, the largest tried;
    # a bigger cap (upstream's 15 MB) would need a measurement, not a guess.
    upload_file_size_limit_mb = MEASURED_DOCUMENT_MB
    graph_workers = max(2, min(10, 2 * cores, memory["worker"] // 128))
    # Dify's web runs Next.js under pm2: as many node instances as the web's limit holds at the
    # measured peak with NODE_OPTIONS bounding V8's heaps (web_need_mib).
    web_instances = max(1, max((n for n in range(1, cores + 1) if web_need_mib(n) <= memory.get("web", 0)),
                               default=1))
    pgvector_max = 2 if options.vector_store == "pgvector" else 0

    # Rule: PgBouncer (transaction mode) sits between api/worker/beat and Postgres. Each
    # process's SQLAlchemy pool covers its own concurrency; max_client_conn covers them all.
    pools = {
        "api": PoolPlan(api_workers, worker_connections, worker_connections // 2),
        "worker": PoolPlan(1, celery_amount + 2, max(2, celery_amount // 2)),
        "worker_beat": PoolPlan(1 if "worker_beat" in services else 0, 2, 2),
    }
    # The plugin daemon (Go/GORM) connects directly: session state we have not proven safe
    # under transaction pooling.
    plugin_open = max(5, min(30, 4 * cores)) if "plugin_daemon" in services else 0
    per_process_api_mib = memory["api"] // api_workers
    # GC: lower gen-0 threshold collects cycles sooner (measured: higher thresholds raised peak
    # RSS 1.75x-3.3x). Set explicitly everywhere: Python 3.13's own default moved to 2000.
    gc_threshold = (500, 10, 10) if per_process_api_mib < 1024 else (700, 10, 10)
    # Rule: no gunicorn recycling (no --max-requests) at any size. Measured on the real api:
    # with one worker each recycle left nothing serving for 14-37 s while the app reloaded (7
    # outages in 17 min); with 3 workers and jitter 50 all recycled within 23 s of each other
    # (40 of 88 GETs timed out); even 300 + jitter 200 on 2 workers restarted both within 1 s,
    # twice in 150 s. Workers serve in lock-step, so a jitter narrower than requests-per-reload
    # never spreads them, and at a busy site no jitter is wide enough. The api's limit holds its
    # measured peak instead; a slow leak (#11510) ends at that limit, where verify reports it.
    gunicorn_cmd_args = ""
    return DifyPlan(
        server_worker_amount=api_workers,
        server_worker_connections=worker_connections,
        celery_worker_amount=celery_amount,
        graph_engine_max_workers=graph_workers,
        web_pm2_instances=web_instances,
        web_node_options=WEB_NODE_OPTIONS,
        worker_restart_anon_mib=worker_restart_anon_mib,
        worker_watchdog_interval_s=WATCHDOG_INTERVAL_S,
        upload_file_size_limit_mb=upload_file_size_limit_mb,
        pools=pools,
        pgvector_max_connection=pgvector_max,
        plugin_db_max_open_conns=plugin_open,
        plugin_db_max_idle_conns=plugin_open // 2,
        gunicorn_cmd_args=gunicorn_cmd_args,
        gc_threshold=gc_threshold,
        malloc_arena_max=2,  # threaded CPython RSS: fewer glibc arenas
    )


def plan_celery(worker_mib: int, cores: int) -> tuple[int, int]:
    """-> (Celery concurrency, the watchdog's anonymous-memory threshold in MiB)."""
    # Celery runs gevent greenlets in ONE process whose memory is never given back (measured);
    # a watchdog in the worker (sitecustomize) asks it for a warm shutdown once its anonymous
    # memory crosses worker_restart_anon_mib, and the warm shutdown lets every running task
    # finish. So the limit must hold that threshold plus one large document's growth for each
    # task in flight plus the file pages it is charged for, and the threshold must stay above
    # the worker's idle + jieba + in-flight high-water, or it would restart after every indexing
    # task (a threshold of idle + jieba alone did: on the VMs the worker restarted after each
    # document and left one of 8 queued past 180 s).
    # What protects the tasks: Dify sets its Celery config in code (api/extensions/ext_celery.py:
    # no task_acks_late, nothing read from the environment for it), so late acks cannot be set
    # from here. The warm shutdown is what keeps them: Celery stops taking new messages, waits
    # for every running task to finish, and with --prefetch-multiplier 1 (the entrypoint's) a
    # message fetched but not started stays unacknowledged, and the Redis transport puts it back
    # on the queue when the worker closes. The broker never evicts (noeviction, appendonly).
    def restart_anon(concurrency: int) -> int:
        return worker_mib - WORKER_FILE_MIB - concurrency * index_task_need_mib()

    # The largest concurrency whose limit holds; restart_anon() is then at least the steady
    # high-water (worker_need_mib), so a worker that has indexed does not restart for it.
    celery_amount = max((c for c in range(1, 4 * cores + 1) if worker_need_mib(c) <= worker_mib), default=1)
    return celery_amount, restart_anon(celery_amount)


def plan_connections(dify: DifyPlan, cores: int) -> tuple[PgBouncerPlan, int]:
    """PgBouncer's pools and Postgres's max_connections, from every process's own pool."""
    pools, api_workers, pgvector_max = dify.pools, dify.server_worker_amount, dify.pgvector_max_connection
    plugin_open = dify.plugin_db_max_open_conns
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

    # Rule: max_connections covers PgBouncer's server pools plus the direct clients and the
    # superuser reserve, and nothing more: every idle backend costs memory.
    direct_admin = 5  # pg_dump, psql, verify straight to Postgres
    max_connections = default_pool_size + reserve_pool + plugin_open + SUPERUSER_RESERVED_CONNECTIONS + direct_admin

    pgbouncer = PgBouncerPlan(
        pool_mode="transaction",
        default_pool_size=default_pool_size,
        reserve_pool_size=reserve_pool,
        max_client_conn=max_client_conn,
        max_db_connections=default_pool_size + reserve_pool,
        # PgBouncer needs one descriptor per client and per server ("accept() failed: Too
        # many open files" at 1000 clients with the default 1024, measured).
        nofile_limit=max(4096, 2 * (max_client_conn + max_connections) + 100),
    )
    return pgbouncer, max_connections


def plan_redis(container_mib: int, policy: str, appendonly: bool) -> RedisPlan:
    """Redis's maxmemory leaves 40 % of its container for fork copy-on-write during RDB/AOF
    rewrites and allocator fragmentation. Two instances, because no single policy is safe for
    both jobs (measured, notes "Redis at maxmemory"): allkeys-lru evicted Celery's queue and
    binding keys; noeviction keeps them but then refuses cache writes."""
    return RedisPlan(int(container_mib * 0.6), policy, appendonly)
