"""edgefit's command line: plan, render, verify, backup, restore, rebuild, rollback, secret.

Exit codes: 0 fine, 1 a check or a step failed, 2 bad input, a refused host or a host too small
(one sentence on stderr, never a traceback).
"""

from __future__ import annotations

import argparse
import json
import os
import stat
import sys
from pathlib import Path

from edgefit import checks
from edgefit import plan as planning
from edgefit.images import ImageError
from edgefit.render import render_stack, write_stack
from edgefit.safe_write import WriteError, check_directory
from edgefit.secrets import SecretsError, load_or_create
from edgefit.settings import SETTINGS, SettingsError, check_values, options_from
from edgefit.units import SizeError, parse_gib, parse_mib

EXIT_BAD_INPUT = 2


class UsageError(Exception):
    """Input the user can fix; printed as one line."""


class OneLineErrorParser(argparse.ArgumentParser):
    """argparse, but a usage error is one line (exit 2) instead of the whole usage block."""

    def error(self, message: str):
        self.exit(EXIT_BAD_INPUT, f"edgefit: error: {message} (see {self.prog} --help)\n")


def _size_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("host size (from live facts when deploying)")
    group.add_argument("--cpus", type=int, help="CPU cores of the host")
    group.add_argument("--memory", help="host memory, e.g. 4G, 8GiB, 3900M")
    group.add_argument("--disk", help="data disk size, e.g. 40G (optional; WAL and minimums follow it)")
    group.add_argument("--preset", choices=sorted(planning.PRESETS),
                       help="a named size instead of --cpus/--memory")
    choice = parser.add_argument_group("stack choices (the edgefit_* settings of the same names)")
    for setting in SETTINGS:
        if not setting.cli:
            continue
        repeatable = setting.name == "edgefit_images"
        choice.add_argument(setting.cli, dest=setting.name, default=[] if repeatable else None,
                            action="append" if repeatable else "store",
                            metavar=setting.metavar,
                            help=f"{setting.doc} ({setting.name}; default {_default_text(setting.default)})"
                                 + ("; repeatable" if repeatable else ""))


def _default_text(value) -> str:
    if value is None:
        return "none"
    if isinstance(value, (frozenset, set, list, tuple, dict)) and not value:
        return "none"
    return str(value)


def _cli_images(items: list[str]) -> dict[str, str]:
    images = {}
    for item in items:
        service, sep, ref = item.partition("=")
        if not sep or not service.strip() or not ref.strip():
            raise UsageError(f"--image {item!r}: expected SERVICE=REF, e.g. db=registry.local/pgvector:0.8.0-pg15")
        images[service.strip()] = ref.strip()
    return images


def _int_cpus(value: int | None) -> int:
    if value is None:
        raise UsageError("give --cpus N and --memory SIZE, or --preset NAME")
    if value < 1:
        raise UsageError(f"--cpus must be 1 or more, got {value}")
    return value


def plan_from_args(args: argparse.Namespace) -> planning.Plan:
    if args.preset:
        cpus, memory = planning.PRESETS[args.preset]
        if args.cpus is not None or args.memory is not None:
            raise UsageError("give either --preset or --cpus/--memory, not both")
    else:
        cpus = _int_cpus(args.cpus)
        if args.memory is None:
            raise UsageError("give --memory SIZE (e.g. 4G) with --cpus")
        memory = parse_mib(args.memory)
    disk = parse_gib(args.disk) if args.disk else None
    given = {setting.name: getattr(args, setting.name) for setting in SETTINGS if setting.cli}
    given["edgefit_images"] = _cli_images(given["edgefit_images"]) or None
    try:
        values = check_values(given)
    except SettingsError as error:
        flags = {setting.name: setting.cli for setting in SETTINGS if setting.cli}
        raise UsageError(_with_flags(str(error), flags)) from None
    return planning.make_plan(planning.HostSize(cpus, memory, disk), options_from(values))


def _with_flags(message: str, flags: dict[str, str]) -> str:
    """Name the options the user typed, not the inventory settings behind them."""
    for name, flag in flags.items():
        message = message.replace(name, flag)
    return message


