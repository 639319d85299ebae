"""Upgrades with a health gate and rollback (issue 13): what counts as an upgrade, the refusal of
a downgrade, the settings, the gate's sentences, the host-side state, `edgefit rollback`'s
arguments and the stand-in releases the VM test upgrades to (tests/test_upgrade_vm.py)."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

from edgefit import cli, host_backup, lifecycle
from edgefit.converge import decide
from edgefit.facts import HostState
from edgefit.plan import HostSize, Options, make_plan
from edgefit.render import render_stack
from edgefit.secrets import Secrets
from edgefit.settings import SettingsError, read_settings
from edgefit.upgrade import (UPGRADED_SERVICES, UpgradeRefused, check_not_downgrade, downgrades, failing_services,
                             failure_message, gate_failures, image_changes, version_of)
from tests.test_converge import at_plan

STANDIN = Path(__file__).resolve().parent / "images" / "standin" / "dify_standin.py"
OLD, NEW = "langgenius/dify-api:1.12.1", "langgenius/dify-api:1.13.3"


@pytest.fixture(scope="module")
def stack():
    plan = make_plan(HostSize(2, 4096, 40, 16), Options(data_disk="/dev/vdb"))
    return plan, render_stack(plan, Secrets.generate())


def planned_images(plan) -> dict[str, str]:
    return {name: service.image for name, service in plan.services.items()}


# --- what is an upgrade -----------------------------------------------------------------------

def test_a_host_at_its_plan_with_its_record_is_no_upgrade_and_no_change(stack):
    plan, rendered = stack
    live = {**at_plan(plan, rendered), "record_images": planned_images(plan)}
    changes = decide(plan, rendered, live)
    assert changes.upgrade == {} and not changes.wait_healthy and not changes.upload


def test_a_new_dify_release_is_an_upgrade_of_the_services_whose_image_changes(stack):
    plan, rendered = stack
    previous = {**planned_images(plan), "api": OLD, "worker": OLD}
    changes = decide(plan, rendered, {**at_plan(plan, rendered), "record_images": previous})
    assert changes.upgrade == {"api": (OLD, plan.services["api"].image), "worker": (OLD, plan.services["worker"].image)}


def test_a_first_deploy_or_a_new_database_image_is_no_upgrade(stack):
    plan, rendered = stack
    assert decide(plan, rendered, {**at_plan(plan, rendered), "record_images": None}).upgrade == {}
    assert image_changes(None, {"api": NEW}) == {}
    assert image_changes({"db": "pgvector/pgvector:0.8.0-pg15"}, {"db": "pgvector/pgvector:0.8.1-pg15"}) == {}
    assert set(UPGRADED_SERVICES) == {"api", "worker", "worker_beat", "web", "plugin_daemon", "sandbox"}


def test_an_upgrade_of_a_stopped_stack_is_refused_with_the_way_forward(stack):
    from edgefit.upgrade import check_can_back_up

    plan, rendered = stack
    live = {**at_plan(plan, rendered), "record_images": {**planned_images(plan), "api": OLD}}
    live["snapshot"]["containers"] = [c for c in live["snapshot"]["containers"] if c["end"]["service"] != "db"]
    changes = decide(plan, rendered, live)
    assert changes.upgrade and changes.down == ["db"]
    with pytest.raises(UpgradeRefused) as refused:
        check_can_back_up(changes.upgrade, changes.down)
    assert "db is not running; deploy the current release first" in str(refused.value)
    check_can_back_up({}, ["db"])  # no upgrade: the deploy starts it as always
    check_can_back_up(changes.upgrade, ["web"])


def test_the_plan_of_record_read_gives_its_images(tmp_path):
    record = {"plan": {"services": {"api": {"image": NEW, "mem_limit_mib": 900}}}}
    # On the host the sampler reads it (--record) and the deploy's one read hands it on.
    from edgefit import sampler
    from edgefit.sampler import record_images
    assert record_images(record) == {"api": NEW}
    assert record_images(None) is None and record_images({"plan": {}}) is None
    path = tmp_path / "plan.json"
    path.write_text(json.dumps(record))
    assert sampler.read_record_images(str(path)) == {"api": NEW}
    assert sampler.read_record_images(str(tmp_path / "missing.json")) is None
    path.write_text("{not json")
    assert sampler.read_record_images(str(path)) is None
    section = "@@EDGEFIT-SECTION@@"
    parsed = HostState().process([f"{section}snapshot", json.dumps({"record_images": {"api": NEW}})])
    assert parsed["record_images"] == {"api": NEW}
    assert HostState().process([f"{section}snapshot", json.dumps({"images": []})])["record_images"] is None


# --- downgrades -------------------------------------------------------------------------------

@pytest.mark.parametrize("ref, version", [
    (NEW, (1, 13, 3)), ("registry.lan:5000/dify-api:v1.4.0-fix", (1, 4, 0)),
    ("edgefit-test/dify-api-standin:3-broken", (3,)), ("img@sha256:" + "a" * 64, None), ("img:abc", None)])
def test_the_version_of_a_tag(ref, version):
    assert version_of(ref) == version


def test_a_downgrade_is_refused_with_the_way_back_unless_asked_for():
    changes = {"api": (NEW, OLD), "web": ("langgenius/dify-web:1.13.3", "langgenius/dify-web:1.13.3-b")}
    assert downgrades(changes) == [f"api {NEW} -> {OLD}"]
    with pytest.raises(UpgradeRefused) as refused:
        check_not_downgrade(changes, allowed=False)
    message = str(refused.value)
    assert "refusing a downgrade" in message and "edgefit rollback" in message
    assert "edgefit_allow_downgrade = True" in message and "\n" not in message
    check_not_downgrade(changes, allowed=True)
    check_not_downgrade({"api": (OLD, NEW)}, allowed=False)
    assert downgrades({"api": ("mirror.lan:5000/dify-api:1.13.3", "langgenius/dify-api:1.12.1")})  # a mirror too
    check_not_downgrade({"api": ("langgenius/dify-api:1.13.3", "lan/my-fork-api:1.0.0")}, allowed=False)


# --- settings ---------------------------------------------------------------------------------

def test_rollback_is_on_and_downgrades_off_by_default():
    settings = read_settings({})
    assert settings.rollback is True and settings.allow_downgrade is False
    settings = read_settings({"edgefit_rollback": False, "edgefit_allow_downgrade": True})
    assert settings.rollback is False and settings.allow_downgrade is True


@pytest.mark.parametrize("data, words", [
    ({"edgefit_rollback": "no"}, "edgefit_rollback: must be True or False, got 'no'"),
    ({"edgefit_allow_downgrade": 1}, "edgefit_allow_downgrade: must be True or False"),
    ({"edgefit_rolback": False}, "did you mean edgefit_rollback?"),
])
def test_upgrade_settings_are_checked(data, words):
    with pytest.raises(SettingsError, match=words.replace("?", r"\?")):
        read_settings(data)


# --- the gate's findings and sentences ----------------------------------------------------------

WAIT_OUTPUT = """not healthy and stable after 120s (edgefit_health_timeout):
api running unhealthy
web running starting
/edgefit-dify-api-1 restarts=0
--- last log lines of api
api-1  | dify-standin: this release fails after its migration
""".splitlines()


def test_the_services_the_health_wait_names_upgraded_ones_first():
    assert failing_services(WAIT_OUTPUT, ["web", "api"]) == ["api", "web"]
    assert failing_services(WAIT_OUTPUT, ["worker"]) == ["api", "web"]
    assert failing_services(["all services running and healthy"], ["api"]) == []


def test_only_failing_findings_of_upgraded_services_stop_the_gate():
    report = {"findings": [{"severity": "fail", "service": "api", "message": "api is unhealthy"},
                           {"severity": "warn", "service": "web", "message": "starting"},
                           {"severity": "fail", "service": "db", "message": "db over budget"},
                           {"severity": "fail", "service": None, "message": "a file differs"}]}
    assert [f["message"] for f in gate_failures(report, ["api", "web"])] == ["api is unhealthy"]


def test_the_failure_message_names_service_logs_rollback_and_backup():
    backup = "/srv/dify/pre-upgrade-backups/20260101T120000Z"
    logs = [f"line {n}" for n in range(30)]
    rolled = failure_message("edge-small", "api not healthy", "api", logs, backup, rolled_back=True)
    first = rolled.splitlines()[0]
    assert first.startswith("edge-small: the upgrade failed: api not healthy; it was rolled back")
    assert backup in first and "last log lines of api:" in rolled
    assert "line 29" in rolled and "line 9" not in rolled  # the last 20
    off = failure_message("edge-small", "api not healthy", "api", logs, backup, rolled_back=None)
    assert "edgefit_rollback = False" in off and "edgefit rollback INVENTORY --limit HOST" in off and backup in off
    failed = failure_message("edge-small", "x", None, [], backup, rolled_back=False)
    assert "rollback failed too" in failed and backup in failed and len(failed.splitlines()) == 1


# --- host side: state and rollback ------------------------------------------------------------

@pytest.fixture
def upgrade_dir(tmp_path, monkeypatch):
    monkeypatch.setattr(host_backup, "UPGRADE_DIR", str(tmp_path / "upgrade"))
    monkeypatch.setattr(host_backup, "UPGRADE_STATE", str(tmp_path / "upgrade" / "state.json"))
    monkeypatch.setattr(host_backup, "UPGRADE_PREVIOUS", str(tmp_path / "upgrade" / "previous"))
    return tmp_path


def test_a_rollback_without_an_upgrade_is_one_sentence_and_exit_1(upgrade_dir, capsys):
    assert host_backup.main(["rollback"]) == 1
    assert capsys.readouterr().err.strip() == "edgefit rollback: there is no upgrade to roll back on this host"
    host_backup.write_upgrade_state({"status": "rolled-back", "upgrade": "api a -> b", "backup": "/x"})
    assert host_backup.main(["rollback"]) == 1
    assert "was rolled back already" in capsys.readouterr().err
    assert oct((upgrade_dir / "upgrade" / "state.json").stat().st_mode & 0o777) == "0o600"


def test_an_unfinished_upgrade_keeps_its_backup_and_takes_no_new_one(upgrade_dir, monkeypatch):
    host_backup.write_upgrade_state({"status": "upgrading", "backup": "/data/pre-upgrade-backups/A", "upgrade": "u1"})
    monkeypatch.setattr(host_backup, "backup", lambda *a, **k: pytest.fail("a new backup over a half-upgraded host"))
    assert host_backup.pre_upgrade("h", "20260101T120000Z", "/data/pre-upgrade-backups", 2, "u2") == \
        "/data/pre-upgrade-backups/A"
    assert host_backup.read_upgrade_state()["upgrade"] == "u2"


def test_the_upgraded_mark(upgrade_dir):
    host_backup.mark_upgraded()  # no state: nothing to mark, no error
    host_backup.write_upgrade_state({"status": "upgrading", "backup": "/b"})
    host_backup.mark_upgraded()
    assert host_backup.read_upgrade_state()["status"] == "upgraded"


# --- edgefit rollback --------------------------------------------------------------------------

def inventory(tmp_path: Path) -> str:
    path = tmp_path / "two.py"
    path.write_text("hosts = [('one', {'ssh_hostname': '127.0.0.1'}), ('two', {'ssh_hostname': '127.0.0.1'})]\n")
    return str(path)


def test_rollback_arguments(tmp_path, capsys):
    assert cli.main(["rollback", str(tmp_path / "missing.py")]) == 2
    assert "does not exist" in capsys.readouterr().err
    args = cli.build_parser().parse_args(["rollback", "inv.py", "--limit", "one", "--yes"])
    assert args.limit == ["one"] and args.yes and args.handler is cli.command_rollback
    with pytest.raises(SystemExit) as bad:
        cli.main(["rollback", "inv.py", "--fresh"])
    assert bad.value.code == 2


UPGRADED = {"status": "upgraded", "upgrade": f"api {OLD} -> {NEW}", "at": "20260101T120000Z",
            "backup": "/srv/dify/pre-upgrade-backups/20260101T120000Z"}


def host_states(monkeypatch, states: dict[str, dict | None]) -> None:
    """lifecycle.host_command answers each host's `cat state.json` from states."""
    def host_command(state, host, command, timeout, stdin=None):
        assert command.startswith("cat /var/lib/edgefit/upgrade/state.json")
        return json.dumps(states[host.name]).splitlines() if states[host.name] else []
    monkeypatch.setattr(lifecycle, "host_command", host_command)


