"""Receives a subscription's records pushed by the broker (webhooks), verifies each request's
signature, prints the record, and acks it; standard library only.

    RILL_WEBHOOK_SECRET=... python webhook_receiver.py --listen 127.0.0.1:8080
    RILL_WEBHOOK_SECRET=... python admin.py create-subscription hooks --topic orders \\
        --push-endpoint http://127.0.0.1:8080/ --signing-secret-env RILL_WEBHOOK_SECRET

The broker POSTs one record per request, a JSON envelope:

    {"subscription": "hooks", "message": {"message_id": "orders/0/42", "topic": "orders",
     "partition": 0, "offset": 42, "key": "<base64 or null>", "data": "<base64>",
     "attributes": {"source": "cli"}, "publish_time_ms": ..., "delivery_attempt": 1}}

with the header `rill-signature: t=<unix ms>,v1=<hex HMAC-SHA256 of "<t>.<body>">`, keyed
with the subscription's signing secret. This receiver answers:

- 200 (the broker acks the record) once the signature is verified and the record printed;
- 401 when the signature is missing, wrong, or its time is more than --max-age-s away from
  now (a replayed request); 400 when the body is not an envelope. Anything but a 2xx is a
  nack: the broker delivers the record again later, with backoff, and dead-letters it after
  the subscription's max delivery attempts.

Delivery is at least once: a 200 that is lost, or sent after the ack deadline, brings the
record again; `message_id` (topic/partition/offset) identifies it.

The listening address goes to stderr (`listening on http://HOST:PORT/`), records to stdout.
"""

import argparse
import base64
import binascii
import hashlib
import hmac
import http.server
import json
import os
import signal
import sys
import threading
import time
from typing import Optional

SIGNATURE_HEADER = "rill-signature"


def verify(secret: bytes, header: Optional[str], body: bytes, now_ms: int, max_age_ms: int) -> str:
    """Checks `header` against `body`: returns "" when it holds, else why not.

    The broker signs `"<t>.<body>"` with HMAC-SHA256; `t` is its clock in unix ms. The time is
    part of what is signed, so an attacker cannot refresh it, and a request older (or newer)
    than `max_age_ms` is refused: a captured request cannot be replayed later.
    """
    if not header:
        return f"no {SIGNATURE_HEADER} header"
    fields: dict = {}
    for part in header.split(","):
        name, sep, value = part.strip().partition("=")
        if sep:
            fields.setdefault(name, []).append(value)
    t = fields.get("t", [""])[0]
    if not t.lstrip("-").isdigit():
        return f"{SIGNATURE_HEADER} has no time t="
    expected = hmac.new(secret, t.encode() + b"." + body, hashlib.sha256).hexdigest()
    # compare_digest takes as long whatever the first differing byte, so timing does not
    # reveal how much of a forged signature was right. Any v1 may match (room for a rotation).
    if not any(hmac.compare_digest(expected, v) for v in fields.get("v1", [])):
        return "signature does not match"
    if abs(now_ms - int(t)) > max_age_ms:
        return f"signature time {t} is more than {max_age_ms} ms from now ({now_ms})"
    return ""


def decode(field: Optional[str]) -> Optional[str]:
    """A base64 key or value as text (UTF-8, lossy); None stays None."""
    if field is None:
        return None
    return base64.b64decode(field, validate=True).decode("utf-8", errors="replace")


class Receiver(http.server.ThreadingHTTPServer):
    """The HTTP server, with what every request handler shares."""

    # Requests arrive concurrently (the broker keeps up to max_in_flight outstanding).
    daemon_threads = True

    def __init__(self, address, secret: bytes, args: argparse.Namespace) -> None:
        super().__init__(address, Handler)
        self.secret = secret
        self.args = args
        self.print_lock = threading.Lock()
        self.counts = {"acked": 0, "refused": 0}


class Handler(http.server.BaseHTTPRequestHandler):
    """One connection; the broker reuses it for many requests (HTTP/1.1 keep-alive)."""

    protocol_version = "HTTP/1.1"
    server: Receiver

    def do_POST(self) -> None:
        length = int(self.headers.get("Content-Length") or 0)
        body = self.rfile.read(length)
        why = verify(
            self.server.secret,
            self.headers.get(SIGNATURE_HEADER),
            body,
            int(time.time() * 1000),
            int(self.server.args.max_age_s * 1000),
        )
        if why:
            self.refuse(401, why)
            return
        try:
            envelope = json.loads(body)
            message = envelope["message"]
            record = {
                "subscription": envelope["subscription"],
                "message_id": message["message_id"],
                "partition": message["partition"],
                "offset": message["offset"],
                "key": decode(message.get("key")),
                "value": decode(message["data"]),
                "headers": message.get("attributes") or {},
                "delivery_attempt": message.get("delivery_attempt"),
            }
        except (ValueError, KeyError, TypeError, binascii.Error) as err:
            self.refuse(400, f"not a record envelope: {err!r}")
            return
        # Handle first (print and flush), then ack: at least once.
        with self.server.print_lock:
            if self.server.args.output == "json":
                print(json.dumps(record), flush=True)
            else:
                key = "" if record["key"] is None else f"{record['key']}: "
                print(f"{record['message_id']} {key}{record['value']}", flush=True)
            self.server.counts["acked"] += 1
        self.answer(200, b"")

    def refuse(self, status: int, why: str) -> None:
        with self.server.print_lock:
            self.server.counts["refused"] += 1
        sys.stderr.write(f"refused a request with {status}: {why}\n")
        sys.stderr.flush()
        self.answer(status, why.encode())

    def answer(self, status: int, body: bytes) -> None:
        self.send_response(status)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args) -> None:
        """Quiet: a line per request would drown the records; refusals are logged above."""


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--listen", default="127.0.0.1:8080", help="HOST:PORT; port 0 picks a free one"
    )
    parser.add_argument(
        "--signing-secret-env",
        metavar="VAR",
        default="RILL_WEBHOOK_SECRET",
        help="the environment variable holding the subscription's signing secret "
        "(default: %(default)s)",
    )
    parser.add_argument(
        "--max-age-s",
        type=float,
        default=300.0,
        help="refuse a signature whose time is further than this from now (default: %(default)s)",
    )
    parser.add_argument("--output", choices=["text", "json"], default="text")
    args = parser.parse_args()
    secret = os.environ.get(args.signing_secret_env)
    if not secret:
        parser.error(f"{args.signing_secret_env} is not set: the receiver verifies every request")
    host, sep, port = args.listen.rpartition(":")
    if not sep or not port.isdigit():
        parser.error(f"--listen {args.listen!r}: expected HOST:PORT")
    server = Receiver((host.strip("[]"), int(port)), secret.encode(), args)
    bound_host, bound_port = server.server_address[:2]
    sys.stderr.write(f"listening on http://{bound_host}:{bound_port}/\n")
    sys.stderr.flush()

    # SIGTERM and SIGINT stop the server (from another thread: shutdown waits for the loop).
    def on_signal(_signum, _frame):
        threading.Thread(target=server.shutdown, daemon=True).start()

    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, on_signal)
    server.serve_forever()
    server.server_close()
    counts = server.counts
    sys.stderr.write(f"acked {counts['acked']} requests, refused {counts['refused']}\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
