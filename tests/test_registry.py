"""The registry of task functions: one name, one function."""

from __future__ import annotations

import types
from collections.abc import Awaitable, Callable

import pytest

from kew import QueueConfig, TaskFunctionError, TaskQueueManager
from kew.registry import Registry

MakeManager = Callable[..., Awaitable[TaskQueueManager]]


def make_adder(n: int) -> Callable[[int], Awaitable[int]]:
    async def add(x: int) -> int:
        return x + n

    return add


async def plain(x: int, y: int = 1) -> int:
    return x * y


def test_two_closures_of_one_factory_do_not_share_a_name() -> None:
    """The second closure would run in place of the first: refused, with both
    named and the fix (task_name=) in the message."""
    registry = Registry()
    first, second = make_adder(1), make_adder(2)
    registry.register(first)
    with pytest.raises(TaskFunctionError, match="task_name=") as caught:
        registry.register(second)
    assert repr(first) in str(caught.value)
    assert repr(second) in str(caught.value)
    entry = registry.get(registry.names()[0])
    assert entry is not None
    assert entry.func is first
    assert registry.register(second, "adder-2").func is second


def test_a_function_defined_again_replaces_the_old_one() -> None:
    """A module reloaded defines the same function again (equal code, same
    globals, no closure, same defaults): it takes the name over."""
    registry = Registry()
    registry.register(plain)
    again = types.FunctionType(
        plain.__code__, plain.__globals__, plain.__name__, plain.__defaults__
    )
    again.__qualname__ = plain.__qualname__
    assert registry.register(again).func is again

    other_defaults = types.FunctionType(
        plain.__code__, plain.__globals__, plain.__name__, (5,)
    )
    other_defaults.__qualname__ = plain.__qualname__
    with pytest.raises(TaskFunctionError, match="already registered"):
        registry.register(other_defaults)


def test_methods_of_two_objects_do_not_share_a_name() -> None:
    """Bound methods of two objects share code and name, not their object."""

    class Greeter:
        def __init__(self, greeting: str) -> None:
            self.greeting = greeting

        async def greet(self, name: str) -> str:
            return f"{self.greeting} {name}"

    registry = Registry()
    registry.register(Greeter("hello").greet)
    with pytest.raises(TaskFunctionError, match="task_name="):
        registry.register(Greeter("bye").greet)


async def test_each_named_closure_runs_its_own_function(
    make_manager: MakeManager,
) -> None:
    """Closures submitted under names of their own each run with their own
    captured value."""
    manager = await make_manager(registry=Registry())
    await manager.create_queue(QueueConfig(name="q"))
    await manager.submit_task("one", "q", make_adder(1), 10, task_name="add-1")
    await manager.submit_task("two", "q", make_adder(2), 10, task_name="add-2")
    with pytest.raises(TaskFunctionError, match="task_name="):
        await manager.submit_task("three", "q", make_adder(3), 10, task_name="add-1")
    assert (await manager.wait_for_task("one", 10)).result == 11
    assert (await manager.wait_for_task("two", 10)).result == 12


async def _only(a: int, /, b: int, c: int = 3) -> None: ...
async def _star(a: int, *rest: int) -> None: ...
async def _keyword(a: int, *, k: int) -> None: ...
async def _keyword_default(a: int = 1, *, k: int = 2, **more: int) -> None: ...
async def _nothing() -> None: ...


@pytest.mark.parametrize("func", [_only, _star, _keyword, _keyword_default, _nothing])
def test_checking_positional_arguments_agrees_with_binding_them(
    func: Callable[..., Awaitable[None]],
) -> None:
    """The shortcut for positional arguments accepts exactly what binding
    them to the signature accepts, for every count."""
    function = Registry().register(func, "f")
    for count in range(6):
        args = tuple(range(count))
        try:
            function.signature.bind(*args)
            binds = True
        except TypeError:
            binds = False
        if binds:
            function.check_arguments(args, {})
        else:
            with pytest.raises(TaskFunctionError, match="do not fit"):
                function.check_arguments(args, {})
