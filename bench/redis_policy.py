#!/usr/bin/env python3
"""Redis as cache + Celery broker once memory fills: one Redis against edgefit's two, side by
side in one run on this machine. This file's one job is that comparison.

Layouts: one redis-server holding both Dify's cache (db 0) and its Celery broker (db 1), with
allkeys-lru and, for reference, noeviction (Redis's default), given maxmemory = edgefit's cache +
broker maxmemory; against edgefit's two rendered 2C4G instances (cache allkeys-lru, broker
noeviction + AOF). Broker state goes in first (kombu's binding set, a queue of 1000 task
messages, unacked), then cache writes go past the cache's maxmemory (3x with --quick and the
default, 5x with --full); which broker keys survive, how many keys were evicted, how many cache
writes failed, and whether Celery can still publish and read its queue size.

Real redis-server (Debian package) through tests/servers_helpers.py: loopback only, free ports,
temporary directories removed afterwards, every loop bounded, and only the processes started
here are stopped, by PID.

    .venv/bin/python bench/redis_policy.py [--quick | --full] [--json FILE]
"""

from __future__ import annotations

import json
import sys
import time
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass

from common import PRESET, START_TIMEOUT_S, Deadline, Profile, main, mib, rendered_stack, server_versions, table

from servers_helpers import (
    Server,
    base_env,
    free_port,
    relocate,
    require_executable,
    require_module,
    server_dir,
    url_password,
    write_file,
)


@dataclass(frozen=True)
class RedisProfile(Profile):
    fill_factor: float = 3.0  # cache bytes sent, in multiples of the cache's maxmemory


PROFILES = {
    "quick": RedisProfile("quick", 45, fill_factor=3.0),
    "default": RedisProfile("default", 120, fill_factor=3.0),
    "full": RedisProfile("full", 200, fill_factor=5.0),
}

BROKER_DB = 1  # Dify: CELERY_BROKER_URL=redis://...:6379/1; the cache (REDIS_DB) is 0
QUEUE_MESSAGES = 1000
UNACKED = 4  # prefetched, not yet acknowledged (Dify: prefetch multiplier 1 x greenlets)
CACHE_VALUE = 16 * 1024
CACHE_BATCH = 32  # 512 KiB per pipeline: a small query buffer, so "full" stays full after it
PUBLISHES_AFTER_FILL = 300  # task messages a producer keeps sending once memory is full
TOP_UP_VALUE, TOP_UP_WRITES = 1024, 4096  # at most 4 MiB of small cache writes before the size check


def kombu_message(index: int) -> bytes:
    """A Celery task message as kombu stores it in the queue list (JSON, base64 body)."""
    body = {"body": "W1siZG9jdW1lbnRfaWQiXSwge30sIHsiY2FsbGJhY2tzIjogbnVsbH1d" + "A" * 600,
            "content-encoding": "utf-8", "content-type": "application/json",
            "headers": {"lang": "py", "task": "tasks.document_indexing_task", "id": f"task-{index:06d}",
                        "retries": 0, "root_id": f"task-{index:06d}", "parent_id": None},
            "properties": {"correlation_id": f"task-{index:06d}", "delivery_mode": 2,
                           "delivery_info": {"exchange": "", "routing_key": "celery"}, "priority": 0,
                           "body_encoding": "base64", "delivery_tag": f"tag-{index:06d}"}}
    return json.dumps(body).encode()


BROKER_KEYS = ("_kombu.binding.celery", "celery", "unacked")


def load_broker_state(client) -> None:
    pipe = client.pipeline(transaction=False)
    pipe.sadd("_kombu.binding.celery", "celery\x06\x16\x06\x16celery")
    for start in range(0, QUEUE_MESSAGES, 100):
        pipe.lpush("celery", *[kombu_message(i) for i in range(start, min(QUEUE_MESSAGES, start + 100))])
    for index in range(UNACKED):
        pipe.hset("unacked", f"tag-u{index}", json.dumps([kombu_message(10_000 + index).decode(), "", "celery"]))
    pipe.zadd("unacked_index", {f"tag-u{index}": time.time() for index in range(UNACKED)})
    pipe.execute()


def broker_state(client) -> dict:
    return {
        "_kombu.binding.celery": client.scard("_kombu.binding.celery"),
        "celery": client.llen("celery"),
        "unacked": client.hlen("unacked"),
    }


def try_command(fn) -> str:
    try:
        fn()
        return "ok"
    except Exception as error:  # noqa: BLE001 - the error is the result
        return f"{type(error).__name__}: {str(error)[:100]}"


