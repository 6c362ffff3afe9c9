"""One message, served in a process forked from the warm executor (``executor.py``).

This is what Flower's ``flwr-clientapp`` process does (flwr 1.39,
``flwr/supernode/runtime/run_clientapp.py``) less what the executor already did before
the fork: the task's inputs (Context, Run, FAB) were pulled, the FAB installed, the
ClientApp's module imported and, for a warm start, the run's base model and data loaded.
The rest uses Flower's own functions: pull the message over the Runtime API, run the
ClientApp with Flower's ``ClientApp.__call__`` (mods and handlers unchanged), push the
reply and the updated Context (``context.state``), report the task's status.

Written by hand because flwr 1.39 has one function for the whole of it
(``run_clientapp``), which pulls the inputs itself and ends the process.
"""

from __future__ import annotations

import logging
import os
import time

from flwr.app import Context, Message
from flwr.app.error import Error
from flwr.app.message import remove_content_from_message
from flwr.clientapp.client_app import ClientApp, LoadClientAppError
from flwr.common.constant import ErrorCode, SubStatus
from flwr.common.serde import message_from_proto, message_to_proto
from flwr.proto.message_pb2 import Message as ProtoMessage  # pylint: disable=E0611
from flwr.proto.node_pb2 import Node  # pylint: disable=E0611
from flwr.proto.runtime_pb2 import PullAppMessagesRequest  # pylint: disable=E0611
from flwr.supercore.heartbeat import HeartbeatSender, make_task_heartbeat_fn_http
from flwr.supercore.inflatable.inflatable_protobuf_utils import (
    make_confirm_message_received_fn_protobuf,
    make_pull_object_fn_protobuf,
)
from flwr.supercore.inflatable.inflatable_utils import pull_and_inflate_object_from_tree
from flwr.supercore.task_identity import TaskIdentity
from flwr.supernode.runtime.run_clientapp import push_message, push_task_output

log = logging.getLogger("stamen.runtime")

# exit codes of a worker, read by the executor
OK = 0
FAILED = 1  # the ClientApp raised; its error reply was pushed
NOT_PUSHED = 2  # no reply could be pushed
PUSHED = b"pushed"  # reported once the reply is on the SuperNode
LOCAL_RETRY_S, LOCAL_RETRY_CAP_S = 0.02, 0.05
MESSAGE_WAIT_ENV = "STAMEN_MESSAGE_WAIT_S"  # measurements/client_mod.py reads it


def pull_message(client, context: Context) -> Message:
    """The instruction this task serves (the second half of flwr's ``pull_task_input``)."""
    res = client.PullMessages(PullAppMessagesRequest())
    if not res.messages_list:
        raise RuntimeError("no message for this task on the SuperNode's Runtime API")
    node = Node(node_id=context.node_id)
    tree = res.message_object_trees[0]
    message = pull_and_inflate_object_from_tree(
        tree,
        make_pull_object_fn_protobuf(client.PullObject, node, context.run_id),
        make_confirm_message_received_fn_protobuf(client.ConfirmMessageReceived, node, context.run_id),
        return_type=Message,
        # The SuperNode offers a message before it has all of its objects from the
        # SuperLink; flwr retries an unavailable object after 1 s, doubling. A worker
        # that starts within milliseconds meets that every round, so it retries the
        # local API every 20 ms instead (up to 50 ms apart).
        initial_backoff=LOCAL_RETRY_S,
        backoff_cap=LOCAL_RETRY_CAP_S,
        max_tries_per_object=None,  # bounded by flwr's max_time (PULL_MAX_TIME) instead
    )
    message.metadata.__dict__["_message_id"] = tree.object_id  # as flwr: the deflated message lacks its own id
    return message


def unloadable(reason: str):
    """Stands in for a ClientApp that could not be loaded: raises flwr's load error, so the
    message gets the error reply flwr-clientapp would send."""

    def app(message: Message, context: Context) -> Message:
        raise LoadClientAppError(f"the ClientApp could not be loaded: {reason}")

    return app


def serve(client, task_id: int, context: Context, app: ClientApp, report=lambda frame: None) -> int:
    """Pull the message, run ``app`` on it, push the reply and the Context; the exit code.

    ``report(frame)`` tells the executor how far this got: the message's metadata (a
    serialized Message without content) once the message is here, before the app runs,
    then ``PUSHED`` once the reply is on the SuperNode. With the metadata the executor
    can answer the message with an error reply if this process dies before replying.
    """
    TaskIdentity.task_id, TaskIdentity.run_id, TaskIdentity.node_id = task_id, context.run_id, context.node_id
    heartbeat = HeartbeatSender(make_task_heartbeat_fn_http(client))
    heartbeat.start()
    message, reply, status, details = None, None, SubStatus.FAILED, "ClientApp task failed"
    code = NOT_PUSHED
    try:
        started = time.perf_counter()
        message = pull_message(client, context)
        # what of the worker's start was waiting for the message (the SuperNode may still be
        # downloading it): the measurement mod reports it apart from the start-up itself
        os.environ[MESSAGE_WAIT_ENV] = f"{time.perf_counter() - started:.6f}"
        report(message_to_proto(remove_content_from_message(message)).SerializeToString())
        reply = app(message=message, context=context)
        status, details, code = SubStatus.COMPLETED, "", OK
    except Exception as err:  # as flwr-clientapp: the node answers with an error reply
        log.exception("ClientApp raised an exception")
        e_code = ErrorCode.LOAD_CLIENT_APP_EXCEPTION if isinstance(err, LoadClientAppError) else ErrorCode.CLIENT_APP_RAISED_EXCEPTION
        details = f"{type(err)}:<'{err}'>"
        if message is not None:
            reply, code = Message(Error(code=e_code, reason=details), reply_to=message), FAILED
    finally:
        if reply is not None:
            try:
                push_message(client, reply, context)
                report(PUSHED)
            except Exception:  # noqa: BLE001 - reported through the exit code
                log.exception("could not push the reply")
                code = NOT_PUSHED
        # as flwr-clientapp: the Context goes back whatever the outcome
        push_task_output(client=client, context=context, sub_status=status, details=details)
        if heartbeat.is_running:
            heartbeat.stop()
    return code


def answer_crash(client, context: Context, metadata: bytes, reason: str) -> None:
    """The executor's side: the worker died before replying; reply with an error for it
    (Flower would, once the task's heartbeat expires), and leave the node's Context as it
    was before the message (a crashed message changes no state)."""
    proto = ProtoMessage()
    proto.ParseFromString(metadata)
    message = message_from_proto(proto)
    push_message(client, Message(Error(code=ErrorCode.CLIENT_APP_CRASHED, reason=reason), reply_to=message), context)
    push_task_output(client=client, context=None, sub_status=SubStatus.FAILED, details=reason)

