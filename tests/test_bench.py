"""The server benches' claims, regress-tested: `bench/postgres_pool.py --quick --json` and
`bench/redis_policy.py --quick --json` run the real servers once each and the structure of their
results is asserted here - who refuses clients and why, which broker keys survive - never a
timing or a throughput.

~40 s: one initdb, a few 2-4 s pgbench runs at 50 and 200 clients, three Redis fills.
"""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from edgefit.plan import PRESETS, HostSize, Options, make_plan
from servers_helpers import missing, postgres_programs, require_executable, require_module

pytestmark = pytest.mark.servers

REPO = Path(__file__).resolve().parents[1]
EXIT_MISSING_TOOL = 77


def run_bench(script: str, out: Path) -> dict:
    """Run one bench command with --quick --json; its results, after checking it cleaned up."""
    tmp = Path(tempfile.gettempdir())
    before = set(tmp.glob("edgefit-bench-*"))
    result = subprocess.run([sys.executable, str(REPO / "bench" / script), "--quick", "--json", str(out)],
                            cwd=REPO, capture_output=True, text=True, timeout=240)
    if result.returncode == EXIT_MISSING_TOOL:
        missing(result.stderr.strip())
    assert result.returncode == 0, f"the bench failed:\n{result.stdout}\n{result.stderr}"
    print(result.stdout)  # the table, shown with -s or on failure
    left_over = set(tmp.glob("edgefit-bench-*")) - before
    assert not left_over, f"the bench left its temporary directories behind: {sorted(left_over)}"
    return json.loads(out.read_text())


@pytest.fixture(scope="module")
def pg_bench(tmp_path_factory):
    """bench/postgres_pool.py's results."""
    postgres_programs()
    return run_bench("postgres_pool.py", tmp_path_factory.mktemp("bench") / "postgres.json")


@pytest.fixture(scope="module")
def redis_bench(tmp_path_factory):
    """bench/redis_policy.py's results."""
    require_executable("redis-server", "redis-server")
    require_module("redis", "redis")
    return run_bench("redis_policy.py", tmp_path_factory.mktemp("bench") / "redis.json")


def runs_by_cell(data: dict) -> dict:
    return {(run["config"], run["mode"], run["clients"]): run for run in data["postgres"]["runs"]}


def planned_max_client_conn(data: dict) -> int:
    preset = data["preset"]
    return make_plan(HostSize(*PRESETS[preset]), Options()).pgbouncer.max_client_conn


@pytest.mark.parametrize("mode", ["select-only", "tpc-b"])
def test_upstream_postgres_refuses_200_clients(pg_bench, mode):
    runs = runs_by_cell(pg_bench)
    control = runs[("upstream", mode, 50)]
    assert control["ok"], control  # the same server takes 50 clients without an error
    refused = runs[("upstream", mode, 200)]
    assert not refused["ok"]
    assert refused["too_many_clients"] > 0, refused  # "FATAL: sorry, too many clients already"
    assert refused["transactions"] == 0, refused


@pytest.mark.parametrize("mode", ["select-only", "tpc-b"])
def test_edgefit_pooling_takes_200_clients_without_errors(pg_bench, mode):
    runs = runs_by_cell(pg_bench)
    assert planned_max_client_conn(pg_bench) >= 200  # the plan's floor (MIN_MAX_CLIENT_CONN): no edit needed
    for clients in (50, 200):
        run = runs[("edgefit", mode, clients)]
        assert run["ok"], run
        assert run["exit_code"] == 0 and run["errors"] == 0 and run["failed_transactions"] == 0, run
        assert run["too_many_clients"] == 0 and run["pooler_refusals"] == 0 and run["aborted_clients"] == 0, run
        assert run["transactions"] > 0, run


@pytest.mark.parametrize("mode", ["select-only", "tpc-b"])
def test_edgefit_as_rendered_refuses_only_above_its_max_client_conn(pg_bench, mode):
    """Above the plan's max_client_conn the rendered PgBouncer says no itself; Postgres never
    sees more clients than its pool, so it never says "too many clients"."""
    planned = planned_max_client_conn(pg_bench)
    run = runs_by_cell(pg_bench)[("edgefit", mode, 200)]
    assert run["too_many_clients"] == 0, run
    if 200 > planned:
        assert run["pooler_refusals"] > 0 and not run["ok"], run
    else:
        assert run["ok"], run


def test_pgbouncer_keeps_postgres_within_its_server_pool(pg_bench):
    plan = make_plan(HostSize(*PRESETS[pg_bench["preset"]]), Options())
    runs = runs_by_cell(pg_bench)
    for mode in ("select-only", "tpc-b"):
        assert runs[("upstream", mode, 50)]["peak_backends"] > plan.pgbouncer.max_db_connections
        for clients in (50, 200):
            run = runs[("edgefit", mode, clients)]
            assert 0 < run["peak_backends"] <= plan.pgbouncer.max_db_connections, run


def test_edgefit_postgres_uses_less_memory_than_upstream(pg_bench):
    runs = runs_by_cell(pg_bench)
    for mode in ("select-only", "tpc-b"):
        upstream, edgefit = runs[("upstream", mode, 50)], runs[("edgefit", mode, 50)]
        # PSS of postgres (+ pgbouncer): 12 pooled backends against 50 direct ones.
        assert 0 < edgefit["peak_pss_mib"] < upstream["peak_pss_mib"], (edgefit, upstream)


def layouts(data: dict) -> dict:
    return {layout["layout"]: layout for layout in data["redis"]["layouts"]}


def test_broker_keys_survive_in_edgefits_two_redis_instances(redis_bench):
    layout = layouts(redis_bench)["edgefit two"]
    assert layout["broker_all_survived"], layout["broker_survived"]
    assert layout["broker_after"]["celery"] == layout["broker_before"]["celery"] == 1000
    assert layout["cache_write_errors"] == 0, layout["first_cache_error"]
    assert layout["evicted_keys"] > 0  # the cache did fill and evict
    assert layout["published_after_fill"] == layout["publishes_after_fill"], layout["publish_after_fill"]
    assert layout["multi_llen_after_fill"] == "ok"
    policies = {item["policy"] for item in layout["instances"].values()}
    assert policies == {"allkeys-lru", "noeviction"}


def test_one_redis_cannot_be_both_cache_and_broker(redis_bench):
    by_layout = layouts(redis_bench)
    lru = by_layout["single allkeys-lru"]
    assert lru["evicted_keys"] > 0 and lru["cache_write_errors"] == 0
    assert not lru["broker_all_survived"], "allkeys-lru evicted none of the broker's keys"
    keeps = by_layout["single noeviction"]
    assert keeps["broker_all_survived"]
    assert keeps["cache_write_errors"] > 0  # "OOM command not allowed when used memory > 'maxmemory'"
    assert keeps["published_after_fill"] < keeps["publishes_after_fill"]  # Celery cannot publish
    assert keeps["broker_over_limit_at_size_check"]
    assert keeps["multi_llen_after_fill"] != "ok"  # kombu's LLEN inside MULTI is refused too
