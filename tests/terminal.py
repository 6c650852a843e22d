"""Running the `kew` command in tests: piped (what subprocess gives by
default), on a terminal (a pseudo-terminal from the pty module), or left
running (`kew tail --follow`) while a thread collects what it prints.

Nothing here sleeps a fixed time: a command that keeps running is read by a
thread, and the test waits, with a deadline, for what it expects to appear.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import pty
import re
import struct
import subprocess
import sys
import termios
import threading
from collections.abc import Callable

from kew.connection import URL_ENV
from kew.keys import PREFIX_ENV

from .conftest import eventually

TIMEOUT = 60.0
_ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")


def command(prefix: str, *args: str) -> list[str]:
    return [sys.executable, "-m", "kew", "--prefix", prefix, *args]


def environment(url: str, **extra: str) -> dict[str, str]:
    """The environment of a kew command on the test's server; `extra` adds to
    it (TZ=..., say)."""
    env = {k: v for k, v in os.environ.items() if k not in (URL_ENV, PREFIX_ENV)}
    env.pop("COLUMNS", None)
    return {**env, URL_ENV: url, **extra}


def piped(
    url: str, prefix: str, *args: str, stdin: str | None = None, **extra: str
) -> subprocess.CompletedProcess[str]:
    """Run a kew command with its output to a pipe, as a script would."""
    return subprocess.run(
        command(prefix, *args),
        env=environment(url, **extra),
        input=stdin,
        capture_output=True,
        text=True,
        timeout=TIMEOUT,
        check=False,
    )


def plain(text: str) -> str:
    """Terminal output without its colour and cursor codes, and with \\n line
    ends (a terminal writes \\r\\n)."""
    return _ANSI.sub("", text).replace("\r\n", "\n")


class Running:
    """A kew command left running, its output (stdout and, on a terminal,
    stderr too) collected by a thread. On a terminal of `columns` columns if
    `terminal`, else piped."""

    def __init__(
        self,
        url: str,
        prefix: str,
        *args: str,
        terminal: bool = False,
        columns: int = 160,
        **extra: str,
    ) -> None:
        self._chunks: list[str] = []
        self._lock = threading.Lock()
        env = environment(url, **extra)
        if terminal:
            leader, follower = pty.openpty()
            size = struct.pack("HHHH", 50, columns, 0, 0)
            fcntl.ioctl(follower, termios.TIOCSWINSZ, size)
            self.process = subprocess.Popen(
                command(prefix, *args),
                env=env,
                stdin=subprocess.DEVNULL,
                stdout=follower,
                stderr=follower,
            )
            os.close(follower)
            read = self._reader_of(leader)
        else:
            self.process = subprocess.Popen(
                command(prefix, *args),
                env=env,
                stdin=subprocess.DEVNULL,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
            )
            stdout = self.process.stdout
            assert stdout is not None
            read = stdout.readline
        self._thread = threading.Thread(target=self._collect, args=(read,))
        self._thread.start()

    @staticmethod
    def _reader_of(fd: int) -> Callable[[], str]:
        def read() -> str:
            try:
                return os.read(fd, 65536).decode(errors="replace")
            except OSError:  # EIO: the command has ended and closed the terminal
                os.close(fd)
                return ""

        return read

    def _collect(self, read: Callable[[], str]) -> None:
        while chunk := read():
            with self._lock:
                self._chunks.append(chunk)

    def text(self) -> str:
        """What it printed so far (colour codes removed)."""
        with self._lock:
            return plain("".join(self._chunks))

    async def until(self, condition: Callable[[str], bool], what: str) -> str:
        """Wait until what it printed satisfies `condition`; return it."""
        await eventually(lambda: condition(self.text()), TIMEOUT, what)
        return self.text()

    def stop(self) -> str:
        """Terminate it (if it still runs) and return everything it printed."""
        if self.process.poll() is None:
            self.process.terminate()
        self.process.wait(TIMEOUT)
        self._thread.join(TIMEOUT)
        for stream in (self.process.stdout, self.process.stderr):
            if stream is not None:
                with contextlib.suppress(OSError):
                    stream.close()
        return self.text()


async def on_terminal(url: str, prefix: str, *args: str, **extra: str) -> str:
    """Run a kew command on a terminal to its end; what it printed."""
    running = Running(url, prefix, *args, terminal=True, **extra)
    await eventually(lambda: running.process.poll() is not None, TIMEOUT, "the end")
    return running.stop()