def format_plan(plan: planning.Plan) -> str:
    """The budget ledger a person reads at a glance."""
    host = plan.host
    disk = f", {host.disk_gib} GiB disk" if host.disk_gib else ""
    lines = [
        f"edgefit plan: {host.cpus} cores, {host.memory_mib} MiB{disk} (nearest preset {plan.preset})",
        "",
        f"{'service':<14}{'mem limit':>11}{'cpus':>7}  image",
    ]
    for name, service in plan.services.items():
        lines.append(f"{name:<14}{service.mem_limit_mib:>7} MiB{service.cpus:>7g}  {service.image}")
    used = plan.total_mem_limit_mib + plan.reserve_mib
    lines += [
        f"{'':-<14}{'':->11}",
        f"{'containers':<14}{plan.total_mem_limit_mib:>7} MiB",
        f"{'host reserve':<14}{plan.reserve_mib:>7} MiB   kernel, Docker, sshd, page cache",
        f"{'total':<14}{used:>7} MiB   of {host.memory_mib} MiB"
        + (f"; swap file {plan.swap_mib} MiB for host daemons" if plan.swap_mib else ""),
        "",
        f"postgres   max_connections {plan.postgres.max_connections}, shared_buffers {plan.postgres.shared_buffers_mib} MiB, "
        f"work_mem {plan.postgres.work_mem_mib} MiB, effective_cache_size {plan.postgres.effective_cache_size_mib} MiB",
        f"pgbouncer  {plan.pgbouncer.pool_mode} mode, default_pool_size {plan.pgbouncer.default_pool_size}, "
        f"max_client_conn {plan.pgbouncer.max_client_conn}",
        f"redis      cache maxmemory {plan.redis.maxmemory_mib} MiB {plan.redis.maxmemory_policy}; "
        f"broker maxmemory {plan.redis_broker.maxmemory_mib} MiB {plan.redis_broker.maxmemory_policy}",
        f"dify       gunicorn workers {plan.dify.server_worker_amount}, celery concurrency {plan.dify.celery_worker_amount}, "
        f"graph engine workers {plan.dify.graph_engine_max_workers}, vector store {plan.vector_store}",
        "           SQLAlchemy pool per process: "
        + ", ".join(f"{role} {pool.pool_size}+{pool.max_overflow} x{pool.processes}"
                    for role, pool in plan.dify.pools.items() if pool.processes),
        f"python     gc thresholds {','.join(map(str, plan.dify.gc_threshold))}, MALLOC_ARENA_MAX={plan.dify.malloc_arena_max}, "
        f"gunicorn {plan.dify.gunicorn_cmd_args or 'without recycling (no --max-requests)'}",
        f"worker     warm restart when its anonymous memory passes {plan.dify.worker_restart_anon_mib} MiB "
        f"(checked every {plan.dify.worker_watchdog_interval_s:g} s); documents up to "
        f"{plan.dify.upload_file_size_limit_mb} MB (UPLOAD_FILE_SIZE_LIMIT)",
    ]
    if "web" in plan.services:
        lines.append(f"web        {plan.dify.web_pm2_instances} node instance(s), NODE_OPTIONS={plan.dify.web_node_options}")
    if plan.tradeoffs:
        lines += ["", "trade-offs to fit this host:"] + [f"  - {note}" for note in plan.tradeoffs]
    return "\n".join(lines)


def command_plan(args: argparse.Namespace) -> int:
    plan = plan_from_args(args)
    if args.json:
        print(json.dumps(plan.to_dict(), indent=2))
    else:
        print(format_plan(plan))
    return 0


def _secrets_mode(path: Path) -> str:
    mode = stat.S_IMODE(path.stat().st_mode)
    warning = ": readable by others, chmod 600 it" if mode & 0o077 else ""
    return f"mode {mode:04o}{warning}"


