"""kew: an asyncio task queue whose source of truth is an event log in Redis
Streams.

    from kew import TaskQueueManager, QueueConfig

    async with TaskQueueManager() as manager:
        await manager.create_queue(QueueConfig(name="orders", max_workers=4))
        await manager.submit_task("order-1", "orders", process_order, order_id=1)
        info = await manager.wait_for_task("order-1", timeout=10)
"""

from kew.errors import (
    ConfigurationError,
    ConnectionFailedError,
    KewError,
    QueueAlreadyExistsError,
    QueueFullError,
    QueueNotFoundError,
    QueueProcessorError,
    SerializationError,
    ServerError,
    ServerNotFoundError,
    ServerVersionError,
    TaskAlreadyExistsError,
    TaskFunctionError,
    TaskNotFoundError,
    TaskQueueError,
    WaitTimeoutError,
)
from kew.execution import TaskContext, current_task
from kew.manager import TaskQueueManager
from kew.models import QueueConfig, QueuePriority, TaskInfo, TaskStatus
from kew.registry import task

__version__ = "1.0.0.dev0"

__all__ = [
    "ConfigurationError",
    "ConnectionFailedError",
    "KewError",
    "QueueAlreadyExistsError",
    "QueueConfig",
    "QueueFullError",
    "QueueNotFoundError",
    "QueuePriority",
    "QueueProcessorError",
    "SerializationError",
    "ServerError",
    "ServerNotFoundError",
    "ServerVersionError",
    "TaskAlreadyExistsError",
    "TaskContext",
    "TaskFunctionError",
    "TaskInfo",
    "TaskNotFoundError",
    "TaskQueueError",
    "TaskQueueManager",
    "TaskStatus",
    "WaitTimeoutError",
    "__version__",
    "current_task",
    "task",
]
