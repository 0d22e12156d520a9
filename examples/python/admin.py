"""Creates topics and subscriptions and describes them and consumer groups, from the .proto
contract alone.

    python admin.py create-topic orders --partitions 3 --flush interval:1000 [--if-not-exists]
    python admin.py describe-topic orders
    python admin.py describe-group billing
    python admin.py create-subscription hooks --topic orders \
        --push-endpoint http://127.0.0.1:8080/ --signing-secret-env RILL_WEBHOOK_SECRET
    python admin.py describe-subscription hooks
    python admin.py delete-subscription hooks

Exit status: 0 on success, 1 when the broker refused the request, 2 on bad usage.
"""

import argparse
import json
import os
import sys

import grpc

from rill_common import (
    add_connection_args,
    admin_pb2,
    admin_pb2_grpc,
    call_with_retry,
    connect_from_args,
    describe,
    groups_pb2,
    groups_pb2_grpc,
    log,
    subscriptions_pb2,
    subscriptions_pb2_grpc,
)

# Every call gets a deadline: a broker that never answers must not hang the tool.
CALL_TIMEOUT_S = 10.0


def flush_policy(text: str) -> admin_pb2.FlushPolicy:
    """`always`, `never` or `interval:MS`, as the broker's --default-flush takes it."""
    if text == "always":
        return admin_pb2.FlushPolicy(always=admin_pb2.Always())
    if text == "never":
        return admin_pb2.FlushPolicy(never=admin_pb2.Never())
    if text.startswith("interval:") and text[len("interval:") :].isdigit():
        return admin_pb2.FlushPolicy(interval_ms=int(text[len("interval:") :]))
    raise argparse.ArgumentTypeError(f"{text!r}: expected always, never or interval:MS")


def flush_text(policy: admin_pb2.FlushPolicy) -> str:
    """The policy as `flush_policy` reads it."""
    which = policy.WhichOneof("policy")
    return f"interval:{policy.interval_ms}" if which == "interval_ms" else str(which)


def create_topic(channel: grpc.Channel, args: argparse.Namespace) -> int:
    config = admin_pb2.TopicConfig(partitions=args.partitions)
    if args.retention_ms is not None:
        config.retention_ms = args.retention_ms
    if args.flush is not None:
        config.flush.CopyFrom(args.flush)
    request = admin_pb2.CreateTopicRequest(name=args.topic, config=config)
    stub = admin_pb2_grpc.AdminStub(channel)
    try:
        # A retried create may have succeeded the first time (the answer was lost), so a
        # retry can meet ALREADY_EXISTS; --if-not-exists makes that a success.
        topic = call_with_retry(
            f"create topic {args.topic}",
            lambda: stub.CreateTopic(request, timeout=CALL_TIMEOUT_S),
        ).topic
    except grpc.RpcError as err:
        if err.code() == grpc.StatusCode.ALREADY_EXISTS and args.if_not_exists:
            print(f"topic {args.topic} already exists")
            return 0
        raise
    print(f"created topic {topic.name} with {topic.config.partitions} partitions")
    return 0


def describe_topic(channel: grpc.Channel, args: argparse.Namespace) -> int:
    stub = admin_pb2_grpc.AdminStub(channel)
    request = admin_pb2.DescribeTopicRequest(name=args.topic)
    topic = call_with_retry(
        f"describe topic {args.topic}",
        lambda: stub.DescribeTopic(request, timeout=CALL_TIMEOUT_S),
    )
    flush = flush_text(topic.config.flush)
    print(f"topic {topic.name}: {topic.config.partitions} partitions, flush {flush}")
    print(f"{'partition':>9} {'log start':>12} {'high watermark':>15} {'bytes':>12}")
    for p in topic.partitions:
        fenced = f"  FENCED: {p.fenced_reason}" if p.HasField("fenced_reason") else ""
        print(
            f"{p.partition:>9} {p.log_start_offset:>12} {p.high_watermark:>15}"
            f" {p.size_bytes:>12}{fenced}"
        )
    return 0


def describe_group(channel: grpc.Channel, args: argparse.Namespace) -> int:
    stub = groups_pb2_grpc.GroupsStub(channel)
    request = groups_pb2.DescribeGroupRequest(group=args.group)
    group = call_with_retry(
        f"describe group {args.group}",
        lambda: stub.DescribeGroup(request, timeout=CALL_TIMEOUT_S),
    )
    if args.json:
        # {"topic": {"partition": {"committed": .., "high_watermark": .., "lag": ..}}}
        out: dict = {}
        for p in group.partitions:
            out.setdefault(p.topic, {})[str(p.partition)] = {
                "committed": p.committed_offset,
                "high_watermark": p.high_watermark,
                "lag": p.lag,
            }
        print(json.dumps(out))
        return 0
    # Lag is what the group has still to read: high watermark - max(committed, log start).
    print(f"{'topic':<20} {'partition':>9} {'committed':>10} {'high watermark':>15} {'lag':>8}")
    for p in group.partitions:
        print(
            f"{p.topic:<20} {p.partition:>9} {p.committed_offset:>10}"
            f" {p.high_watermark:>15} {p.lag:>8}"
        )
    print(f"group {group.group}: total lag {sum(p.lag for p in group.partitions)}")
    return 0


