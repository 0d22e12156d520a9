"""Produces the lines of stdin to a topic on one ProduceStream, with durable acks.

    printf 'k1:hello\\nk2:world\\n' | python producer.py orders --key-separator : --header source=py

Each line is one record. With --key-separator, the text before the first separator is the
key (a line without it has a null key); the broker sends a key always to the same partition,
so records with one key keep their order. Every --header goes on every record.

Lines are sent as they come: whatever has arrived is sent at once as one request (up to
--batch records), so typing works interactively and a pipe is batched. Up to --max-in-flight
requests are pipelined on the stream; acks come back in request order.

Errors, by status code (docs/ARCHITECTURE.md, "Status codes"):
- UNAVAILABLE or RESOURCE_EXHAUSTED, for one request or for the whole stream: back off, open a
  new stream and send again every request not yet acked, in order. This is at-least-once: a
  request whose ack was lost may be appended twice, and with more than one request in flight a
  retried request may land after later ones (use --max-in-flight 1 where that matters).
- Anything else for one request (INVALID_ARGUMENT, NOT_FOUND, ...): that request is refused and
  never retried; the stream goes on, and the exit status is 1.
- Anything else for the whole stream: stop at once; requests not acked have an unknown outcome.

Exit status: 0 when every line was acked, 1 otherwise, 2 on bad usage.
"""

import argparse
import collections
import queue
import sys
import threading
import time
from dataclasses import dataclass
from typing import Iterator, List, Optional

import grpc

from rill_common import (
    add_connection_args,
    RETRYABLE,
    Backoff,
    connect_from_args,
    describe,
    log,
    log_pb2,
    log_pb2_grpc,
    records_pb2,
)

# The gRPC status codes by number, as a ProduceStreamResponse carries them in error_code.
STATUS_BY_NUMBER = {code.value[0]: code for code in grpc.StatusCode}
# How often blocked waits look up to see whether their stream has ended.
POLL_S = 0.1


@dataclass
class Pending:
    """A request sent (or about to be) and not yet acked."""

    request: log_pb2.ProduceStreamRequest
    first_line: int
    count: int


class LineReader:
    """Reads stdin on a thread of its own, so the request stream never blocks on it for long."""

    EOF = None

    def __init__(self) -> None:
        self.lines: "queue.Queue[Optional[bytes]]" = queue.Queue(maxsize=10_000)
        self.eof = False
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        for line in sys.stdin.buffer:
            self.lines.put(line.rstrip(b"\r\n"))
        self.lines.put(self.EOF)

    def take(self, most: int, dead: threading.Event) -> List[bytes]:
        """Waits for a first line, then takes whatever else has arrived, up to `most` lines.
        Returns [] at the end of the input or when `dead` is set."""
        out: List[bytes] = []
        while not out:
            if self.eof or dead.is_set():
                return []
            try:
                line = self.lines.get(timeout=POLL_S)
            except queue.Empty:
                continue
            if line is self.EOF:
                self.eof = True
                return []
            out.append(line)
        while len(out) < most:
            try:
                line = self.lines.get_nowait()
            except queue.Empty:
                break
            if line is self.EOF:
                self.eof = True
                break
            out.append(line)
        return out