def command_render(args: argparse.Namespace) -> int:
    # Every place is checked before any work, so bad input writes nothing at all.
    out = check_directory(args.out, "--out")
    secrets_path = Path(args.secrets) if args.secrets else out / "secrets.env"
    if args.secrets:
        if secrets_path.is_dir():
            raise UsageError(f"--secrets {secrets_path} is a directory; give the env file itself")
        if not os.path.lexists(secrets_path):
            check_directory(secrets_path.parent, "--secrets directory")  # it will be made there
    plan = plan_from_args(args)
    secrets = load_or_create(secrets_path)
    written = write_stack(render_stack(plan, secrets), out)
    print(f"rendered {len(written)} files for a {plan.host.cpus}-core, {plan.host.memory_mib} MiB host into {out}/")
    for path in written:
        print(f"  {path.relative_to(out)}")
    print(f"secrets: {secrets_path} ({_secrets_mode(secrets_path)}; values are never printed)")
    return 0


def _seconds(text: str) -> float:
    """'30', '30s', '5m', '1h' -> seconds."""
    units = {"s": 1, "m": 60, "min": 60, "h": 3600}
    number = text.strip().lower()
    for suffix in ("min", "s", "m", "h"):
        if number.endswith(suffix):
            number, factor = number[: -len(suffix)], units[suffix]
            break
    else:
        factor = 1
    try:
        value = float(number) * factor
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a duration such as 30, 30s, 5m or 1h") from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"{text!r} must be more than 0 seconds")
    return value


def command_verify(args: argparse.Namespace) -> int:
    if not 1 <= args.window <= 600:
        raise UsageError(f"--window must be between 1 and 600 seconds, got {args.window:g}")
    interval = args.interval if args.interval is not None else min(5.0, max(1.0, args.window / 6))
    if not 0.5 <= interval <= args.window:
        raise UsageError(f"--interval must be between 0.5 s and the window ({args.window:g} s), got {interval:g}")
    from edgefit.remote import VerifyOptions, VerifyUsageError, run_verify  # gevent: only when verifying

    options = VerifyOptions(window=args.window, interval=interval, events_since=args.since, strict=args.strict)
    try:
        return run_verify(args.inventory, args.limit, options, json_file=args.json)
    except VerifyUsageError as error:
        raise UsageError(str(error)) from None


def _lifecycle_call(function, *arguments) -> int:
    """backup/restore/rebuild: Refused is exit 2, a failed step exit 1, both one sentence."""
    from edgefit import lifecycle  # gevent and pyinfra: only when these commands run

    try:
        result = function(lifecycle, *arguments)
    except lifecycle.Refused as error:
        raise UsageError(str(error)) from None
    except lifecycle.StepFailed as error:
        print(f"edgefit: failed: {error}", file=sys.stderr)
        return 1
    return result if isinstance(result, int) else 0  # backup returns where its copies went


def _existing_inventory(args: argparse.Namespace) -> None:
    if args.inventory.endswith(".py") and not Path(args.inventory).is_file():
        raise UsageError(f"inventory {args.inventory} does not exist")


def command_backup(args: argparse.Namespace) -> int:
    if args.keep < 1:
        raise UsageError(f"--keep must be 1 or more, got {args.keep}")
    _existing_inventory(args)
    return _lifecycle_call(lambda lc: lc.backup(args.inventory, args.limit, Path(args.to), args.keep))


def command_restore(args: argparse.Namespace) -> int:
    source = Path(args.source)
    if not source.is_dir():
        raise UsageError(f"--from {source} is not a directory (a backup is backups/HOST/STAMP)")
    _existing_inventory(args)
    return _lifecycle_call(lambda lc: lc.restore(args.inventory, args.limit, source, args.yes))


def command_rebuild(args: argparse.Namespace) -> int:
    _existing_inventory(args)
    return _lifecycle_call(lambda lc: lc.rebuild(args.inventory, args.limit, Path(args.to), args.fresh, args.yes))


def command_rollback(args: argparse.Namespace) -> int:
    _existing_inventory(args)
    return _lifecycle_call(lambda lc: lc.rollback(args.inventory, args.limit, args.yes))


def command_secret(args: argparse.Namespace) -> int:
    _existing_inventory(args)
    return _lifecycle_call(lambda lc: lc.show_secret(args.inventory, args.limit, args.name, args.show_any))