def test_what_a_rollback_will_do_is_said_first_and_nothing_to_undo_is_refused():
    from edgefit.upgrade import rollback_target

    line = rollback_target("one", UPGRADED)
    assert line.startswith(f"one: undo api {OLD} -> {NEW} (upgraded") and UPGRADED["backup"] in line
    assert rollback_target("one", {**UPGRADED, "status": "upgrading"})
    with pytest.raises(UpgradeRefused, match=r"^one has no upgrade to roll back\. Nothing was changed$"):
        rollback_target("one", None)
    with pytest.raises(UpgradeRefused, match="was rolled back already"):
        rollback_target("one", {**UPGRADED, "status": "rolled-back"})


def test_rollback_asks_first_and_changes_nothing_without_an_answer(tmp_path, monkeypatch, capsys):
    host_states(monkeypatch, {"one": UPGRADED, "two": UPGRADED})
    monkeypatch.setattr(lifecycle, "run_pyinfra", lambda *a, **k: pytest.fail("ran without confirmation"))
    assert cli.main(["rollback", inventory(tmp_path)]) == 2
    out, err = capsys.readouterr()
    assert "pass --yes" in err and out.count(": undo api") == 2


def test_rollback_of_a_host_without_an_upgrade_is_refused_before_any_host_is_touched(tmp_path, monkeypatch, capsys):
    host_states(monkeypatch, {"one": UPGRADED, "two": {**UPGRADED, "status": "rolled-back"}})
    monkeypatch.setattr(lifecycle, "run_pyinfra", lambda *a, **k: pytest.fail("touched a host"))
    assert cli.main(["rollback", inventory(tmp_path), "--yes"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("edgefit: error: two has no upgrade to roll back") and len(err.splitlines()) == 1


def test_rollback_goes_host_by_host_and_stops_at_the_first_failure(tmp_path, monkeypatch, capsys):
    calls = []

    def run_pyinfra(inventory_path, deploy_file, hosts, data=None, label=""):
        calls.append((deploy_file, hosts))
        raise lifecycle.StepFailed(f"rollback failed on {hosts[0]}: there is no upgrade to roll back on this host")

    host_states(monkeypatch, {"one": UPGRADED, "two": UPGRADED})
    monkeypatch.setattr(lifecycle, "run_pyinfra", run_pyinfra)
    monkeypatch.setattr(lifecycle, "verify", lambda *a: pytest.fail("verified a host that failed"))
    assert cli.main(["rollback", inventory(tmp_path), "--yes"]) == 1
    assert len(calls) == 1 and calls[0][0] == "rollback.py"
    assert "no upgrade to roll back" in capsys.readouterr().err


# --- the stand-in releases --------------------------------------------------------------------

@pytest.fixture(scope="module")
def standin():
    spec = importlib.util.spec_from_file_location("dify_standin_upgrade_under_test", STANDIN)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_release_1_migrates_nothing_and_later_ones_record_their_version(standin):
    assert standin.migration_statements("1") == []
    statements = standin.migration_statements("2")
    assert "insert into standin_schema values (2)" in statements
    assert any("add column if not exists icon" in s for s in statements)
    assert "insert into standin_schema values (3)" in standin.migration_statements("3-broken")


def test_a_broken_release_fails_its_health_endpoint(standin):
    code, body = standin.health("api", {"STANDIN_RELEASE": "3-broken"})
    assert code == 503 and body["status"] == "unhealthy"
    assert standin.health("web", {"STANDIN_RELEASE": "3-broken"})[0] == 200


def test_the_release_images_are_variants_of_the_api_stand_in():
    from tests.images import build

    base = build.IMAGES["edgefit-test/dify-api-standin:1"]
    assert set(build.RELEASES) == {"edgefit-test/dify-api-standin:2", "edgefit-test/dify-api-standin:3-broken"}
    for tag, spec in build.RELEASES.items():
        assert spec["env"][:-1] == base["env"] and spec["env"][-1] == f"STANDIN_RELEASE={tag.rsplit(':', 1)[1]}"
        assert spec["entrypoint"] == base["entrypoint"] and spec["services"] == base["services"]
    assert not set(build.RELEASES) & set(build.IMAGES)  # no service uses them by default


# --- the gate itself, against a scripted host ---------------------------------------------------

class ScriptedHost:
    """Answers run_shell_command by the first key found in the command (a list of answers for a
    key is used up one call at a time); records what ran."""

    name = "edge-small"

    def __init__(self, answers: list[tuple[str, bool, list[str]]]):
        self.answers, self.commands, self.logged = answers, [], []

    def run_shell_command(self, command, print_output=False, **arguments):
        self.commands.append(command)
        for key, ok, lines in self.answers:
            if key in command:
                if isinstance(ok, list):
                    ok, lines = ok.pop(0), lines.pop(0)
                return ok, type("Output", (), {"stdout_lines": lines, "stderr_lines": []})()
        raise AssertionError(f"unexpected command {command[:80]}")

    def log_styled(self, message, fg=None, log_func=None):
        self.logged.append(message)

    def ran(self, key: str) -> int:
        return sum(key in command for command in self.commands)


@pytest.fixture
def gate(stack, monkeypatch):
    from edgefit.expectations import expectations
    from roles import upgrade as role

    plan, rendered = stack
    monkeypatch.setattr(role.remote, "executor_arguments", lambda state, host: {})
    backup = "/srv/dify/pre-upgrade-backups/20260101T120000Z"
    state_line = json.dumps({"status": "upgrading", "backup": backup})

    def run(answers, **settings):
        target = ScriptedHost([*answers, ("state.json", True, [state_line]),
                               ("logs --no-color", True, ["api-1 | boom"])])
        chosen = read_settings(settings)
        ok = role.run_gate(None, target, expectations(plan, rendered), plan.data_root, {"api": (OLD, NEW)},
                           chosen.health_timeout_s, chosen.rollback)
        return ok, target, "\n".join(target.logged)
    return role, run, backup


def test_an_unhealthy_upgrade_is_rolled_back_and_the_host_fails_naming_the_service(gate):
    role, run, backup = gate
    ok, target, said = run([("host_backup.py rollback", True, ["[12:16:01] stopping api, worker, db ..."]),
                            ("not healthy and stable", [False, True], [WAIT_OUTPUT, ["all services running"]])],
                           edgefit_health_timeout=120)
    assert ok is False and target.ran("host_backup.py rollback") == 1
    assert "[12:16:01] stopping api, worker, db ..." in said  # the rollback's own progress, for the operator
    assert target.ran("not healthy and stable") == 2  # the gate's wait, and the one after the rollback
    assert "the upgrade failed: api, web not healthy and stable within 120s" in said and "it was rolled back" in said
    assert backup in said and "last log lines of api:" in said and "api-1 | boom" in said
    assert target.ran("host_backup.py upgraded") == 0
    gate_wait, rollback_wait = [c for c in target.commands if "not healthy and stable" in c]
    assert "after 120s" in gate_wait and "after 900s" in rollback_wait  # a whole-stack start: the default bound


def test_a_rollback_that_fails_too_says_so_and_where_the_backup_is(gate):
    role, run, backup = gate
    ok, target, said = run([("host_backup.py rollback", False, ["edgefit rollback: pg_restore failed"]),
                            ("not healthy and stable", False, WAIT_OUTPUT)])
    assert ok is False and "the automatic rollback failed too" in said and backup in said
    assert "the rollback failed:" in said and target.ran("not healthy and stable") == 1


def test_with_rollback_off_the_gate_only_stops_and_says_how(gate):
    role, run, backup = gate
    ok, target, said = run([("not healthy and stable", False, WAIT_OUTPUT)], edgefit_rollback=False)
    assert ok is False and target.ran("host_backup.py rollback") == 0
    assert "edgefit_rollback = False" in said and "edgefit rollback" in said and backup in said


def test_verify_findings_of_an_upgraded_service_fail_the_gate_too(gate, monkeypatch):
    role, run, _ = gate
    report = {"verdict": "fail", "findings": [{"severity": "fail", "service": "api",
                                               "message": "api restarted 2 time(s) during the 10s window"}]}
    monkeypatch.setattr(role, "_verify_upgraded", lambda *a: report)
    ok, target, said = run([("host_backup.py rollback", True, []), ("not healthy and stable", True, ["ok"])])
    assert ok is False and target.ran("host_backup.py rollback") == 1
    assert "verify: api restarted 2 time(s)" in said


def test_a_healthy_verified_upgrade_passes_and_is_marked(gate, monkeypatch):
    role, run, _ = gate
    monkeypatch.setattr(role, "_verify_upgraded", lambda *a: {"verdict": "ok", "findings": []})
    ok, target, said = run([("host_backup.py upgraded", True, []), ("not healthy and stable", True, ["ok"])])
    assert ok is True and target.ran("host_backup.py upgraded") == 1 and target.ran("rollback") == 0
    assert "upgrade passed its health gate" in said