@dataclass
class RedisInstance:
    name: str
    server: Server
    port: int
    password: str | None

    def client(self, db: int = 0):
        import redis
        return redis.Redis(host="127.0.0.1", port=self.port, db=db, password=self.password,
                           socket_timeout=10)


def bench_redis_layout(layout: str, note: str, cache: RedisInstance, broker: RedisInstance,
                       fill_factor: float, deadline: Deadline) -> dict:
    broker_client = broker.client(BROKER_DB)
    cache_client = cache.client(0)
    load_broker_state(broker_client)
    before = broker_state(broker_client)
    maxmemory = int(cache_client.config_get("maxmemory")["maxmemory"])
    target_bytes = int(fill_factor * maxmemory)
    value = b"v" * CACHE_VALUE
    written = errors = attempted = 0
    first_error = None
    # Bounded by bytes, by a key count and by the clock.
    max_keys = target_bytes // CACHE_VALUE + CACHE_BATCH
    while written < target_bytes and attempted < max_keys and deadline.left() > 10:
        pipe = cache_client.pipeline(transaction=False)
        for index in range(attempted, attempted + CACHE_BATCH):
            pipe.set(f"cache:workflow:{index}", value, ex=3600)  # Dify's cache keys carry TTLs
        attempted += CACHE_BATCH
        for reply in pipe.execute(raise_on_error=False):
            if isinstance(reply, Exception):
                errors += 1
                first_error = first_error or str(reply)[:120]
            else:
                written += CACHE_VALUE
    after = broker_state(broker_client)
    survived = {key: after[key] == before[key] for key in BROKER_KEYS}
    # Can Celery still use its broker once the cache is full? A producer keeps publishing
    # (LPUSH, one task message each); kombu reads queue sizes with LLEN inside MULTI/EXEC (a
    # transaction pipeline). One message alone may still fit in what the cache's last pipeline
    # left free, so send a few hundred and count.
    published = 0
    publish = "ok"
    for index in range(PUBLISHES_AFTER_FILL):
        outcome = try_command(lambda: broker_client.lpush("celery", kombu_message(100_000 + index)))
        if outcome == "ok":
            published += 1
        elif publish == "ok":
            publish = outcome

    # A refused write's request is freed after the refusal, so a store that refused the last
    # publish may sit a few KiB under its limit and admit a small MULTI after all (seen once in
    # CI). A full cache is written to all the time: small cache writes top a noeviction store up
    # until INFO shows it over its limit (bounded), and the size check runs in that state.
    if cache_client.config_get("maxmemory-policy")["maxmemory-policy"] == "noeviction":
        for index in range(TOP_UP_WRITES):
            if int(cache_client.info("memory")["used_memory"]) > maxmemory:
                break
            try_command(lambda: cache_client.set(f"cache:topup:{index}", b"t" * TOP_UP_VALUE, ex=3600))
    over_limit = int(broker_client.info("memory")["used_memory"]) > int(
        broker_client.config_get("maxmemory")["maxmemory"] or 0) > 0

    def multi_llen():
        with broker_client.pipeline(transaction=True) as pipe:
            pipe.llen("celery")
            pipe.execute()
    size_check = try_command(multi_llen)
    instances = {}
    for instance in {cache.name: cache, broker.name: broker}.values():
        info = instance.client().info()
        instances[instance.name] = {
            "maxmemory_mib": mib(int(info["maxmemory"])), "policy": info["maxmemory_policy"],
            "used_memory_mib": mib(int(info["used_memory"])), "evicted_keys": int(info["evicted_keys"]),
        }
    return {
        "layout": layout, "note": note, "cache_maxmemory_mib": mib(maxmemory),
        "cache_attempted_mib": mib(attempted * CACHE_VALUE), "cache_written_mib": mib(written),
        "cache_write_errors": errors, "first_cache_error": first_error,
        "evicted_keys": sum(item["evicted_keys"] for item in instances.values()),
        "broker_before": before, "broker_after": after, "broker_survived": survived,
        "broker_all_survived": all(survived.values()),
        "published_after_fill": published, "publishes_after_fill": PUBLISHES_AFTER_FILL,
        "publish_after_fill": publish, "multi_llen_after_fill": size_check,
        "broker_over_limit_at_size_check": over_limit,
        "instances": instances,
    }


@contextmanager
def redis_server(name: str, conf_text: str, password: str | None, binary: str):
    with server_dir(f"bench-{name}", None) as tmp:
        port = free_port()
        conf_text = conf_text.replace("{PORT}", str(port)).replace("{DIR}", str(tmp))
        conf_path = write_file(tmp / "redis.conf", conf_text, 0o600, None)
        server = Server(name, [binary, str(conf_path)], workdir=tmp, env=base_env(tmp))
        instance = RedisInstance(name, server, port, password)
        with server.running(lambda: instance.client().ping(), timeout=START_TIMEOUT_S, what=f"redis {name}"):
            yield instance


