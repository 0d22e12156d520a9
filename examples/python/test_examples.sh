#!/usr/bin/env bash
# Runs the Python examples against a real rill-broker and checks what they deliver.
#
#   examples/python/test_examples.sh            # with `python` on PATH (the virtualenv's)
#   PYTHON=.venv/bin/python examples/python/test_examples.sh
#
# Needs requirements.txt installed and `python generate.py` run. The broker is
# $RILL_BROKER_BIN, else the newer of target/{debug,release}/rill-broker, built if neither
# exists. It listens on 127.0.0.1 port 0 with a fresh data folder, and is stopped by its PID
# when the script exits, however it exits. Every wait has a deadline.
# The last line is `python examples: N passed, M failed`; the exit status is 1 if M > 0.
# KEEP_WORK=1 keeps the work folder (data, certificates, outputs) to look into a failure.
set -uo pipefail

HERE="$(cd "$(dirname "$0")" && pwd)"
ROOT="$(cd "$HERE/../.." && pwd)"
PY="${PYTHON:-python}"
# A relative PYTHON is relative to where the script was started, not to this folder.
case "$PY" in
  /*) ;;
  */*) PY="$(cd "$(dirname "$PY")" && pwd)/$(basename "$PY")" ;;
esac
cd "$HERE"

passed=0
failed=0
ok() { passed=$((passed + 1)); echo "ok    $1"; }
not_ok() { failed=$((failed + 1)); echo "FAIL  $1"; }
# check NAME COMMAND...: one check, passed when the command succeeds.
check() {
  local name="$1"
  shift
  if "$@"; then ok "$name"; else not_ok "$name"; fi
}
finish() {
  echo "python examples: $passed passed, $failed failed"
  [ "$failed" = 0 ]
  exit
}

WORK="$(mktemp -d "${TMPDIR:-/tmp}/rill-python-examples.XXXXXX")"
BROKER_PID=""
CONSUMER_PID=""
PRODUCER_PID=""
HOLDER_PID=""
RECEIVER_PID=""
BAD_RECEIVER_PID=""
# Stops the clients first (a consumer commits on SIGTERM, which needs the broker), then the
# broker; each by its PID, with a deadline before SIGKILL.
cleanup() {
  local pid
  for pid in $CONSUMER_PID $PRODUCER_PID $HOLDER_PID $RECEIVER_PID $BAD_RECEIVER_PID; do
    kill "$pid" 2>/dev/null
  done
  for pid in $CONSUMER_PID $PRODUCER_PID $HOLDER_PID $RECEIVER_PID $BAD_RECEIVER_PID $BROKER_PID; do
    [ "$pid" = "$BROKER_PID" ] && kill "$pid" 2>/dev/null
    wait_for 30 "process $pid to exit" exited "$pid" || kill -9 "$pid" 2>/dev/null
    wait "$pid" 2>/dev/null
  done
  # KEEP_WORK=1 keeps the data and every output, to look into a failure.
  if [ -n "${KEEP_WORK:-}" ]; then echo "kept $WORK"; else rm -rf "$WORK"; fi
}
trap cleanup EXIT
trap 'exit 130' INT TERM

# wait_for SECONDS DESCRIPTION COMMAND...: polls COMMAND every 0.1 s until it succeeds.
# A COMMAND that returns 2 says the wait is hopeless (the process it watches has exited).
wait_for() {
  local seconds="$1" what="$2" status
  local deadline=$((SECONDS + seconds))
  shift 2
  while true; do
    "$@"
    status=$?
    [ "$status" = 0 ] && return 0
    if [ "$status" = 2 ]; then
      echo "gave up waiting for $what: the process exited" >&2
      return 1
    fi
    if [ "$SECONDS" -ge "$deadline" ]; then
      echo "timed out after $seconds s waiting for $what" >&2
      return 1
    fi
    sleep 0.1
  done
}
exited() { ! kill -0 "$1" 2>/dev/null; }
lines_in() { [ -f "$1" ] && wc -l <"$1" || echo 0; }

# --- unit tests of the batch decoder (no broker) -------------------------------------------
check "rill_batch decodes the FORMAT.md example and refuses damaged batches" \
  "$PY" -m unittest -q test_batch
check "webhook_receiver verifies signatures and answers 200, 401 or 400" \
  "$PY" -m unittest -q test_webhook >"$WORK/test_webhook.out" 2>&1