def create_subscription(channel: grpc.Channel, args: argparse.Namespace) -> int:
    config = subscriptions_pb2.SubscriptionConfig(
        topic=args.topic,
        ack_deadline_ms=args.ack_deadline_ms,
        max_delivery_attempts=args.max_attempts,
        dead_letter_topic=args.dead_letter_topic or "",
    )
    if args.push_endpoint:
        config.push.endpoint = args.push_endpoint
        config.push.min_backoff_ms = args.min_backoff_ms
        config.push.max_backoff_ms = args.max_backoff_ms
        if args.signing_secret_env:
            # The secret comes from the environment, never from a flag, where it would show
            # in the process list.
            secret = os.environ.get(args.signing_secret_env)
            if not secret:
                log(f"admin: --signing-secret-env: {args.signing_secret_env} is not set")
                return 2
            config.push.signing_secret = secret
    start = subscriptions_pb2.START_POSITION_EARLIEST
    if args.start == "latest":
        start = subscriptions_pb2.START_POSITION_LATEST
    request = subscriptions_pb2.CreateSubscriptionRequest(
        name=args.name, config=config, start=start
    )
    stub = subscriptions_pb2_grpc.SubscriptionsStub(channel)
    # Not retried: a create whose answer was lost would meet ALREADY_EXISTS on the retry.
    stub.Create(request, timeout=CALL_TIMEOUT_S)
    push = f", pushed to {args.push_endpoint}" if args.push_endpoint else ""
    print(f"created subscription {args.name} on topic {args.topic}{push}")
    return 0


def describe_subscription(channel: grpc.Channel, args: argparse.Namespace) -> int:
    stub = subscriptions_pb2_grpc.SubscriptionsStub(channel)
    request = subscriptions_pb2.DescribeSubscriptionRequest(name=args.name)
    sub = call_with_retry(
        f"describe subscription {args.name}",
        lambda: stub.Describe(request, timeout=CALL_TIMEOUT_S),
    )
    totals = {
        "backlog": sub.backlog,
        "in_flight": sub.in_flight,
        "dead_lettered": sub.dead_lettered,
        "archived": sub.archived,
    }
    if args.json:
        print(json.dumps({"name": sub.name, "topic": sub.config.topic, **totals}))
        return 0
    push = f", pushed to {sub.config.push.endpoint}" if sub.config.HasField("push") else ""
    print(f"subscription {sub.name} on topic {sub.config.topic}{push}")
    print(" ".join(f"{k} {v}" for k, v in totals.items()))
    return 0


def delete_subscription(channel: grpc.Channel, args: argparse.Namespace) -> int:
    stub = subscriptions_pb2_grpc.SubscriptionsStub(channel)
    request = subscriptions_pb2.DeleteSubscriptionRequest(name=args.name)
    stub.Delete(request, timeout=CALL_TIMEOUT_S)
    print(f"deleted subscription {args.name}")
    return 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_connection_args(parser)
    commands = parser.add_subparsers(dest="command", required=True)

    create = commands.add_parser("create-topic", help="create a topic")
    create.add_argument("topic")
    create.add_argument("--partitions", type=int, default=0, help="default: the broker's")
    create.add_argument("--retention-ms", type=int, help="-1 keeps forever")
    create.add_argument("--flush", type=flush_policy, help="always, never or interval:MS")
    create.add_argument(
        "--if-not-exists", action="store_true", help="succeed if the topic already exists"
    )
    create.set_defaults(run=create_topic)

    topic = commands.add_parser("describe-topic", help="a topic's config and partitions")
    topic.add_argument("topic")
    topic.set_defaults(run=describe_topic)

    group = commands.add_parser("describe-group", help="a group's committed offsets and lag")
    group.add_argument("group")
    group.add_argument("--json", action="store_true", help="print JSON, for scripts")
    group.set_defaults(run=describe_group)

    sub = commands.add_parser(
        "create-subscription", help="a queue subscription, optionally pushed to a webhook"
    )
    sub.add_argument("name")
    sub.add_argument("--topic", required=True)
    sub.add_argument("--start", choices=["earliest", "latest"], default="latest")
    sub.add_argument("--ack-deadline-ms", type=int, default=0, help="0: the broker's (30 s)")
    sub.add_argument("--max-attempts", type=int, default=0, help="0: the broker's (5)")
    sub.add_argument("--dead-letter-topic", help="default: records past the attempts are archived")
    sub.add_argument("--push-endpoint", metavar="URL", help="the broker POSTs each record here")
    sub.add_argument("--min-backoff-ms", type=int, default=0, help="0: the broker's (100)")
    sub.add_argument("--max-backoff-ms", type=int, default=0, help="0: the broker's (60000)")
    sub.add_argument(
        "--signing-secret-env",
        metavar="VAR",
        help="sign each push with the secret in this environment variable",
    )
    sub.set_defaults(run=create_subscription)

    sub = commands.add_parser("describe-subscription", help="a subscription's backlog")
    sub.add_argument("name")
    sub.add_argument("--json", action="store_true", help="print JSON, for scripts")
    sub.set_defaults(run=describe_subscription)

    sub = commands.add_parser("delete-subscription", help="delete a subscription")
    sub.add_argument("name")
    sub.set_defaults(run=delete_subscription)

    args = parser.parse_args()
    with connect_from_args(args) as channel:
        try:
            return args.run(channel, args)
        except grpc.RpcError as err:
            # Not retryable (or still failing after the retries): say why and stop.
            log(f"admin: {describe(err)}")
            return 1


if __name__ == "__main__":
    sys.exit(main())
