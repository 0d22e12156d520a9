"""Consumes a topic as a group, at least once: long-poll, handle, then commit.

    python consumer.py orders --group billing                # tail, printing one line per record
    python consumer.py orders --group billing --output json --until-caught-up

The consumer is a member of the group (the next-generation consumer protocol, KIP-848): its
main thread sends GroupHeartbeat every heartbeat interval, and the broker answers with the
partitions this member may own. Several consumers with one group share the partitions:

- A partition in the answer that the member does not own yet gets a thread (below), starting
  at the group's committed offset (FetchOffsets).
- A partition it owns that is no longer in the answer is revoked: its thread stops, commits
  what it handled, and only then does the next heartbeat report it gone. The broker hands it
  to its next owner after that, so no partition is read by two members at once.
- Commits carry the member id and epoch. A member that was fenced (it missed its session
  timeout, --session-timeout-ms) gets FAILED_PRECONDITION on its heartbeats and commits: it
  stops every partition at once (what it handled since its last commit is read again by the
  next owner) and rejoins with epoch 0.
- On SIGINT or SIGTERM each partition commits what it handled, then the member leaves the
  group (epoch -1), so its partitions move at once. After a SIGKILL they move after the
  session timeout.

Each partition is read by a thread of its own, in a loop:

1. Fetch from the partition's position with a long-poll (max_wait_ms): the broker answers as
   soon as records arrive, or with nothing when the wait ends.
2. Handle every record: print it (and flush, so "handled" means "written").
3. Commit the offset after the last handled record (CommitOffsets).

A crash between 2 and 3 means the records of that one fetch are handled again after a
restart: at least once, with at most one fetch (--max-records) per partition repeated. The
start position is the group's committed offset (FetchOffsets), so a restart resumes there.

Where the group has no committed offset, or its offset is no longer in the log (OUT_OF_RANGE:
retention deleted it, or it was never valid), the position is reset by --reset: `earliest`
(the first retained record) or `latest` (only what is produced from now on).

With --until-caught-up the consumer stops once the broker has given it its whole share (it
is not reconciling) and each of its partitions is read to its high watermark.

Errors, by status code (docs/ARCHITECTURE.md, "Status codes"): UNAVAILABLE and
RESOURCE_EXHAUSTED are retried with backoff; OUT_OF_RANGE resets the position by --reset;
FAILED_PRECONDITION on a heartbeat or a commit means fenced (above); anything else stops the
consumer with exit status 1 (it is never retried).
"""

import argparse
import base64
import json
import os
import signal
import sys
import threading
import time
from typing import Dict, List, Optional, Set

import grpc

from rill_batch import BatchError, Record, decode_batches
from rill_common import (
    add_connection_args,
    RETRYABLE,
    Backoff,
    admin_pb2,
    admin_pb2_grpc,
    call_with_retry,
    connect_from_args,
    describe,
    groups_pb2,
    groups_pb2_grpc,
    log,
    log_pb2,
    log_pb2_grpc,
)

# A call's deadline beyond the long-poll's own wait: the broker answers a fetch before the
# deadline (it ends its wait early enough), so this only catches a broker that never answers.
DEADLINE_MARGIN_S = 10.0
# The most bytes one fetch asks for: the broker still returns at least one whole batch.
MAX_FETCH_BYTES = 1024 * 1024


class Fatal(Exception):
    """An error the consumer does not retry: it stops, and exits with status 1."""