# --- the broker ----------------------------------------------------------------------------
BIN="${RILL_BROKER_BIN:-}"
if [ -z "$BIN" ]; then
  for candidate in "$ROOT/target/debug/rill-broker" "$ROOT/target/release/rill-broker"; do
    if [ -x "$candidate" ] && { [ -z "$BIN" ] || [ "$candidate" -nt "$BIN" ]; }; then
      BIN="$candidate"
    fi
  done
fi
if [ -z "$BIN" ]; then
  echo "no rill-broker binary: building it (cargo build -p rill-broker)"
  (cd "$ROOT" && timeout 900 cargo build -q -p rill-broker --bin rill-broker) || {
    not_ok "build rill-broker"
    finish
  }
  BIN="$ROOT/target/debug/rill-broker"
fi
# start_broker LISTEN [FLAGS...]: starts the broker on $DATA_DIR; sets BROKER_PID and ADDR.
# Each start writes a new stdout file: the background shell creates it later, and an old one
# would show the previous start's address.
BROKER_STARTS=0
DATA_DIR="$WORK/data"
start_broker() {
  BROKER_STARTS=$((BROKER_STARTS + 1))
  BROKER_OUT="$WORK/broker-$BROKER_STARTS.out"
  "$BIN" --data-dir "$DATA_DIR" --listen "$@" >"$BROKER_OUT" 2>>"$WORK/broker.err" &
  BROKER_PID=$!
  if ! wait_for 30 "rill-broker to listen" broker_listening; then
    tail -20 "$WORK/broker.err"
    return 1
  fi
  ADDR="$(sed -n 's/^rill-broker listening on //p' "$BROKER_OUT" | head -1)"
  [ -n "$ADDR" ]
}
broker_listening() {
  kill -0 "$BROKER_PID" 2>/dev/null || return 2
  grep -qs '^rill-broker listening on ' "$BROKER_OUT" || return 1
}
# stop PID: SIGTERM, then waits for it to exit (with a deadline); returns its exit status.
stop() {
  kill -TERM "$1" 2>/dev/null
  wait_for 30 "process $1 to exit" exited "$1" || kill -9 "$1" 2>/dev/null
  wait "$1"
}
if ! start_broker 127.0.0.1:0; then
  not_ok "start rill-broker ($BIN)"
  finish
fi
export RILL_BROKER="$ADDR"
echo "broker $BIN on $ADDR"

# --- admin: create a topic -----------------------------------------------------------------
create_topic() {
  "$PY" admin.py create-topic events --partitions 3 --flush interval:100 >"$WORK/create.out" &&
    grep -q "created topic events with 3 partitions" "$WORK/create.out"
}
check "admin.py creates a topic with 3 partitions" create_topic

# --- produce 1,000 lines, keyed, with a header, durable acks --------------------------------
for i in $(seq 1 1000); do
  printf 'key-%d:line-%04d\n' $((i % 10)) "$i"
done >"$WORK/input.txt"
produce() {
  timeout 60 "$PY" producer.py events --key-separator : --header source=test --batch 100 \
    <"$WORK/input.txt" >"$WORK/produce.out" 2>"$WORK/produce.err" &&
    grep -q "^acked 1000 records in 10 requests (ack durable), 0 refused" "$WORK/produce.out"
}
check "producer.py produces 1000 lines on a ProduceStream with durable acks" produce

# --- consume in two runs, the first killed with SIGKILL part-way ----------------------------
# The first run pretends each record takes 5 ms, so it is killed mid-way, with records
# handled but not yet committed.
MAX_RECORDS=50
# A short session timeout: the killed member holds its partitions for that long, then the
# second run (a new member of the group) gets them.
SESSION_MS=3000
"$PY" consumer.py events --group readers --output json --max-records "$MAX_RECORDS" \
  --session-timeout-ms "$SESSION_MS" --handle-ms 5 >"$WORK/run1.jsonl" 2>"$WORK/run1.err" &
CONSUMER_PID=$!
consumer_handled_some() {
  kill -0 "$CONSUMER_PID" 2>/dev/null || return 2
  [ "$(lines_in "$WORK/run1.jsonl")" -ge 250 ]
}
if wait_for 60 "the first consumer to handle 250 records" consumer_handled_some; then
  kill -9 "$CONSUMER_PID"
  wait "$CONSUMER_PID" 2>/dev/null
  CONSUMER_PID=""
  handled="$(lines_in "$WORK/run1.jsonl")"
  if [ "$handled" -lt 1000 ]; then
    ok "consumer.py killed with SIGKILL after $handled of 1000 records"
  else
    not_ok "consumer.py killed part-way (it had already handled all 1000)"
  fi