def bench_redis(profile: RedisProfile, deadline: Deadline, log) -> dict:
    require_module("redis", "redis")
    binary = require_executable("redis-server", "redis-server")
    stack = rendered_stack()
    plan, files, env = stack.plan, stack.files, stack.env

    def rendered(path: str) -> str:
        return relocate(files[path].content, path, {
            "bind 0.0.0.0": "bind 127.0.0.1", "port 6379": "port {PORT}", "dir /data": "dir {DIR}"})

    # One instance for both jobs, as upstream runs it, given the memory of edgefit's two
    # (cache + broker maxmemory) so the layouts compare at the same total.
    single_mib = plan.redis.maxmemory_mib + plan.redis_broker.maxmemory_mib

    def single(policy: str) -> str:
        return (f"bind 127.0.0.1\nport {{PORT}}\ndir {{DIR}}\nprotected-mode yes\nsave \"\"\nappendonly no\n"
                f"maxmemory {single_mib}mb\nmaxmemory-policy {policy}\nmaxmemory-samples 5\nlogfile \"\"\n")

    layouts = []
    for policy, note in (("allkeys-lru", "one Redis for cache + broker (upstream's layout) with a maxmemory"),
                         ("noeviction", "reference: one Redis, noeviction (Redis's default policy)")):
        layout = f"single {policy}"
        with redis_server(f"redis-single-{policy}", single(policy), None, binary) as one:
            result = bench_redis_layout(layout, note, one, one, profile.fill_factor, deadline)
        layouts.append(result)
        log(f"redis: {layout}: broker survived {result['broker_survived']}, evicted {result['evicted_keys']}, "
            f"cache write errors {result['cache_write_errors']}")
    with ExitStack() as stack:
        cache = stack.enter_context(redis_server("redis-cache", rendered("conf/redis/redis.conf"),
                                                 env["REDIS_PASSWORD"], binary))
        broker = stack.enter_context(redis_server("redis-broker", rendered("conf/redis-broker/redis.conf"),
                                                  url_password(env["CELERY_BROKER_URL"]), binary))
        result = bench_redis_layout(
            "edgefit two", f"rendered {PRESET} cache ({plan.redis.maxmemory_policy}) + broker "
            f"({plan.redis_broker.maxmemory_policy})", cache, broker, profile.fill_factor, deadline)
    layouts.append(result)
    log(f"redis: edgefit two: broker survived {result['broker_survived']}, evicted {result['evicted_keys']}, "
        f"cache write errors {result['cache_write_errors']}")
    return {"layouts": layouts, "cache_value_bytes": CACHE_VALUE, "queue_messages": QUEUE_MESSAGES,
            "fill_factor": profile.fill_factor}




def report(result: dict) -> str:
    rd = result["redis"]
    out = [f"Redis: broker state ({rd['queue_messages']} task messages) in, then cache writes "
           f"{rd['fill_factor']:g}x past the cache's maxmemory ({rd['cache_value_bytes'] // 1024} KiB values)"]
    rows = []
    for layout in rd["layouts"]:
        s = layout["broker_survived"]
        rows.append([layout["layout"], layout["cache_maxmemory_mib"], layout["cache_attempted_mib"],
                     layout["cache_write_errors"], layout["evicted_keys"],
                     "kept" if s["_kombu.binding.celery"] else "LOST",
                     f"{layout['broker_after']['celery']}/{layout['broker_before']['celery']}",
                     "kept" if s["unacked"] else "LOST",
                     f"{layout['published_after_fill']}/{layout['publishes_after_fill']}",
                     "ok" if layout["multi_llen_after_fill"] == "ok" else "FAILS"])
    out.append(table(["layout", "maxmem MiB", "cache MiB sent", "write errors", "evicted",
                      "binding", "celery list", "unacked", "publishes ok", "MULTI LLEN"], rows))
    for layout in rd["layouts"]:
        for what in ("first_cache_error", "publish_after_fill", "multi_llen_after_fill"):
            if layout[what] and layout[what] != "ok":
                out.append(f"  {layout['layout']}: {what}: {layout[what]}")
    return "\n".join(out)


def run(profile: RedisProfile, deadline: Deadline, log) -> dict:
    return {"preset": PRESET, "redis": bench_redis(profile, deadline, log)}


if __name__ == "__main__":
    sys.exit(main(__doc__, PROFILES, run, report, versions=server_versions))