def _host_arguments(parser: argparse.ArgumentParser, to: bool = False, yes: bool = False) -> None:
    parser.add_argument("inventory", metavar="INVENTORY", help="pyinfra inventory, e.g. inventory/staging.py")
    parser.add_argument("--limit", action="append", metavar="HOST",
                        help="only this host or group (glob patterns as pyinfra's --limit); repeatable")
    if to:
        parser.add_argument("--to", default="backups", metavar="DIR",
                            help="where backups land on this machine (default backups/, as backups/HOST/STAMP/)")
    if yes:
        parser.add_argument("--yes", action="store_true", help="do not ask for confirmation")


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineErrorParser(
        prog="edgefit",
        description="Fit the Dify stack onto a small host: size it, render its configs, verify its memory.",
        epilog="Deploy with: pyinfra inventory/edge.py deploy.py   (see README.md)",
    )
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=OneLineErrorParser)
    commands.required = True

    plan_parser = commands.add_parser(
        "plan", help="show the memory budget and settings for a host size",
        description="Show the budget ledger for a host: each service's memory limit and CPU ceiling, "
                    "the host reserve, and the Postgres, PgBouncer, Redis and Dify settings that follow.")
    _size_arguments(plan_parser)
    plan_parser.add_argument("--json", action="store_true", help="print the plan as JSON for machines")
    plan_parser.set_defaults(handler=command_plan)

    render_parser = commands.add_parser(
        "render", help="write every config file of the stack for a host size",
        description="Render docker-compose.yml, .env, redis/postgres/pgbouncer/nginx configs, daemon.json, "
                    "sysctl and the GC hook into a directory. Files under host/ belong at the host's root.")
    _size_arguments(render_parser)
    render_parser.add_argument("--out", required=True, help="directory to write into")
    render_parser.add_argument("--secrets", help="env file of secrets to use (default OUT/secrets.env, created "
                                                 "with fresh random values, mode 0600, when absent)")
    render_parser.set_defaults(handler=command_render)

    verify_parser = commands.add_parser(
        "verify", help="check that each host's stack is healthy and within its memory budget",
        description="Watch each host's stack for a window of seconds (cgroup v2 memory and CPU per container, "
                    "MemAvailable, swap, memory pressure, OOM kills, restarts, healthchecks) and compare it with "
                    "the plan recomputed from the host's facts and data, as the deploy made it: budgets, memory "
                    "limits, hand-edited configs, Redis, Postgres and GC settings. Connects through pyinfra "
                    "(same hosts, keys and parallelism as the deploy).",
        epilog="Exit codes: 0 every host healthy and within budget; 1 a host is not (the output names the "
               "service and the problem); 2 a host could not be checked (unreachable, no stack deployed) "
               "and none failed.")
    verify_parser.add_argument("inventory", metavar="INVENTORY", help="pyinfra inventory, e.g. inventory/edge.py")
    verify_parser.add_argument("--limit", action="append", metavar="HOST",
                               help="only this host or group (glob patterns as pyinfra's --limit); repeatable")
    verify_parser.add_argument("--window", type=_seconds, default=30.0, metavar="SECONDS",
                               help="how long to watch each host (default 30; hosts are checked in parallel)")
    verify_parser.add_argument("--interval", type=_seconds, metavar="SECONDS",
                               help="seconds between samples (default: window/6, between 1 and 5)")
    verify_parser.add_argument("--since", type=_seconds, default=3600.0, metavar="DURATION",
                               help="how far back OOM kills and crashes count, e.g. 15m, 1h (default 1h)")
    verify_parser.add_argument("--json", metavar="FILE", help="also write the full result as JSON to FILE")
    verify_parser.add_argument("--strict", action="store_true", help="treat warnings as failures (exit 1)")
    verify_parser.set_defaults(handler=command_verify)

    backup_parser = commands.add_parser(
        "backup", help="back up each host's stack and copy it to this machine",
        description="Per host, a consistent backup made on the host by backup.py (pg_dump -Fc of every "
                    "database, storage, plugin daemon data, the broker Redis' snapshot, the secrets file, a "
                    "manifest with sha256 of each file) under /var/backups/edgefit/STAMP/, copied to "
                    "TO/HOST/STAMP/ here (0700/0600) and its checksums verified. Secret values are never printed.")
    _host_arguments(backup_parser, to=True)
    backup_parser.add_argument("--keep", type=int, default=3, metavar="N",
                               help="complete backups kept on each host; older ones are removed (default 3)")
    backup_parser.set_defaults(handler=command_backup)

    restore_parser = commands.add_parser(
        "restore", help="put a backup onto deployed hosts, then verify",
        description="Checks every checksum of the backup first (a damaged one is refused before anything is "
                    "touched), then per host: restore.py (stop the stack, keep the current data under "
                    "DATA_ROOT/.pre-restore-TIME/, restore databases, files, broker Redis and secrets), deploy.py "
                    "(renders the restored secrets with the host's own plan, starts the stack) and verify.")
    _host_arguments(restore_parser, yes=True)
    restore_parser.add_argument("--from", dest="source", required=True, metavar="BACKUP_DIR",
                                help="a backup on this machine, e.g. backups/edge-small/20250101T120000Z")
    restore_parser.set_defaults(handler=command_restore)

    rebuild_parser = commands.add_parser(
        "rebuild", help="back up, tear down, deploy from scratch and restore staging hosts",
        description="Only for staging hosts (in a `staging` group or edgefit_role = \"staging\"); any other host "
                    "is refused before anything is touched. Per host: backup (copied here), docker compose down and "
                    "the rendered files removed (with --fresh, then the data), deploy.py from scratch, the backup "
                    "restored (unless --fresh), verify. Progress is kept in TO/HOST/rebuild-state.json, so a re-run "
                    "after an interruption reuses the backup it took.",
        epilog="Exit codes: 0 rebuilt and verified; 1 a step or verify failed; 2 refused (not staging, bad input).")
    _host_arguments(rebuild_parser, to=True, yes=True)
    rebuild_parser.add_argument("--fresh", action="store_true",
                                help="start with empty data (deleted only after the backup reached this machine)")
    rebuild_parser.set_defaults(handler=command_rebuild)

    rollback_parser = commands.add_parser(
        "rollback", help="return hosts to before their last upgrade: previous images and the pre-upgrade backup",
        description="Per host, one at a time: the backup the deploy took before the last upgrade is restored (the "
                    "current data kept aside under DATA_ROOT/.pre-restore-TIME/), the compose definition and plan of "
                    "record the upgrade replaced are put back, the stack starts and its health is waited for; then "
                    "verify. A failed host stops the run before the next. Change the inventory's release afterwards: "
                    "the next deploy would upgrade again.",
        epilog="Exit codes: 0 rolled back and verified; 1 a host has no upgrade to roll back, or a step or verify "
               "failed; 2 bad input or not confirmed.")
    _host_arguments(rollback_parser, yes=True)
    rollback_parser.set_defaults(handler=command_rollback)

    secret_parser = commands.add_parser(
        "secret", help="print one secret of one host for its operator (init_password by default)",
        description="Read one value from the host's /etc/edgefit/secrets.env and print it alone on stdout. "
                    "Only init_password (what Dify's /install asks for before the admin account is made) is "
                    "shown unless --show-any is given. Only that one line crosses the connection.",
        epilog="Exit codes: 0 printed; 1 the host has no such value or could not be reached; 2 bad input.")
    _host_arguments(secret_parser)
    secret_parser.add_argument("name", metavar="NAME", help="the secret, e.g. init_password")
    secret_parser.add_argument("--show-any", action="store_true",
                               help="allow any secret (SECRET_KEY, DB_PASSWORD, ...), not only init_password")
    secret_parser.set_defaults(handler=command_secret)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return args.handler(args)
    except planning.HostTooSmall as error:
        print(f"edgefit: {error}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except (UsageError, SizeError, planning.PlanError, ImageError, SecretsError, WriteError,
            checks.CheckError) as error:
        print(f"edgefit: error: {error}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except OSError as error:  # a place that changed after its check: still one sentence, never a traceback
        where = f" {error.filename}" if error.filename else ""
        print(f"edgefit: error: cannot write or read{where}: {(error.strerror or str(error)).lower()}", file=sys.stderr)
        return EXIT_BAD_INPUT


if __name__ == "__main__":
    sys.exit(main())