class Producer:
    """One producer: the stdin reader, the requests not yet acked, and the counts."""

    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.reader = LineReader()
        self.pending: "collections.OrderedDict[int, Pending]" = collections.OrderedDict()
        self.room = threading.Condition()
        self.next_sequence = 0
        self.lines_read = 0
        self.acked = 0
        self.requests_acked = 0
        self.refused = 0
        self.headers = [records_pb2.Header(key=k, value=v.encode()) for k, v in args.header]
        self.ack = {
            "durable": records_pb2.ACK_MODE_DURABLE,
            "leader": records_pb2.ACK_MODE_LEADER,
        }[args.ack]

    def record(self, line: bytes) -> records_pb2.Record:
        """One line as a record: key, value and the --header headers."""
        record = records_pb2.Record(value=line, headers=self.headers)
        if self.args.key is not None:
            record.key = self.args.key.encode()
        elif self.args.key_separator is not None:
            key, sep, value = line.partition(self.args.key_separator.encode())
            if sep:
                record.key, record.value = key, value
        return record

    def requests(self, dead: threading.Event) -> Iterator[log_pb2.ProduceStreamRequest]:
        """The request side of one stream: first every request still unacked (a retry), in
        order, then new lines, keeping at most --max-in-flight requests unacked."""
        with self.room:
            resend = [p.request for p in self.pending.values()]
        yield from resend
        while True:
            with self.room:
                while len(self.pending) >= self.args.max_in_flight and not dead.is_set():
                    self.room.wait(POLL_S)
            lines = self.reader.take(self.args.batch, dead)
            if not lines:
                return  # the end of the input (half-close), or this stream is over
            produce = log_pb2.ProduceRequest(
                topic=self.args.topic,
                ack=self.ack,
                records=records_pb2.RecordList(records=[self.record(x) for x in lines]),
            )
            if self.args.partition is not None:
                produce.partition = self.args.partition
            request = log_pb2.ProduceStreamRequest(sequence=self.next_sequence, request=produce)
            with self.room:
                self.pending[self.next_sequence] = Pending(request, self.lines_read + 1, len(lines))
            self.next_sequence += 1
            self.lines_read += len(lines)
            yield request

    def settle(self, response: log_pb2.ProduceStreamResponse) -> Optional[grpc.StatusCode]:
        """Handles one response. Returns the code of a retryable failure (the request goes
        back at the head of the queue), else None."""
        with self.room:
            pending = self.pending.pop(response.sequence, None)
            self.room.notify_all()
        if pending is None:
            raise RuntimeError(f"a response for unknown sequence {response.sequence}")
        lines = f"lines {pending.first_line}-{pending.first_line + pending.count - 1}"
        if not response.HasField("error_code"):
            self.acked += pending.count
            self.requests_acked += 1
            if self.args.verbose:
                for a in response.response.appends:
                    last = a.base_offset + a.record_count - 1
                    log(f"{lines}: partition {a.partition} offsets {a.base_offset}-{last}")
            return None
        code = STATUS_BY_NUMBER.get(response.error_code, grpc.StatusCode.UNKNOWN)
        if code in RETRYABLE:
            with self.room:
                self.pending[response.sequence] = pending
                self.pending.move_to_end(response.sequence, last=False)
            log(f"{lines}: {code.name}: {response.error_message}")
            return code
        # Bad input is refused before anything is written: sending it again cannot help.
        self.refused += pending.count
        log(f"{lines}: refused, not retrying: {code.name}: {response.error_message}")
        return None

    def run(self, stub: log_pb2_grpc.LogStub) -> int:
        """Streams until every line is acked or refused. Returns the exit status."""
        backoff = Backoff()
        last_progress = time.monotonic()
        while True:
            dead = threading.Event()
            call = stub.ProduceStream(self.requests(dead))
            retry: Optional[str] = None
            try:
                for response in call:
                    acked_before = self.acked + self.refused
                    code = self.settle(response)
                    if code is not None:
                        retry = code.name
                        break
                    if self.acked + self.refused > acked_before:
                        backoff.reset()
                        last_progress = time.monotonic()
                else:
                    with self.room:
                        unacked = len(self.pending)
                    if unacked == 0 and self.reader.eof:
                        break  # done: the input ended and everything is settled
                    retry = "the stream ended early"
            except grpc.RpcError as err:
                if err.code() not in RETRYABLE:
                    with self.room:
                        unknown = sum(p.count for p in self.pending.values())
                    log(f"produce: {describe(err)}; {unknown} records have an unknown outcome")
                    return 1
                retry = describe(err)
            finally:
                dead.set()
                call.cancel()
            delay_s = backoff.next_delay_s()
            if time.monotonic() + delay_s - last_progress > self.args.give_up_after_s:
                with self.room:
                    unknown = sum(p.count for p in self.pending.values())
                log(
                    f"produce: {retry}; no ack for {self.args.give_up_after_s} s, giving up;"
                    f" {unknown} records have an unknown outcome"
                )
                return 1
            log(f"produce: {retry}; new stream in {delay_s * 1000:.0f} ms")
            time.sleep(delay_s)
        print(
            f"acked {self.acked} records in {self.requests_acked} requests"
            f" (ack {self.args.ack}), {self.refused} refused"
        )
        return 0 if self.refused == 0 else 1


def header(text: str):
    key, sep, value = text.partition("=")
    if not sep or not key:
        raise argparse.ArgumentTypeError(f"{text!r}: expected k=v")
    return key, value


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("topic")
    add_connection_args(parser)
    keys = parser.add_mutually_exclusive_group()
    keys.add_argument("--key", help="the key of every record")
    keys.add_argument("--key-separator", help="split each line at the first SEP into key, value")
    parser.add_argument(
        "--header", type=header, action="append", default=[], help="k=v on every record"
    )
    parser.add_argument("--partition", type=int, help="send everything to this partition")
    parser.add_argument(
        "--ack", choices=["durable", "leader"], default="durable", help="default: %(default)s"
    )
    parser.add_argument("--batch", type=int, default=500, help="most records per request")
    parser.add_argument("--max-in-flight", type=int, default=8, help="requests awaiting acks")
    parser.add_argument(
        "--give-up-after-s",
        type=float,
        default=30.0,
        help="stop retrying after this long without an ack (default: %(default)s)",
    )
    parser.add_argument("--verbose", action="store_true", help="log each ack's offsets")
    args = parser.parse_args()
    if args.batch < 1 or args.max_in_flight < 1:
        parser.error("--batch and --max-in-flight must be at least 1")
    with connect_from_args(args) as channel:
        return Producer(args).run(log_pb2_grpc.LogStub(channel))


if __name__ == "__main__":
    sys.exit(main())