else
  not_ok "consumer.py handles records (run 1)"
  cat "$WORK/run1.err"
fi

lag_after_kill() {
  "$PY" admin.py describe-group readers --json >"$WORK/group1.json" &&
    "$PY" -c 'import json, sys
group = json.load(open(sys.argv[1]))["events"]
json.dump({p: v["committed"] for p, v in group.items()}, open(sys.argv[2], "w"))
sys.exit(0 if sum(v["lag"] for v in group.values()) > 0 else 1)' \
      "$WORK/group1.json" "$WORK/committed.json"
}
check "admin.py describes the group's lag after the kill (lag > 0)" lag_after_kill

# The second run resumes from the committed offsets and reads raw batches, decoded and
# CRC-checked by rill_batch.py.
resume() {
  timeout 60 "$PY" consumer.py events --group readers --output json --max-records "$MAX_RECORDS" \
    --session-timeout-ms "$SESSION_MS" --encoding raw --until-caught-up \
    >"$WORK/run2.jsonl" 2>"$WORK/run2.err" || {
    cat "$WORK/run2.err"
    return 1
  }
}
check "consumer.py resumes and catches up (run 2, raw batches)" resume
joined() { grep -q "epoch [0-9]*: assigned \[" "$WORK/run2.err"; }
check "consumer.py joins the group by GroupHeartbeat (run 2 was assigned partitions)" joined
check "every line arrived, in order per key, only the uncommitted window repeated" \
  "$PY" check_delivery.py "$WORK/input.txt" "$WORK/run1.jsonl" "$WORK/run2.jsonl" \
  "$WORK/committed.json" "$MAX_RECORDS"
no_lag() {
  "$PY" admin.py describe-group readers >"$WORK/group2.out" &&
    grep -q "^group readers: total lag 0$" "$WORK/group2.out"
}
check "admin.py describes the group's lag after the second run (lag 0)" no_lag

# --- a broker restart: the producer and the consumer retry UNAVAILABLE and carry on -------
"$PY" consumer.py events --group tail --output json --max-wait-ms 1000 \
  >"$WORK/tail.jsonl" 2>"$WORK/tail.err" &
CONSUMER_PID=$!
tail_has() {
  kill -0 "$CONSUMER_PID" 2>/dev/null || return 2
  [ "$(lines_in "$WORK/tail.jsonl")" -ge "$1" ]
}
producer_retried() {
  kill -0 "$PRODUCER_PID" 2>/dev/null || return 2
  grep -qs "UNAVAILABLE.*new stream in" "$WORK/restart-produce.err" || return 1
}
restart() {
  wait_for 30 "the tailing consumer to read 1000 records" tail_has 1000 || return 1
  stop "$BROKER_PID"
  # Produced while the broker is down: the producer retries until it is back.
  for i in $(seq 1 10); do printf 'key-%d:after-restart-%02d\n' "$i" "$i"; done |
    "$PY" producer.py events --key-separator : --header source=test \
      >"$WORK/restart-produce.out" 2>"$WORK/restart-produce.err" &
  PRODUCER_PID=$!
  wait_for 20 "the producer to meet the stopped broker" producer_retried || return 1
  start_broker "$ADDR" || return 1
  wait_for 40 "the producer to finish" exited "$PRODUCER_PID" || return 1
  wait "$PRODUCER_PID" || return 1
  PRODUCER_PID=""
  grep -q "^acked 10 records" "$WORK/restart-produce.out" || return 1
  wait_for 30 "the tailing consumer to read the 10 new records" tail_has 1010 || return 1
  stop "$CONSUMER_PID" || return 1
  CONSUMER_PID=""
  [ "$(grep -c after-restart "$WORK/tail.jsonl")" = 10 ] &&
    grep -q "UNAVAILABLE.*retrying" "$WORK/tail.err" &&
    "$PY" admin.py describe-group tail | grep -q "^group tail: total lag 0$"
}
if restart; then
  ok "a broker restart: the producer and the tailing consumer retry UNAVAILABLE and go on"
