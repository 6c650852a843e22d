"""Task functions, found by name.

A consumer runs only functions registered in its own process: what it reads
from Redis is a name and JSON arguments, never code. A function is registered
by decorating it with `kew.task`, or implicitly when a callable is submitted.
Its default name is `module:qualname`; give `name=` when other processes must
find it under a name that survives refactoring, or when it lives in `__main__`
(where another process would import it under its module's real name).

Arguments are validated against the function's signature at submit (a call
that could not bind never enters the queue) and converted back from JSON at
run time with pydantic, so a parameter annotated `datetime` or with a pydantic
model receives one, not the JSON it was stored as.
"""

from __future__ import annotations

import functools
import inspect
import logging
from collections.abc import Awaitable, Callable
from typing import Any, ParamSpec, TypeVar, overload

import pydantic

from kew.errors import TaskFunctionError

__all__ = ["Registry", "TaskFunction", "registry", "task"]

logger = logging.getLogger(__name__)

P = ParamSpec("P")
R = TypeVar("R")

_VALIDATION = pydantic.ConfigDict(arbitrary_types_allowed=True)


class TaskFunction:
    """A registered task function."""

    __slots__ = ("_positional", "_run", "func", "name", "signature")

    def __init__(self, name: str, func: Callable[..., Awaitable[Any]]) -> None:
        self.name = name
        self.func = func
        self.signature = inspect.signature(func)
        self._positional = _positional_range(self.signature)
        target: Callable[..., Any] = func
        if not (inspect.isroutine(func) or isinstance(func, functools.partial)):
            target = func.__call__  # a callable instance: validate its method
        try:
            validated: Any = pydantic.validate_call(config=_VALIDATION)(target)
            self._run: Callable[..., Awaitable[Any]] = validated
        except (pydantic.PydanticUserError, TypeError) as exc:
            # A signature pydantic cannot describe still runs, unconverted.
            logger.debug("arguments of %s will not be converted: %s", name, exc)
            self._run = func

    def check_arguments(self, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        """Raise TaskFunctionError if the arguments cannot bind to the signature."""
        # The common case, positional arguments only, without binding them
        # (a few µs a task in a batch of thousands).
        positional = self._positional
        if not kwargs and positional and positional[0] <= len(args) <= positional[1]:
            return
        try:
            self.signature.bind(*args, **kwargs)
        except TypeError as exc:
            raise TaskFunctionError(
                f"The arguments do not fit {self.name}{self.signature}: {exc}. "
                "Pass the task function's own parameters after the task's options."
            ) from None

    async def run(self, args: list[Any], kwargs: dict[str, Any]) -> Any:
        return await self._run(*args, **kwargs)


def _positional_range(signature: inspect.Signature) -> tuple[int, int] | None:
    """How many positional arguments alone bind to `signature` (least, most),
    or None if that takes more than counting (*args, a keyword-only parameter
    without a default)."""
    least = most = 0
    for parameter in signature.parameters.values():
        if parameter.kind in (
            parameter.POSITIONAL_ONLY,
            parameter.POSITIONAL_OR_KEYWORD,
        ):
            most += 1
            if parameter.default is parameter.empty:
                least = most
        elif parameter.kind is parameter.VAR_POSITIONAL:
            return None
        elif parameter.default is parameter.empty and parameter.kind is not (
            parameter.VAR_KEYWORD
        ):
            return None  # a keyword-only parameter that must be given
    return least, most


def default_name(func: Callable[..., Any]) -> str:
    module = getattr(func, "__module__", None)
    qualname = getattr(func, "__qualname__", None)
    if not module or not qualname:
        raise TaskFunctionError(
            f"{func!r} has no __module__ and __qualname__ to name it by: register "
            "it with kew.task(name='...') first."
        )
    return f"{module}:{qualname}"


def _is_async(func: object) -> bool:
    if inspect.iscoroutinefunction(func):
        return True
    if isinstance(func, functools.partial):
        return _is_async(func.func)  # pyright: ignore[reportUnknownMemberType]
    return callable(func) and inspect.iscoroutinefunction(type(func).__call__)


class Registry:
    """Task functions by name."""

    def __init__(self) -> None:
        self._by_name: dict[str, TaskFunction] = {}
        self._by_func: dict[int, TaskFunction] = {}

    def register(
        self, func: Callable[..., Awaitable[Any]], name: str | None = None
    ) -> TaskFunction:
        """Register `func` (under `name`, or its default name) and return it.

        Registering the same function again returns the existing entry. A name
        already taken by a different function is an error, unless the newer
        one is the older one defined again (a module reloaded: the same code,
        no closure, the same defaults), which then replaces it. Closures made
        by one factory share their code and name, yet each runs with its own
        captured values: each needs a name of its own.
        """
        known = self._by_func.get(id(func))
        if known is not None and known.func is func and name in (None, known.name):
            return known
        if not callable(func) or not _is_async(func):
            raise TaskFunctionError(
                f"Task function {func!r} is not a coroutine function: define it "
                "with `async def` (kew runs tasks in the event loop, and calling a "
                "sync function would block it)."
            )
        name = name or default_name(func)
        if not isinstance(name, str) or not name:
            raise TaskFunctionError(f"Task name {name!r} is not valid: use a string.")
        current = self._by_name.get(name)
        if current is not None and current.func is not func:
            if not _defined_again(current.func, func):
                raise TaskFunctionError(
                    f"The name {name!r} is already registered to {current.func!r}, "
                    f"so {func!r} cannot take it (closures of one factory, or "
                    "methods of two objects, share a name but not what they "
                    "run): give each its own name with submit_task(..., "
                    "task_name='...') or kew.task(name='...')."
                )
            self._by_func.pop(id(current.func), None)
        entry = TaskFunction(name, func)
        self._by_name[name] = entry
        self._by_func[id(func)] = entry
        return entry

    def get(self, name: str) -> TaskFunction | None:
        return self._by_name.get(name)

    def names(self) -> list[str]:
        return sorted(self._by_name)


def _defined_again(old: object, new: object) -> bool:
    """Is `new` the function `old` defined once more (a module reloaded), so
    that running either is the same? Only with equal code in the same
    globals; not for closures (each captures its own values), bound methods
    of different objects, or other defaults."""
    code = getattr(old, "__code__", None)
    if code is None or code != getattr(new, "__code__", None):
        return False
    if _closure(old) is not None or _closure(new) is not None:
        return False
    for shared in ("__globals__", "__self__"):
        if getattr(old, shared, None) is not getattr(new, shared, None):
            return False
    try:
        return bool(
            getattr(old, "__defaults__", None) == getattr(new, "__defaults__", None)
            and getattr(old, "__kwdefaults__", None)
            == getattr(new, "__kwdefaults__", None)
        )
    except Exception:  # a default whose == raises: not provably the same
        return False


def _closure(func: object) -> object:
    return getattr(func, "__closure__", None)


registry = Registry()
"""The process-wide registry that `kew.task` and `submit_task` use."""


@overload
def task(func: Callable[P, Awaitable[R]], /) -> Callable[P, Awaitable[R]]: ...


@overload
def task(
    *, name: str | None = None
) -> Callable[[Callable[P, Awaitable[R]]], Callable[P, Awaitable[R]]]: ...


def task(
    func: Callable[P, Awaitable[R]] | None = None, /, *, name: str | None = None
) -> Any:
    """Register an async function as a task function; the function is returned
    unchanged, so it can still be called directly.

        @kew.task
        async def resize(path: str, width: int) -> str: ...

        @kew.task(name="images.resize")
        async def resize(path: str, width: int) -> str: ...
    """

    def decorate(f: Callable[P, Awaitable[R]]) -> Callable[P, Awaitable[R]]:
        registry.register(f, name)
        return f

    if func is not None:
        return decorate(func)
    return decorate
