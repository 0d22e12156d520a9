"""What the three examples share: the generated code, the channel, and the retry policy.

Rill's status codes say what a client may do next (the table is in docs/ARCHITECTURE.md,
"Status codes"). Retries are decided by the code, never by the message text:

- UNAVAILABLE (the broker is restarting, or a transient fault) and RESOURCE_EXHAUSTED (a full
  disk, too many waiting fetches): try again later, with exponential backoff and jitter.
- OUT_OF_RANGE on a fetch: the offset must move first; the consumer resets it by its policy.
- Everything else (INVALID_ARGUMENT, NOT_FOUND, ALREADY_EXISTS, FAILED_PRECONDITION,
  DATA_LOSS, INTERNAL, ...): the same request would fail again, so it is never retried.
"""

import argparse
import collections
import os
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
from rill.v1 import subscriptions_pb2, subscriptions_pb2_grpc  # noqa: E402

__all__ = [
    "admin_pb2",
    "admin_pb2_grpc",
    "groups_pb2",
    "groups_pb2_grpc",
    "log_pb2",
    "log_pb2_grpc",
    "records_pb2",
    "subscriptions_pb2",
    "subscriptions_pb2_grpc",
    "RETRYABLE",
    "Backoff",
    "add_connection_args",
    "call_with_retry",
    "connect",
    "connect_from_args",
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


def connect(
    address: str, *, tls_ca: Optional[str] = None, token: Optional[str] = None
) -> grpc.Channel:
    """Opens a channel to the broker at `address` (host:port).

    With `tls_ca` (a PEM file of CA certificates) the channel is TLS and trusts only those
    CAs; the broker's certificate must name the host of `address` (a name, or an IP address
    as a SAN). Without it the channel is plaintext. A broker that serves TLS only answers a
    plaintext client FAILED_PRECONDITION, which is not retried.

    With `token`, every call carries `authorization: Bearer <token>` metadata; a broker with
    authentication on answers a call without a valid token UNAUTHENTICATED (not retried).

    The channel connects lazily and reconnects by itself; a call made while the broker is
    down fails with UNAVAILABLE, which the callers below retry.
    """
    options = [
        ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
        ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
        # While the broker is down, calls fail at once with UNAVAILABLE and the channel
        # reconnects in the background. gRPC's own reconnect backoff grows to 2 minutes;
        # cap it like the callers' backoff, so a restarted broker is found within seconds.
        ("grpc.initial_reconnect_backoff_ms", 100),
        ("grpc.min_reconnect_backoff_ms", 100),
        ("grpc.max_reconnect_backoff_ms", 5_000),
    ]
    if tls_ca:
        with open(tls_ca, "rb") as f:
            credentials = grpc.ssl_channel_credentials(root_certificates=f.read())
        channel = grpc.secure_channel(address, credentials, options=options)
    else:
        channel = grpc.insecure_channel(address, options=options)
    if token:
        # Metadata added by an interceptor works on plaintext channels too (gRPC refuses
        # call credentials there), e.g. a broker with tokens on loopback without TLS.
        channel = grpc.intercept_channel(channel, _BearerToken(token))
    return channel


def add_connection_args(parser: argparse.ArgumentParser) -> None:
    """Adds --broker, --tls-ca and --token (and their environment variables) to `parser`."""
    parser.add_argument(
        "--broker",
        default=os.environ.get("RILL_BROKER", DEFAULT_BROKER),
        help="host:port (default: $RILL_BROKER or %(default)s)",
    )
    parser.add_argument(
        "--tls-ca",
        metavar="FILE",
        default=os.environ.get("RILL_TLS_CA") or None,
        help="connect with TLS, trusting the CA certificates (PEM) in FILE "
        "(default: $RILL_TLS_CA; without either the channel is plaintext)",
    )
    parser.add_argument(
        "--token",
        default=os.environ.get("RILL_TOKEN") or None,
        help="send `authorization: Bearer TOKEN` on every call (default: $RILL_TOKEN, which "
        "is better: a flag shows in the process list)",
    )


def connect_from_args(args: argparse.Namespace) -> grpc.Channel:
    """`connect` with the options `add_connection_args` added."""
    return connect(args.broker, tls_ca=args.tls_ca, token=args.token)


class _CallDetails(
    collections.namedtuple(
        "_CallDetails",
        ("method", "timeout", "metadata", "credentials", "wait_for_ready", "compression"),
    ),
    grpc.ClientCallDetails,
):
    """A call's details with the metadata replaced (grpc.ClientCallDetails is abstract)."""


class _BearerToken(
    grpc.UnaryUnaryClientInterceptor,
    grpc.UnaryStreamClientInterceptor,
    grpc.StreamUnaryClientInterceptor,
    grpc.StreamStreamClientInterceptor,
):
    """Adds `authorization: Bearer <token>` to the metadata of every call."""

    def __init__(self, token: str) -> None:
        self._header = ("authorization", f"Bearer {token}")

    def _with_token(self, details: grpc.ClientCallDetails) -> _CallDetails:
        metadata = [*(details.metadata or ()), self._header]
        return _CallDetails(
            details.method,
            details.timeout,
            metadata,
            details.credentials,
            getattr(details, "wait_for_ready", None),
            getattr(details, "compression", None),
        )

    def intercept_unary_unary(self, continuation, details, request):
        return continuation(self._with_token(details), request)

    def intercept_unary_stream(self, continuation, details, request):
        return continuation(self._with_token(details), request)

    def intercept_stream_unary(self, continuation, details, requests):
        return continuation(self._with_token(details), requests)

    def intercept_stream_stream(self, continuation, details, requests):
        return continuation(self._with_token(details), requests)


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