else
  not_ok "a broker restart: the producer and the tailing consumer retry UNAVAILABLE and go on"
  tail -n 5 "$WORK/restart-produce.err" "$WORK/tail.err"
fi

# --- status codes --------------------------------------------------------------------------
# INVALID_ARGUMENT: reported at once, never retried.
invalid_not_retried() {
  ! "$PY" admin.py create-topic "bad/name" 2>"$WORK/invalid.err" &&
    grep -q "INVALID_ARGUMENT" "$WORK/invalid.err" && ! grep -q "retrying" "$WORK/invalid.err"
}
check "INVALID_ARGUMENT (a bad topic name) is not retried" invalid_not_retried

# NOT_FOUND for one request on a stream: refused, not retried, and the exit status says so.
refused_not_retried() {
  printf 'a\nb\n' | timeout 30 "$PY" producer.py no-such-topic >/dev/null 2>"$WORK/notfound.err"
  [ $? = 1 ] && grep -q "refused, not retrying: NOT_FOUND" "$WORK/notfound.err" &&
    ! grep -q "new stream" "$WORK/notfound.err"
}
check "a refused produce request (NOT_FOUND) is not retried" refused_not_retried

# UNAVAILABLE: retried with backoff. A port held bound but not listening refuses every
# connection, so the producer retries until it gives up.
"$PY" -c 'import socket, time
s = socket.socket()
s.bind(("127.0.0.1", 0))
print(s.getsockname()[1], flush=True)
time.sleep(120)' >"$WORK/holder.out" &
HOLDER_PID=$!
unavailable_retried() {
  wait_for 10 "a port to hold" test -s "$WORK/holder.out" || return 1
  local dead="127.0.0.1:$(head -1 "$WORK/holder.out")"
  printf 'a\n' | timeout 30 "$PY" producer.py events --broker "$dead" \
    --give-up-after-s 1 >/dev/null 2>"$WORK/unavailable.err"
  [ $? = 1 ] && [ "$(grep -c "UNAVAILABLE.*new stream in" "$WORK/unavailable.err")" -ge 2 ] &&
    grep -q "giving up" "$WORK/unavailable.err"
}
check "UNAVAILABLE is retried with backoff, then given up" unavailable_retried
kill "$HOLDER_PID" 2>/dev/null
wait "$HOLDER_PID" 2>/dev/null
HOLDER_PID=""

# OUT_OF_RANGE: a committed offset past the end of the log is reset by --reset.
out_of_range_reset() {
  local policy="$1" expected_lines="$2" group="oor-$1"
  "$PY" -c 'import sys
from rill_common import connect, groups_pb2, groups_pb2_grpc
offsets = [groups_pb2.PartitionOffset(partition=p, offset=1_000_000) for p in range(3)]
request = groups_pb2.CommitOffsetsRequest(group=sys.argv[1], topic="events", offsets=offsets)
with connect(sys.argv[2]) as channel:
    groups_pb2_grpc.GroupsStub(channel).CommitOffsets(request, timeout=10)' \
    "$group" "$ADDR" || return 1
  timeout 60 "$PY" consumer.py events --group "$group" --reset "$policy" --until-caught-up \
    >"$WORK/$group.out" 2>"$WORK/$group.err" || return 1
  [ "$(lines_in "$WORK/$group.out")" = "$expected_lines" ] &&
    [ "$(grep -c "offset 1000000 out of range; reset to $policy offset" "$WORK/$group.err")" = 3 ]
}
# Every record in the topic: the sum of the partitions' high watermarks.
TOTAL="$("$PY" admin.py describe-topic events | awk 'NR > 2 { sum += $3 } END { print sum }')"
check "OUT_OF_RANGE resets to the earliest offset by policy (re-reads all $TOTAL)" \
  out_of_range_reset earliest "$TOTAL"
check "OUT_OF_RANGE resets to the latest offset by policy (reads nothing)" \
  out_of_range_reset latest 0

