"""What the three examples share: the generated code, the channel, and the retry policy.

Rill's status codes say what a client may do next (the table is in docs/ARCHITECTURE.md,
"Status codes"). Retries are decided by the code, never by the message text:

- UNAVAILABLE (the broker is restarting, or a transient fault) and RESOURCE_EXHAUSTED (a full
  disk, too many waiting fetches): try again later, with exponential backoff and jitter.
- OUT_OF_RANGE on a fetch: the offset must move first; the consumer resets it by its policy.
- Everything else (INVALID_ARGUMENT, NOT_FOUND, ALREADY_EXISTS, FAILED_PRECONDITION,
  DATA_LOSS, INTERNAL, ...): the same request would fail again, so it is never retried.
"""

import pathlib
import random
import sys
import threading
import time
from typing import Callable, Optional, TypeVar

import grpc

_GEN = pathlib.Path(__file__).resolve().parent / "gen"
if not (_GEN / "rill" / "v1" / "log_pb2.py").exists():
    sys.exit(f"{_GEN} holds no generated code: run `python generate.py` first (see README.md)")
sys.path.insert(0, str(_GEN))

# Re-exported for the examples: `from rill_common import log_pb2, ...`.
from rill.v1 import admin_pb2, admin_pb2_grpc  # noqa: E402
from rill.v1 import groups_pb2, groups_pb2_grpc  # noqa: E402
from rill.v1 import log_pb2, log_pb2_grpc  # noqa: E402
from rill.v1 import records_pb2  # noqa: E402

__all__ = [
    "admin_pb2",
    "admin_pb2_grpc",
    "groups_pb2",
    "groups_pb2_grpc",
    "log_pb2",
    "log_pb2_grpc",
    "records_pb2",
    "RETRYABLE",
    "Backoff",
    "call_with_retry",
    "connect",
    "describe",
]

DEFAULT_BROKER = "127.0.0.1:7171"

# The codes a client retries as they are (after a pause). Nothing else is retried.
RETRYABLE = frozenset({grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.RESOURCE_EXHAUSTED})

# The largest response the examples accept. The broker answers a fetch with about max_bytes
# (which the consumer sets), but always with at least one whole batch, which may be as large
# as the broker's largest batch (16 MiB by default), so leave room above that.
MAX_MESSAGE_BYTES = 64 * 1024 * 1024

T = TypeVar("T")


def connect(address: str) -> grpc.Channel:
    """Opens a plaintext channel to the broker at `address` (host:port).

    The channel connects lazily and reconnects by itself; a call made while the broker is
    down fails with UNAVAILABLE, which the callers below retry.
    """
    return grpc.insecure_channel(
        address,
        options=[
            ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
            ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
            # While the broker is down, calls fail at once with UNAVAILABLE and the channel
            # reconnects in the background. gRPC's own reconnect backoff grows to 2 minutes;
            # cap it like the callers' backoff, so a restarted broker is found within seconds.
            ("grpc.initial_reconnect_backoff_ms", 100),
            ("grpc.min_reconnect_backoff_ms", 100),
            ("grpc.max_reconnect_backoff_ms", 5_000),
        ],
    )


def describe(err: grpc.RpcError) -> str:
    """`CODE: message` for a failed call; the broker's messages name the topic, partition
    and offset involved."""
    code = err.code() if hasattr(err, "code") else None
    details = err.details() if hasattr(err, "details") else str(err)
    return f"{code.name if code else 'UNKNOWN'}: {details}"


def log(message: str) -> None:
    """Progress and errors go to stderr, so stdout carries only the data."""
    # One write per line, so lines from several threads do not interleave.
    sys.stderr.write(message + "\n")
    sys.stderr.flush()


class Backoff:
    """Exponential backoff with full jitter: the n-th pause is a random time up to
    min(cap, base * 2^n), so clients that failed together do not all come back together."""

    def __init__(self, base_ms: int = 100, cap_ms: int = 5_000) -> None:
        self.base_ms = base_ms
        self.cap_ms = cap_ms
        self.attempt = 0

    def next_delay_s(self) -> float:
        """The pause before the next attempt, in seconds; each call doubles the ceiling."""
        ceiling_ms = min(self.cap_ms, self.base_ms * (2**self.attempt))
        self.attempt += 1
        return random.uniform(ceiling_ms / 2, ceiling_ms) / 1000

    def reset(self) -> None:
        """Starts over after a success."""
        self.attempt = 0


def call_with_retry(
    what: str,
    call: Callable[[], T],
    *,
    give_up_after_s: float = 30.0,
    stop: Optional[threading.Event] = None,
) -> T:
    """Runs `call`, retrying it with backoff while it fails with a RETRYABLE code.

    Only idempotent calls may be wrapped: a retried call may have taken effect the first time.
    Any other code is raised at once. After `give_up_after_s` of failures the last error is
    raised. `stop`, when set, ends the waiting early (the last error is raised).
    """
    backoff = Backoff()
    deadline = time.monotonic() + give_up_after_s
    while True:
        try:
            return call()
        except grpc.RpcError as err:
            if err.code() not in RETRYABLE:
                raise
            delay_s = backoff.next_delay_s()
            if time.monotonic() + delay_s > deadline:
                log(f"{what}: {describe(err)}; giving up after {give_up_after_s:.0f} s")
                raise
            log(f"{what}: {describe(err)}; retrying in {delay_s * 1000:.0f} ms")
            if stop is not None and stop.wait(delay_s):
                raise
            if stop is None:
                time.sleep(delay_s)
