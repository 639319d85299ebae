"""What a `docker exec` in the fake host answers, for both fakes of Docker (the CLI in
tests/fake_docker.py, the API in tests/fake_docker_api.py): (exit code, stdout, stderr)."""
import time

KINDS = {"sh": "redis", "psql": "psql", "python3": "python3"}


def exec_answer(state: dict, container_id: str, argv: list[str], sleep=time.sleep) -> tuple[int, str, str]:
    """sleep: how to wait out a hanging exec (the API fake passes one its shutdown interrupts)."""
    kind = KINDS[argv[0]]
    sleep(state.get("exec_sleep_kind", {}).get(kind, state.get("exec_sleep", 0)))
    answer = state["exec"].get(container_id, {}).get(kind)
    if answer is None:
        return 126, "", "OCI runtime exec failed: executable file not found\n"
    if kind == "redis" and "CONFIG" not in argv[-1]:
        answer = answer.split("@@INFO@@", 1)[-1]
        answer = "@@INFO@@" + state.get("redis_info_end", {}).get(container_id, answer)
    return 0, answer + "\n", ""