# --- push to a webhook: the receiver verifies every signature, prints, and acks ------------
export RILL_WEBHOOK_SECRET="python-examples-webhook-secret"
PUSHED=50
seq -f 'push-%03g' 1 "$PUSHED" >"$WORK/push-input.txt"
# start_receiver NAME SECRET: starts webhook_receiver.py on 127.0.0.1 port 0 with SECRET;
# sets STARTED_PID and RECEIVER_URL (the receiver prints the address it bound).
start_receiver() {
  RILL_WEBHOOK_SECRET="$2" "$PY" webhook_receiver.py --listen 127.0.0.1:0 --output json \
    >"$WORK/$1.jsonl" 2>"$WORK/$1.err" &
  STARTED_PID=$!
  if ! wait_for 10 "webhook_receiver.py to listen" receiver_listening "$STARTED_PID" "$WORK/$1.err"
  then
    stop "$STARTED_PID"
    echo "webhook_receiver.py exited with status $?" >&2
    return 1
  fi
  RECEIVER_URL="$(sed -n 's/^listening on //p' "$WORK/$1.err" | head -1)"
  echo "webhook receiver $1 on $RECEIVER_URL"
}
receiver_listening() {
  kill -0 "$1" 2>/dev/null || return 2
  # grep says 2 when the file is not there yet: that is "not yet", not "hopeless".
  grep -qs '^listening on http://127.0.0.1:[0-9]*/$' "$2" || return 1
}
# subscription_is NAME FIELD VALUE: the subscription's FIELD (backlog, ...) is VALUE.
subscription_is() {
  "$PY" admin.py describe-subscription "$1" --json >"$WORK/sub-$1.json" &&
    "$PY" -c 'import json, sys
sys.exit(json.load(open(sys.argv[1]))[sys.argv[2]] != int(sys.argv[3]))' \
      "$WORK/sub-$1.json" "$2" "$3"
}
received() { [ "$(lines_in "$WORK/$1.jsonl")" -ge "$2" ]; }
webhook_delivery() {
  start_receiver hook "$RILL_WEBHOOK_SECRET" || return 1
  RECEIVER_PID="$STARTED_PID"
  "$PY" admin.py create-topic pushed --partitions 2 >/dev/null &&
    "$PY" admin.py create-subscription hook --topic pushed --start earliest \
      --push-endpoint "$RECEIVER_URL" --signing-secret-env RILL_WEBHOOK_SECRET >/dev/null &&
    timeout 60 "$PY" producer.py pushed <"$WORK/push-input.txt" >/dev/null || return 1
  wait_for 120 "the receiver to ack $PUSHED records" received hook "$PUSHED" || return 1
  wait_for 30 "the subscription's backlog to reach 0" subscription_is hook backlog 0 || return 1
  stop "$RECEIVER_PID" || { echo "webhook_receiver.py exited with status $?" >&2; return 1; }
  RECEIVER_PID=""
  # Every line arrived (at least once), through the verified path only: nothing refused.
  "$PY" -c 'import json, sys
got = [json.loads(line) for line in open(sys.argv[2])]
want = open(sys.argv[1]).read().split()
values = sorted({r["value"] for r in got})
sys.exit(values != want or any(r["subscription"] != "hook" for r in got))' \
    "$WORK/push-input.txt" "$WORK/hook.jsonl" || { echo "lines missing" >&2; return 1; }
  ! grep "^refused" "$WORK/hook.err"
}
if webhook_delivery; then
  ok "webhook_receiver.py verifies and acks all $PUSHED pushed records; backlog 0"
else
  not_ok "webhook_receiver.py verifies and acks all $PUSHED pushed records; backlog 0"
  tail -n 5 "$WORK/hook.err" "$WORK/broker.err"
fi

# A receiver with the wrong secret refuses every request (401): nothing is acked, nothing is
# lost (with attempts to spare, no record is dead-lettered or archived).
wrong_secret() {
  start_receiver hook-bad "not-the-subscription-secret" || return 1
  BAD_RECEIVER_PID="$STARTED_PID"
  "$PY" admin.py create-subscription hook-bad --topic pushed --start earliest \
    --push-endpoint "$RECEIVER_URL" --signing-secret-env RILL_WEBHOOK_SECRET \
    --max-attempts 1000 >/dev/null || return 1
  refused_some() { [ "$(grep -c "refused a request with 401: signature does not match" \
    "$WORK/hook-bad.err")" -ge 3 ]; }
  wait_for 30 "the receiver to refuse 3 requests" refused_some || return 1
  local result=0
  subscription_is hook-bad backlog "$PUSHED" && subscription_is hook-bad dead_lettered 0 &&
    subscription_is hook-bad archived 0 && [ "$(lines_in "$WORK/hook-bad.jsonl")" = 0 ] ||
    result=1
  "$PY" admin.py delete-subscription hook-bad >/dev/null || result=1
  stop "$BAD_RECEIVER_PID"
  BAD_RECEIVER_PID=""
  return "$result"
}
check "a wrong secret: every push refused with 401, none acked, none lost" wrong_secret

