"""The original README's quick start, run unchanged, and the embedded default."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import redis.asyncio as aioredis

from kew import QueueConfig, TaskQueueManager, TaskStatus
from kew.connection import URL_ENV
from kew.keys import QueueKeys

# The quick start of the earlier release's README, verbatim except for the
# server's address, which the test substitutes (the text says localhost:6379).
QUICK_START = textwrap.dedent(
    """\
    import asyncio
    from kew import TaskQueueManager, QueueConfig

    async def process_order(order_id: str):
        # Simulate order processing
        await asyncio.sleep(1)
        return f"Order {order_id} processed"

    async def main():
        # Initialize queue manager
        manager = TaskQueueManager(redis_url="redis://localhost:6379")
        await manager.initialize()

        # Create processing queue
        await manager.create_queue(QueueConfig(
            name="orders",
            max_workers=4,  # Only 4 concurrent tasks
            max_size=1000
        ))

        # Submit some tasks
        tasks = []
        for i in range(10):
            task = await manager.submit_task(
                task_id=f"order-{i}",
                queue_name="orders",
                task_func=process_order,
                order_id=str(i)
            )
            tasks.append(task)

        # Check results
        for task in tasks:
            status = await manager.get_task_status(task.task_id)
            print(f"{task.task_id}: {status.result}")

    if __name__ == "__main__":
        asyncio.run(main())
    """
)

SIGNS_OF_TROUBLE = (
    "traceback",
    "task was destroyed",
    "was never awaited",
    "exception ignored",
    "unclosed",
    "resourcewarning",
)
"""Compared in lower case: Python prints both "Unclosed client session" and
"unclosed transport"."""


def _run(
    script: Path, env: dict[str, str], timeout: float = 60
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, str(script)],
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


async def test_quick_start_runs_unchanged_and_exits_cleanly(
    tmp_path: Path, redis_url: str, prefix: str, client: aioredis.Redis
) -> None:
    """The quick start prints a line per task and exits at once, with no
    warnings, although it never calls shutdown; its tasks stay in Redis."""
    script = tmp_path / "quick_start.py"
    script.write_text(QUICK_START.replace("redis://localhost:6379", redis_url))
    env = {**os.environ, "KEW_KEY_PREFIX": prefix, "PYTHONWARNINGS": "always"}
    done = _run(script, env)
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert [line.split(":")[0] for line in lines] == [f"order-{i}" for i in range(10)]
    for sign in SIGNS_OF_TROUBLE:
        assert sign not in done.stderr.lower(), done.stderr
    keys = QueueKeys(prefix, "orders")
    for i in range(10):
        assert await client.exists(keys.task(f"order-{i}"))


async def test_quick_start_runs_again_under_a_fresh_prefix(
    tmp_path: Path, redis_url: str, prefix: str, client: aioredis.Redis
) -> None:
    """As the README says: a second run on the same server and prefix finds
    its task ids taken (TaskAlreadyExistsError); under a fresh prefix it runs."""
    script = tmp_path / "quick_start.py"
    script.write_text(QUICK_START.replace("redis://localhost:6379", redis_url))
    env = {**os.environ, "KEW_KEY_PREFIX": prefix}
    assert _run(script, env).returncode == 0
    again = _run(script, env)
    assert again.returncode != 0
    assert "TaskAlreadyExistsError" in again.stderr
    assert "'order-0'" in again.stderr
    fresh = f"{prefix}-again"
    try:
        done = _run(script, {**env, "KEW_KEY_PREFIX": fresh})
        assert done.returncode == 0, done.stderr
    finally:
        keys = [k async for k in client.scan_iter(match=f"{fresh}:*", count=1000)]
        if keys:
            await client.unlink(*keys)


async def test_quick_start_tasks_finish_in_a_later_process(
    tmp_path: Path, redis_url: str, prefix: str, make_manager: object
) -> None:
    """Tasks the quick start left behind (running or queued when it exited) are
    finished by the next process that consumes the queue: nothing is lost."""
    script = tmp_path / "quick_start.py"
    script.write_text(QUICK_START.replace("redis://localhost:6379", redis_url))
    env = {**os.environ, "KEW_KEY_PREFIX": prefix}
    assert _run(script, env).returncode == 0

    sys.path.insert(0, str(tmp_path))
    try:
        import quick_start  # the same module, so the same task function name
    finally:
        sys.path.remove(str(tmp_path))
    manager = TaskQueueManager(redis_url=redis_url, key_prefix=prefix)
    await manager.initialize()
    try:
        manager.registry.register(quick_start.process_order, "__main__:process_order")
        await manager.create_queue(
            QueueConfig(name="orders", max_workers=10, lease_seconds=0.5)
        )
        for i in range(10):
            info = await manager.wait_for_task(f"order-{i}", timeout=30)
            assert info.status is TaskStatus.COMPLETED
            assert info.result == f"Order {i} processed"
        assert await manager.verify_projections("orders") == []
    finally:
        await manager.shutdown()


async def test_embedded_server_is_the_default(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """With no URL anywhere, kew starts its own server, and stops it at shutdown."""
    monkeypatch.delenv(URL_ENV, raising=False)

    async def hello(name: str) -> str:
        return f"hello {name}"

    manager = TaskQueueManager()
    await manager.initialize()
    server = manager._server
    assert server is not None
    pid = server.pid
    assert pid is not None
    await manager.create_queue(QueueConfig(name="q"))
    await manager.submit_task("h", "q", hello, "kew")
    assert (await manager.wait_for_task("h", 10)).result == "hello kew"
    await manager.shutdown()
    assert not _alive(pid)


EMBEDDED_OWNER = textwrap.dedent(
    """\
    import asyncio, sys
    from kew import TaskQueueManager

    async def main():
        manager = TaskQueueManager()
        await manager.initialize()
        print(manager._server.pid, flush=True)
        await asyncio.Event().wait()  # until killed or cancelled

    asyncio.run(main())
    """
)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="pdeathsig")
def test_embedded_server_dies_with_a_killed_application(tmp_path: Path) -> None:
    """SIGKILL of an application using the embedded default leaves no server."""
    script = tmp_path / "owner.py"
    script.write_text(EMBEDDED_OWNER)
    env = {k: v for k, v in os.environ.items() if k != URL_ENV}
    owner = subprocess.Popen(
        [sys.executable, str(script)], env=env, stdout=subprocess.PIPE, text=True
    )
    try:
        assert owner.stdout is not None
        server_pid = int(owner.stdout.readline())
        assert _alive(server_pid)
        owner.send_signal(signal.SIGKILL)
        owner.wait(10)
        deadline = time.monotonic() + 10
        while _alive(server_pid) and time.monotonic() < deadline:
            time.sleep(0.01)
        assert not _alive(server_pid)
    finally:
        owner.kill()
        owner.wait()


def _alive(pid: int) -> bool:
    """True if the process exists and is not a zombie."""
    if not os.path.isdir("/proc"):
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return False
        return True
    try:
        with open(f"/proc/{pid}/stat") as stat:
            return stat.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False
