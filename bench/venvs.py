"""One virtual environment per library, under bench/.venvs/ (gitignored).

Each is made with `python3 -m venv` and pip, and reused while its package list
is unchanged. The local kew runs in the interpreter that runs the suite (the
repository's .venv, where kew is installed editable).
"""

from __future__ import annotations

import json
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

BENCH = Path(__file__).resolve().parent
VENVS = BENCH / ".venvs"
MARKER = ".bench-packages"


@dataclass(frozen=True)
class Lib:
    name: str
    label: str
    packages: tuple[str, ...]
    """What pip installs (empty: the suite's own interpreter)."""
    dists: tuple[str, ...]
    """Distributions whose versions are reported."""

    @property
    def runner(self) -> Path:
        return BENCH / "peers" / f"run_{self.name}.py"

    @property
    def python(self) -> Path:
        if not self.packages:
            return Path(sys.executable)
        return VENVS / self.name / "bin" / "python"


# hiredis is added where the library does not pull it in itself, so every
# redis-py client parses replies in C, as kew's does.
LIBS: dict[str, Lib] = {
    lib.name: lib
    for lib in (
        Lib("kew", "kew (this repo)", (), ("kew", "redis", "hiredis", "pydantic")),
        Lib(
            "kew021",
            "kew 0.2.1",
            ("kew==0.2.1", "hiredis"),
            ("kew", "redis", "hiredis", "cloudpickle"),
        ),
        Lib("arq", "arq", ("arq",), ("arq", "redis", "hiredis")),
        Lib(
            "saq",
            "SAQ",
            # saq imports typing_extensions without declaring it.
            ("saq[hiredis]", "typing_extensions"),
            ("saq", "redis", "hiredis"),
        ),
        Lib("streaq", "streaq", ("streaq",), ("streaq", "coredis", "anyio")),
        Lib(
            "taskiq",
            "taskiq",
            ("taskiq", "taskiq-redis", "hiredis"),
            ("taskiq", "taskiq-redis", "redis", "hiredis"),
        ),
    )
}
PEERS = [name for name in LIBS if name != "kew"]


def ensure(lib: Lib, log: Path) -> Path:
    """The library's interpreter, creating or updating its venv if needed."""
    if not lib.packages:
        return lib.python
    home = VENVS / lib.name
    marker = home / MARKER
    wanted = "\n".join(lib.packages)
    if lib.python.exists() and marker.exists() and marker.read_text() == wanted:
        return lib.python
    VENVS.mkdir(parents=True, exist_ok=True)
    with log.open("a") as out:
        if not lib.python.exists():
            subprocess.run(
                ["python3", "-m", "venv", str(home)],
                check=True,
                stdout=out,
                stderr=out,
            )
        subprocess.run(
            [str(lib.python), "-m", "pip", "install", "-q", *lib.packages],
            check=True,
            stdout=out,
            stderr=out,
        )
    marker.write_text(wanted)
    return lib.python


def versions(lib: Lib) -> dict[str, str]:
    code = (
        "import importlib.metadata as m, json, sys\n"
        "def v(d):\n"
        "    try:\n"
        "        return m.version(d)\n"
        "    except m.PackageNotFoundError:\n"
        "        return None\n"
        "print(json.dumps({'python': sys.version.split()[0],"
        f" **{{d: v(d) for d in {list(lib.dists)!r}}}}}))"
    )
    out = subprocess.run(
        [str(lib.python), "-c", code], capture_output=True, text=True, check=True
    )
    return {k: v for k, v in json.loads(out.stdout).items() if v is not None}