# --- TLS and a token -----------------------------------------------------------------------
# A second broker, serving TLS only with a certificate made here (a CA, and a server
# certificate it signs for 127.0.0.1), and with authentication on (RILL_ADMIN_TOKEN).
stop "$BROKER_PID"
BROKER_PID=""
make_certificates() {
  local ec=(-newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes)
  openssl req -x509 "${ec[@]}" -days 2 -subj /CN=rill-python-examples-ca \
    -addext basicConstraints=critical,CA:TRUE -addext keyUsage=critical,keyCertSign \
    -keyout "$WORK/ca.key" -out "$WORK/ca.pem" &&
    openssl req "${ec[@]}" -subj /CN=127.0.0.1 -keyout "$WORK/server.key" -out "$WORK/server.csr" &&
    printf '%s\n' subjectAltName=IP:127.0.0.1,DNS:localhost basicConstraints=CA:FALSE \
      extendedKeyUsage=serverAuth >"$WORK/server.ext" &&
    openssl x509 -req -in "$WORK/server.csr" -CA "$WORK/ca.pem" -CAkey "$WORK/ca.key" \
      -CAcreateserial -days 2 -extfile "$WORK/server.ext" -out "$WORK/server.pem"
} >"$WORK/openssl.out" 2>&1
TOKEN="python-examples-admin-token-0123456789"
tls_broker() {
  command -v openssl >/dev/null || { echo "openssl is needed for the TLS pass" >&2; return 1; }
  make_certificates || { cat "$WORK/openssl.out"; return 1; }
  DATA_DIR="$WORK/data-tls"
  RILL_ADMIN_TOKEN="$TOKEN" start_broker 127.0.0.1:0 \
    --tls-cert "$WORK/server.pem" --tls-key "$WORK/server.key"
}
if tls_broker; then
  ok "start rill-broker with TLS and an admin token"
  echo "TLS broker on $ADDR"
  export RILL_BROKER="$ADDR"
  secure_round_trip() {
    printf 'key-%d:secure-%d\n' 1 1 2 2 3 3 4 4 5 5 >"$WORK/secure-input.txt"
    "$PY" admin.py --tls-ca "$WORK/ca.pem" --token "$TOKEN" create-topic secure --partitions 2 \
      >/dev/null &&
      timeout 60 "$PY" producer.py secure --tls-ca "$WORK/ca.pem" --token "$TOKEN" \
        --key-separator : <"$WORK/secure-input.txt" >"$WORK/secure-produce.out" &&
      grep -q "^acked 5 records" "$WORK/secure-produce.out" &&
      # The consumer takes both from the environment.
      RILL_TLS_CA="$WORK/ca.pem" RILL_TOKEN="$TOKEN" timeout 60 "$PY" consumer.py secure \
        --group secure-readers --until-caught-up >"$WORK/secure.out" 2>"$WORK/secure.err" &&
      [ "$(grep -c "secure-" "$WORK/secure.out")" = 5 ]
  }
  check "over TLS with a token: admin.py, producer.py and consumer.py (--tls-ca, --token, env)" \
    secure_round_trip
  # refused_with CODE NAME ARGS...: admin.py with ARGS fails with CODE at once, not retried.
  refused_with() {
    local code="$1" name="$2"
    shift 2
    ! timeout 30 "$PY" admin.py "$@" describe-topic secure 2>"$WORK/$name.err" &&
      grep -q "^admin: $code" "$WORK/$name.err" && ! grep -q "retrying" "$WORK/$name.err"
  }
  check "a call without the token fails with UNAUTHENTICATED" \
    refused_with UNAUTHENTICATED no-token --tls-ca "$WORK/ca.pem"
  check "a call with a wrong token fails with UNAUTHENTICATED" \
    refused_with UNAUTHENTICATED wrong-token --tls-ca "$WORK/ca.pem" --token not-the-token
  check "a plaintext call to the TLS broker fails with FAILED_PRECONDITION" \
    refused_with FAILED_PRECONDITION plaintext --token "$TOKEN"
else
  not_ok "start rill-broker with TLS and an admin token"
fi

finish
