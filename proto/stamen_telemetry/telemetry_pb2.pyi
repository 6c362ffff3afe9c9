from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional

DESCRIPTOR: _descriptor.FileDescriptor

class Event(_message.Message):
    __slots__ = ("seq", "spool_id", "node_id", "run_id", "message_id", "kind", "start_unix_s", "duration_s", "values", "labels", "mac")
    class ValuesEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: float
        def __init__(self, key: _Optional[str] = ..., value: _Optional[float] = ...) -> None: ...
    class LabelsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    SEQ_FIELD_NUMBER: _ClassVar[int]
    SPOOL_ID_FIELD_NUMBER: _ClassVar[int]
    NODE_ID_FIELD_NUMBER: _ClassVar[int]
    RUN_ID_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_ID_FIELD_NUMBER: _ClassVar[int]
    KIND_FIELD_NUMBER: _ClassVar[int]
    START_UNIX_S_FIELD_NUMBER: _ClassVar[int]
    DURATION_S_FIELD_NUMBER: _ClassVar[int]
    VALUES_FIELD_NUMBER: _ClassVar[int]
    LABELS_FIELD_NUMBER: _ClassVar[int]
    MAC_FIELD_NUMBER: _ClassVar[int]
    seq: int
    spool_id: str
    node_id: int
    run_id: int
    message_id: str
    kind: str
    start_unix_s: float
    duration_s: float
    values: _containers.ScalarMap[str, float]
    labels: _containers.ScalarMap[str, str]
    mac: str
    def __init__(self, seq: _Optional[int] = ..., spool_id: _Optional[str] = ..., node_id: _Optional[int] = ..., run_id: _Optional[int] = ..., message_id: _Optional[str] = ..., kind: _Optional[str] = ..., start_unix_s: _Optional[float] = ..., duration_s: _Optional[float] = ..., values: _Optional[_Mapping[str, float]] = ..., labels: _Optional[_Mapping[str, str]] = ..., mac: _Optional[str] = ...) -> None: ...

class ReportAck(_message.Message):
    __slots__ = ("stored_seqs",)
    STORED_SEQS_FIELD_NUMBER: _ClassVar[int]
    stored_seqs: _containers.RepeatedScalarFieldContainer[int]
    def __init__(self, stored_seqs: _Optional[_Iterable[int]] = ...) -> None: ...

class SyncRequest(_message.Message):
    __slots__ = ("node_send_unix_s",)
    NODE_SEND_UNIX_S_FIELD_NUMBER: _ClassVar[int]
    node_send_unix_s: float
    def __init__(self, node_send_unix_s: _Optional[float] = ...) -> None: ...

class SyncReply(_message.Message):
    __slots__ = ("node_send_unix_s", "server_receive_unix_s", "server_send_unix_s")
    NODE_SEND_UNIX_S_FIELD_NUMBER: _ClassVar[int]
    SERVER_RECEIVE_UNIX_S_FIELD_NUMBER: _ClassVar[int]
    SERVER_SEND_UNIX_S_FIELD_NUMBER: _ClassVar[int]
    node_send_unix_s: float
    server_receive_unix_s: float
    server_send_unix_s: float
    def __init__(self, node_send_unix_s: _Optional[float] = ..., server_receive_unix_s: _Optional[float] = ..., server_send_unix_s: _Optional[float] = ...) -> None: ...