class Consumer:
    """One consumer of one topic for one group: a thread per partition."""

    def __init__(self, args: argparse.Namespace, channel: grpc.Channel) -> None:
        self.args = args
        self.log_stub = log_pb2_grpc.LogStub(channel)
        self.groups = groups_pb2_grpc.GroupsStub(channel)
        self.admin = admin_pb2_grpc.AdminStub(channel)
        self.stop = threading.Event()
        self.output_lock = threading.Lock()
        self.failure: Optional[str] = None
        # The fetch each partition's thread is waiting on, so a stop can cancel it.
        self.in_flight: Dict[int, grpc.Future] = {}
        self.in_flight_lock = threading.Lock()
        # The membership: the member's id and epoch (0 joins), the partitions it owns, each
        # with its thread and the event that stops that thread alone.
        self.member_id = ""
        self.member_epoch = 0
        self.threads: Dict[int, threading.Thread] = {}
        self.partition_stop: Dict[int, threading.Event] = {}
        # Set by a partition whose commit was refused as fenced: the heartbeat loop rejoins.
        self.fenced = threading.Event()
        # Wakes the heartbeat loop early.
        self.wake = threading.Event()

    # -- the start position -------------------------------------------------------------

    def committed_offsets(self, partitions: List[int]) -> Dict[int, Optional[int]]:
        """The group's committed offset of each partition given, where it has one."""
        request = groups_pb2.FetchOffsetsRequest(
            group=self.args.group, topic=self.args.topic, partitions=partitions
        )
        response = call_with_retry(
            f"fetch offsets of group {self.args.group}",
            lambda: self.groups.FetchOffsets(request, timeout=DEADLINE_MARGIN_S),
            stop=self.stop,
        )
        offsets: Dict[int, Optional[int]] = {p: None for p in partitions}
        for c in response.offsets:
            offsets[c.partition] = c.offset if c.HasField("offset") else None
        return offsets

    def stopped(self, partition: int) -> bool:
        """Whether the partition's loop must end: the consumer stops, or the partition was
        revoked or lost."""
        event = self.partition_stop.get(partition)
        return self.stop.is_set() or (event is not None and event.is_set())

    def reset_position(self, partition: int, why: str) -> int:
        """The position --reset picks: the log start or the high watermark."""
        spec = {"earliest": log_pb2.OFFSET_SPEC_EARLIEST, "latest": log_pb2.OFFSET_SPEC_LATEST}
        request = log_pb2.ListOffsetsRequest(
            topic=self.args.topic, partition=partition, position=spec[self.args.reset]
        )
        found = call_with_retry(
            f"list offsets of partition {partition}",
            lambda: self.log_stub.ListOffsets(request, timeout=DEADLINE_MARGIN_S),
            stop=self.stop,
        )
        log(f"partition {partition}: {why}; reset to {self.args.reset} offset {found.offset}")
        return found.offset

    # -- the loop -----------------------------------------------------------------------

    def fetch(self, partition: int, offset: int) -> log_pb2.FetchResponse:
        """One long-poll fetch, cancellable by a stop."""
        wait_ms = 0 if self.args.until_caught_up else self.args.max_wait_ms
        request = log_pb2.FetchRequest(
            topic=self.args.topic,
            partition=partition,
            offset=offset,
            max_wait_ms=wait_ms,
            max_bytes=MAX_FETCH_BYTES,
            max_records=self.args.max_records,
            encoding=(
                log_pb2.FETCH_ENCODING_RAW_BATCHES
                if self.args.encoding == "raw"
                else log_pb2.FETCH_ENCODING_RECORDS
            ),
        )
        future = self.log_stub.Fetch.future(request, timeout=wait_ms / 1000 + DEADLINE_MARGIN_S)
        with self.in_flight_lock:
            self.in_flight[partition] = future
        try:
            if self.stopped(partition):
                future.cancel()
            return future.result()
        finally:
            with self.in_flight_lock:
                self.in_flight.pop(partition, None)

    def records(self, response: log_pb2.FetchResponse, offset: int) -> List[Record]:
        """The response's records from `offset` on, whichever encoding was asked for."""
        if self.args.encoding == "raw":
            # Whole stored batches: the first may start before the offset asked for.
            try:
                decoded = decode_batches(b"".join(response.batches))
            except BatchError as err:
                raise Fatal(f"partition {response.partition}: a fetched batch: {err}") from err
            return [r for r in decoded if r.offset >= offset]
        return [
            Record(
                r.offset,
                r.timestamp_ms,
                r.key if r.HasField("key") else None,
                r.value,
                [(h.key, h.value) for h in r.headers],
            )
            for r in response.records
        ]

    def handle(self, partition: int, record: Record) -> None:
        """What this consumer does with a record: print it, flushed."""
        if self.args.output == "json":
            line = json.dumps(
                {
                    "partition": partition,
                    "offset": record.offset,
                    "timestamp_ms": record.timestamp_ms,
                    "key": text(record.key),
                    "value": text(record.value),
                    "headers": [[k, text(v)] for k, v in record.headers],
                }
            )
        else:
            key = "" if record.key is None else record.key.decode("utf-8", "backslashreplace")
            value = record.value.decode("utf-8", "backslashreplace")
            line = f"{partition}\t{record.offset}\t{key}\t{value}"
        with self.output_lock:
            sys.stdout.write(line + "\n")
            sys.stdout.flush()
        if self.args.handle_ms:
            self.stop.wait(self.args.handle_ms / 1000)

    def commit(self, partition: int, offset: int) -> bool:
        """Commits `offset` (one past the last handled record) for one partition, as this
        member. False when refused because the member is fenced: the partition is lost."""
        request = groups_pb2.CommitOffsetsRequest(
            group=self.args.group,
            topic=self.args.topic,
            offsets=[groups_pb2.PartitionOffset(partition=partition, offset=offset)],
            member=groups_pb2.MemberIdentity(
                member_id=self.member_id, member_epoch=self.member_epoch
            ),
        )
        # Committing the same offset twice is harmless, so the commit may be retried; it
        # still goes through when a stop is under way, to save the work just done.
        try:
            call_with_retry(
                f"commit partition {partition} at {offset}",
                lambda: self.groups.CommitOffsets(request, timeout=DEADLINE_MARGIN_S),
            )
        except grpc.RpcError as err:
            if err.code() != grpc.StatusCode.FAILED_PRECONDITION:
                raise
            # The message names the group, the member and the epochs.
            log(f"partition {partition}: commit refused, the member is fenced: {describe(err)}")
            self.fenced.set()
            self.wake.set()
            return False
        return True

    def consume_partition(self, partition: int, committed: Optional[int]) -> None:
        """Fetch, handle, commit, until stopped (or caught up, with --until-caught-up)."""
        offset = committed
        if offset is None:
            offset = self.reset_position(partition, "no committed offset")
        backoff = Backoff()
        while not self.stopped(partition):
            try:
                response = self.fetch(partition, offset)
            except grpc.FutureCancelledError:
                return
            except grpc.RpcError as err:
                code = err.code()
                if code == grpc.StatusCode.CANCELLED and self.stopped(partition):
                    return
                if code == grpc.StatusCode.OUT_OF_RANGE:
                    # The offset is outside [log start, high watermark]: move it by policy.
                    # (The message names both bounds, but it is for people, not for code.)
                    offset = self.reset_position(partition, f"offset {offset} out of range")
                    continue
                if code in RETRYABLE:
                    delay_s = backoff.next_delay_s()
                    log(f"partition {partition}: {describe(err)}; retrying in {delay_s:.2f} s")
                    self.stop.wait(delay_s)
                    continue
                raise Fatal(f"partition {partition}: fetch at {offset}: {describe(err)}") from err
            backoff.reset()
            records = self.records(response, offset)
            for record in records:
                if self.stopped(partition):
                    break  # commit what was handled, and no more
                self.handle(partition, record)
                offset = record.offset + 1
            else:
                # Everything fetched was handled: continue where the broker says.
                offset = max(offset, response.next_offset)
            if offset != committed:
                if not self.commit(partition, offset):
                    return  # fenced: the partition is lost
                committed = offset
            if self.args.until_caught_up and offset >= response.high_watermark:
                return

    def run_partition(self, partition: int, committed: Optional[int]) -> None:
        """The thread's body: a failure in one partition stops them all."""
        try:
            self.consume_partition(partition, committed)
        except (Fatal, grpc.RpcError) as err:
            message = describe(err) if isinstance(err, grpc.RpcError) else str(err)
            self.fail(message)
        except Exception as err:  # a bug: stop everything rather than leave a dead thread
            self.fail(f"partition {partition}: {type(err).__name__}: {err}")

    def fail(self, message: str) -> None:
        log(f"consumer: {message}; stopping (not retried)")
        self.failure = self.failure or message
        self.request_stop()

    def request_stop(self) -> None:
        """Stops every partition's loop: waiting fetches are cancelled; a commit under way
        finishes."""
        self.stop.set()
        self.wake.set()
        with self.in_flight_lock:
            for future in self.in_flight.values():
                future.cancel()

    # -- the membership -----------------------------------------------------------------

    def start_partitions(self, partitions: List[int]) -> None:
        """Starts a thread for each newly assigned partition, at the group's offset."""
        offsets = self.committed_offsets(partitions)
        for p in partitions:
            self.partition_stop[p] = threading.Event()
            thread = threading.Thread(
                target=self.run_partition, args=(p, offsets[p]), name=f"partition-{p}"
            )
            self.threads[p] = thread
            thread.start()

    def stop_partitions(self, partitions: Set[int]) -> None:
        """Stops the partitions' threads and waits for them: each commits what it handled
        first (unless the member is fenced)."""
        for p in partitions:
            self.partition_stop[p].set()
            with self.in_flight_lock:
                future = self.in_flight.get(p)
            if future is not None:
                future.cancel()
        for p in partitions:
            # Joined with a timeout so the main thread keeps taking signals (Ctrl-C).
            while self.threads[p].is_alive():
                self.threads[p].join(0.2)
            del self.threads[p]
            del self.partition_stop[p]

    def heartbeat(self, epoch: int) -> groups_pb2.GroupHeartbeatResponse:
        """One GroupHeartbeat: a join (epoch 0) carries the subscription and the timeout;
        every heartbeat carries the partitions owned now."""
        joining = epoch == 0
        request = groups_pb2.GroupHeartbeatRequest(
            group=self.args.group,
            member_id=self.member_id,
            member_epoch=epoch,
            owned_partitions=groups_pb2.PartitionSet(
                topics=[
                    groups_pb2.TopicPartitions(
                        topic=self.args.topic, partitions=sorted(self.threads)
                    )
                ]
            ),
        )
        if joining:
            request.subscribed_topics.topics.append(self.args.topic)
            if self.args.session_timeout_ms:
                request.session_timeout_ms = self.args.session_timeout_ms
        return self.groups.GroupHeartbeat(request, timeout=DEADLINE_MARGIN_S)

    def lose_all(self, why: str) -> None:
        """Fenced: every partition stops at once (their commits would be refused), and the
        member rejoins with epoch 0."""
        if self.threads:
            log(f"member {self.member_id}: lost partitions {sorted(self.threads)}: {why}")
        self.stop_partitions(set(self.threads))
        self.member_epoch = 0
        self.fenced.clear()

    def run(self) -> int:
        """The heartbeat loop, in the main thread, until stopped, caught up or failed."""
        backoff = Backoff()
        last_ok = time.monotonic()
        interval_s = 1.0
        session_s = (self.args.session_timeout_ms or 45_000) / 1000
        while not self.stop.is_set():
            if self.fenced.is_set():
                self.lose_all("a commit was refused")
            try:
                response = self.heartbeat(self.member_epoch)
            except grpc.RpcError as err:
                code = err.code()
                if code == grpc.StatusCode.FAILED_PRECONDITION:
                    self.lose_all(describe(err))
                    continue
                if code not in RETRYABLE:
                    self.fail(f"heartbeat: {describe(err)}")
                    break
                if time.monotonic() - last_ok > session_s:
                    self.lose_all("no heartbeat answered for the session timeout")
                    last_ok = time.monotonic()
                delay_s = backoff.next_delay_s()
                log(f"heartbeat: {describe(err)}; retrying in {delay_s:.2f} s")
                self.stop.wait(delay_s)
                continue
            except Fatal as err:
                self.fail(str(err))
                break
            backoff.reset()
            last_ok = time.monotonic()
            self.member_id = response.member_id
            self.member_epoch = response.member_epoch
            interval_s = max(response.heartbeat_interval_ms, 1) / 1000
            assigned = {
                p
                for tp in response.assignment.topics
                if tp.topic == self.args.topic
                for p in tp.partitions
            }
            owned = set(self.threads)
            revoked = owned - assigned
            if revoked:
                log(f"member {self.member_id}: revoked {sorted(revoked)}")
                self.stop_partitions(revoked)
                continue  # report them gone at once: their next owner is waiting
            added = sorted(assigned - owned)
            if added:
                log(f"member {self.member_id} epoch {self.member_epoch}: assigned {added}")
                try:
                    self.start_partitions(added)
                except grpc.RpcError as err:
                    self.fail(f"starting partitions {added}: {describe(err)}")
                    break
            if (
                self.args.until_caught_up
                and not response.reconciling
                and not any(t.is_alive() for t in self.threads.values())
            ):
                break
            self.wake.wait(interval_s)
            self.wake.clear()
        # Each partition commits what it handled, then the member leaves: its partitions move
        # at once.
        self.request_stop()
        self.stop_partitions(set(self.threads))
        if self.member_id and self.member_epoch > 0:
            try:
                self.heartbeat(-1)
            except grpc.RpcError as err:
                log(f"leaving the group: {describe(err)}")
        return 1 if self.failure else 0


