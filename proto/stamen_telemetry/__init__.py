"""Generated stubs of Stamen's telemetry service (proto/stamen_telemetry/telemetry.proto).

Regenerate with ``make proto``; do not edit the ``*_pb2*`` files by hand.
"""
