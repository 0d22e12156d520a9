#!/usr/bin/env bash
# Replication factor 3 on 3 local brokers against replication factor 1 on one broker, back to
# back on this machine: the produce and e2e scenarios of rill-bench. Each cluster is fresh, so
# the benchmark topic is its first topic and broker 1 (the first of the placement) leads it.
#
#   usage: benches/cluster.sh [--messages N]      (builds the release binaries first)
# Runs: produce with one producer (RF 1; RF 3 with quorum, durable and leader acks), produce
# with 4 producers on the one partition (RF 1; RF 3 quorum), the client library's pipelining
# Producer with 1 and 5 batches in flight (produce-library; RF 1; RF 3 quorum), and e2e
# (RF 1; RF 3 quorum).
# Every broker started here is stopped here, and its data folder removed.
set -euo pipefail
ROOT="$(cd "$(dirname "$0")/.." && pwd)"
MSG=100000
[ "${1:-}" = "--messages" ] && MSG="$2"
cargo build --release --quiet -p rill-broker -p rill-bench --manifest-path "$ROOT/Cargo.toml"
B="$ROOT/target/release/rill-broker"
BENCH="$ROOT/target/release/rill-bench"
D="$(mktemp -d)"
PIDS=()
cleanup() {
  for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done
  wait 2>/dev/null || true
  rm -rf "$D"
}
trap cleanup EXIT
free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
wait_listen() { for _ in $(seq 100); do grep -q "listening on" "$1" && return 0; sleep 0.1; done; return 1; }

single() { # scenario [rill-bench flags...]
  local port; port=$(free_port)
  RUN=$((RUN + 1))
  RUST_LOG=error "$B" --listen "127.0.0.1:$port" --data-dir "$D/s$RUN-$1" > "$D/s$RUN-$1.out" 2>&1 &
  PIDS+=($!)
  wait_listen "$D/s$RUN-$1.out"
  "$BENCH" --broker "127.0.0.1:$port" --scenarios "$1" --messages "$MSG" "${@:2}" | tail -1
  kill "${PIDS[-1]}"; wait "${PIDS[-1]}" 2>/dev/null || true
}

RUN=0
cluster() { # scenario [rill-bench flags...]
  local ports=() peers="" pids=()
  RUN=$((RUN + 1)) # a fresh data folder per cluster
  for i in 1 2 3; do ports+=("$(free_port)"); done
  for i in 1 2 3; do peers+="${peers:+,}$i=127.0.0.1:${ports[$((i-1))]}"; done
  for i in 1 2 3; do
    RUST_LOG=error "$B" --node-id "$i" --peers "$peers" --listen "127.0.0.1:${ports[$((i-1))]}" \
      --data-dir "$D/c$RUN-$1-$i" > "$D/c$RUN-$1-$i.out" 2>&1 &
    PIDS+=($!); pids+=($!)
  done
  for i in 1 2 3; do wait_listen "$D/c$RUN-$1-$i.out"; done
  # The controller elects and bootstraps within a few seconds.
  for _ in $(seq 100); do
    "$ROOT/target/release/rill" --broker "127.0.0.1:${ports[0]}" cluster status 2>/dev/null \
      | grep -q "controller leader: [0-9]" && break
    sleep 0.1
  done
  "$BENCH" --broker "127.0.0.1:${ports[0]}" --replication-factor 3 --scenarios "$1" --messages "$MSG" "${@:2}" | tail -1
  kill "${pids[@]}"; wait "${pids[@]}" 2>/dev/null || true
}

cargo build --release --quiet -p rill-client --manifest-path "$ROOT/Cargo.toml"
echo "system   scenario      msgs   size batch P C      secs      msg/s      MB/s   p50_us   p99_us  p999_us   max_us  note"
echo "# produce, one producer (each batch acknowledged before the next)"
echo "# replication factor 1, one broker (quorum = leader there)"; single produce --acks quorum
echo "# replication factor 3, three brokers, quorum acks"; cluster produce --acks quorum
echo "# replication factor 3, three brokers, durable acks"; cluster produce --acks durable
echo "# replication factor 3, three brokers, leader acks"; cluster produce --acks leader
echo "# produce, 4 producers on the one partition (4 requests in flight)"
echo "# replication factor 1, one broker"; single produce --acks quorum --producers 4
echo "# replication factor 3, three brokers, quorum acks"; cluster produce --acks quorum --producers 4
echo "# produce through the client library's Producer (idempotent, same records and batches)"
for n in 1 5; do
  echo "# replication factor 1, one broker, $n in flight"; single produce-library --acks quorum --max-in-flight "$n"
  echo "# replication factor 3, three brokers, quorum acks, $n in flight"; cluster produce-library --acks quorum --max-in-flight "$n"
done
echo "# e2e"
echo "# replication factor 1, one broker"; single e2e --acks quorum
echo "# replication factor 3, three brokers, quorum acks"; cluster e2e --acks quorum
