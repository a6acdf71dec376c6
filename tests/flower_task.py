"""A ServerApp's task identity for unit tests that build Flower messages in-process.

Flower 1.41 stamps every new `Message` with the identity (run, node, task) of the
process it runs in, which its ServerApp runtime sets before ``main`` starts
(flwr/server/compat/app.py). Unit tests that play the ServerApp without starting one set
the same identity through this fixture, and restore it afterwards.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from flwr.common.constant import SUPERLINK_NODE_ID
from flwr.supercore.task_identity import TaskIdentity


@pytest.fixture
def server_app_task() -> Iterator[None]:
    saved = (TaskIdentity._task_id, TaskIdentity._run_id, TaskIdentity._node_id)
    TaskIdentity.task_id, TaskIdentity.run_id, TaskIdentity.node_id = 1, 1, SUPERLINK_NODE_ID
    yield
    TaskIdentity._task_id, TaskIdentity._run_id, TaskIdentity._node_id = saved