def text(data: Optional[bytes]):
    """Bytes for JSON: UTF-8 text as a string, anything else as {"base64": ...}."""
    if data is None:
        return None
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        return {"base64": base64.b64encode(data).decode("ascii")}


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("topic")
    parser.add_argument("--group", required=True, help="the group to join")
    parser.add_argument(
        "--session-timeout-ms",
        type=int,
        default=None,
        help="the group's session timeout (the broker's default is 45000): a member not heard "
        "from for this long loses its partitions",
    )
    add_connection_args(parser)
    parser.add_argument(
        "--reset",
        choices=["earliest", "latest"],
        default="earliest",
        help="where to start without a committed offset, or when it is out of range",
    )
    parser.add_argument("--max-wait-ms", type=int, default=5_000, help="long-poll wait")
    parser.add_argument("--max-records", type=int, default=100, help="most records per fetch")
    parser.add_argument(
        "--encoding",
        choices=["records", "raw"],
        default="records",
        help="records: decoded by the broker; raw: stored batches, decoded here (rill_batch.py)",
    )
    parser.add_argument("--output", choices=["text", "json"], default="text")
    parser.add_argument(
        "--until-caught-up",
        action="store_true",
        help="stop once every partition is read to its high watermark (fetches do not wait)",
    )
    parser.add_argument(
        "--handle-ms", type=int, default=0, help="pretend each record takes this long to handle"
    )
    args = parser.parse_args()
    if args.max_records < 1:
        parser.error("--max-records must be at least 1")
    with connect_from_args(args) as channel:
        consumer = Consumer(args, channel)
        # SIGINT and SIGTERM stop cleanly: each partition commits what it handled, then ends
        # (retrying the commit while the broker is unavailable). A second one exits at once.
        def on_signal(signum, _frame):
            if consumer.stop.is_set():
                os._exit(128 + signum)
            consumer.request_stop()

        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, on_signal)
        return consumer.run()


if __name__ == "__main__":
    sys.exit(main())
