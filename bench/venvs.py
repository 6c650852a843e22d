"""One virtual environment per library, under bench/.venvs/ (gitignored).

Each is made with `python3 -m venv` and pip, and reused while its package list
is unchanged. Every peer is pinned to the release the quoted results were
measured with (bench/README.md, "Machine and versions"), so a new release
cannot change or break a runner unnoticed; moving to another release is a
change of this file. The local kew runs in the interpreter that runs the suite
(the repository's .venv, where kew is installed editable):
`repo_venv_problem` says how to make it when it is missing.
"""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

BENCH = Path(__file__).resolve().parent
REPO = BENCH.parent
VENVS = BENCH / ".venvs"
MARKER = ".bench-packages"
MAKE_REPO_VENV = "python3 -m venv .venv && .venv/bin/pip install -e '.[test]'"


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
        Lib("arq", "arq", ("arq==0.28.0",), ("arq", "redis", "hiredis")),
        Lib(
            "saq",
            "SAQ",
            # saq imports typing_extensions without declaring it.
            ("saq[hiredis]==0.26.4", "typing_extensions"),
            ("saq", "redis", "hiredis"),
        ),
        Lib("streaq", "streaq", ("streaq==7.2.0",), ("streaq", "coredis", "anyio")),
        Lib(
            "taskiq",
            "taskiq",
            ("taskiq==0.13.0", "taskiq-redis==1.2.4", "hiredis"),
            ("taskiq", "taskiq-redis", "redis", "hiredis"),
        ),
    )
}
PEERS = [name for name in LIBS if name != "kew"]


def repo_venv_problem() -> str:
    """Why this interpreter cannot run the suite, with the commands that fix
    it; "" if it can (redis-py and rich importable, kew from this checkout).

    Standard library only, so that it can run before anything else."""
    missing = [
        name
        for name in ("kew", "redis", "rich")
        if importlib.util.find_spec(name) is None
    ]
    spec = importlib.util.find_spec("kew") if not missing else None
    origin = Path(spec.origin).resolve() if spec and spec.origin else None
    if not missing and origin is not None and origin.is_relative_to(REPO / "kew"):
        return ""
    why = (
        f"cannot import {', '.join(missing)}"
        if missing
        else f"imports kew from {origin}, not from this checkout ({REPO / 'kew'})"
    )
    venv_python = REPO / ".venv" / "bin" / "python"
    if not venv_python.exists():
        fix = f"  cd {REPO}\n  {MAKE_REPO_VENV}\n  .venv/bin/python bench/run.py"
        return (
            f"bench/run.py: {sys.executable} {why}, and the repository's .venv "
            f"does not exist. Create it, then run the suite with it:\n{fix}"
        )
    if Path(sys.prefix).resolve() != venv_python.parent.parent.resolve():
        return (
            f"bench/run.py: {sys.executable} {why}. Run the suite with the "
            f"repository's venv:\n  cd {REPO}\n  .venv/bin/python bench/run.py"
        )
    return (
        f"bench/run.py: the repository's .venv {why}. Install kew into it:\n"
        f"  cd {REPO}\n  .venv/bin/pip install -e '.[test]'"
    )


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
