#!/usr/bin/env bash
# Runs Rill (rill-bench) and the peers (Redis Streams, NATS JetStream, via the optional peers
# harness ../shared/peers/peers.sh, outside this repository; PEERS=path overrides) with the same
# workload flags, interleaved, for R rounds, and prints one table: each system's range per
# scenario, and the ratios Rill/Redis and Rill/NATS of the medians (msg/s for produce, MB/s for
# catchup, p99 latency for e2e: lower is better there). Without the harness, Rill runs alone.
#
#   usage: benches/compare.sh [--rounds R] [workload flags...]     e.g. --messages 200000
#   env:   RILL_BENCH_ARGS="--acks durable --producers 8"  extra flags for rill-bench only
#          COMPARE_OUT=file   also keep every raw result line in file
#          BASELINE=file      where the recorded ratios are (default BENCHMARKS.md, the rows
#                             `| baseline | <scenario> | <ratio> | <tolerance %> |`)
#          RILL_BENCH=path    this rill-bench (and the rill-broker beside it), not a fresh build
#          COMPARE_FROM=file  run nothing: report (and check) a raw file kept by COMPARE_OUT
#          COMPARE_STRICT=1   exit 3 when the regression check flags a scenario
# The last lines printed are the regression check: each Rill/Redis ratio of this run against
# the one recorded in BENCHMARKS.md, flagged REGRESSION when worse by more than its tolerance.
# Every server started here is stopped here: rill-bench stops its own broker, peers.sh its own.
set -euo pipefail
ROOT="$(cd "$(dirname "$0")/.." && pwd)"
PEERS="${PEERS:-$ROOT/../shared/peers/peers.sh}"
BASELINE="${BASELINE:-$ROOT/BENCHMARKS.md}"
ROUNDS=3
ARGS=()
while [ $# -gt 0 ]; do
  case "$1" in
    --rounds) ROUNDS="$2"; shift 2 ;;
    -h|--help) sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//'; exit 0 ;;
    *) ARGS+=("$1"); shift ;;
  esac
done
HAVE_PEERS=1
[ -f "$PEERS" ] || { echo "peers harness not found at $PEERS: running Rill alone, no ratios" >&2; HAVE_PEERS=0; }

if [ -n "${COMPARE_FROM:-}" ]; then
  RAW="$COMPARE_FROM"
else
  if [ -z "${RILL_BENCH:-}" ]; then
    cargo build --release --quiet --manifest-path "$ROOT/Cargo.toml" -p rill-broker -p rill-bench
    RILL_BENCH="$ROOT/target/release/rill-bench"
  fi
  RAW="$(mktemp /tmp/compare.XXXXXX)"
  cleanup() {
    # A broker left behind by an interrupted rill-bench (its data folder is named rill-bench.*).
    pkill -f -- "rill-broker --data-dir [^ ]*rill-bench\\." 2>/dev/null || true
    if [ -z "${COMPARE_OUT:-}" ]; then rm -f "$RAW"; else cp "$RAW" "$COMPARE_OUT"; rm -f "$RAW"; fi
  }
  trap cleanup EXIT

  for r in $(seq "$ROUNDS"); do
    echo "== round $r/$ROUNDS: rill" >&2
    # shellcheck disable=SC2086
    "$RILL_BENCH" "${ARGS[@]}" ${RILL_BENCH_ARGS:-} 2>/dev/null >>"$RAW" \
      || echo "rill harness ERROR exit $?" >>"$RAW"
    if [ "$HAVE_PEERS" = 1 ]; then
      echo "== round $r/$ROUNDS: redis, nats" >&2
      PEERS_OUT="$RAW" bash "$PEERS" "${ARGS[@]}" >/dev/null
    fi
  done
fi

echo "# $(nproc) cores, $(free -g | awk '/Mem:/ {print $2}') GiB; flags: ${ARGS[*]:-(defaults)}; rill extra: ${RILL_BENCH_ARGS:-(none)}; rounds: ${COMPARE_FROM:+as in }${COMPARE_FROM:-$ROUNDS}"
RESULT=0
awk -v baseline="$BASELINE" '
  BEGIN {
    # The recorded ratios: `| baseline | produce | 3.04 | 10 |` rows of BENCHMARKS.md.
    while ((getline line < baseline) > 0) {
      if (line !~ /^\| *baseline *\|/) continue
      nf = split(line, f, "|")
      for (i = 1; i <= nf; i++) gsub(/^ +| +$|%|×/, "", f[i])
      if (f[4] + 0 > 0) { want[f[3]] = f[4] + 0; tol[f[3]] = (f[5] == "" ? 10 : f[5] + 0) }
    }
  }
  $3 == "ERROR" || $3 == "TIMEOUT" { print "# " $0; next }
  NF >= 14 && $2 ~ /^(produce|catchup|e2e)$/ {
    k = $1 SUBSEP $2; n[k]++
    msgs[k, n[k]] = $9; mbs[k, n[k]] = $10; p50[k, n[k]] = $11; p99[k, n[k]] = $12
    sys[$1] = 1; sc[$2] = 1
  }
  function sorted(arr, k, m, out,   i, j, t) {
    for (i = 1; i <= m; i++) out[i] = arr[k, i] + 0
    for (i = 1; i <= m; i++) for (j = i + 1; j <= m; j++) if (out[j] < out[i]) { t = out[i]; out[i] = out[j]; out[j] = t }
  }
  function range(arr, k,   m, s) { m = n[k]; sorted(arr, k, m, s); return sprintf("%.0f-%.0f", s[1], s[m]) }
  function median(arr, k,   m, s) { m = n[k]; sorted(arr, k, m, s); return (m % 2) ? s[(m + 1) / 2] : (s[m / 2] + s[m / 2 + 1]) / 2 }
  END {
    printf "%-8s %-8s %5s %14s %14s %12s %14s\n", "system", "scenario", "runs", "msg/s", "MB/s", "p50_us", "p99_us"
    split("produce catchup e2e", order, " ")
    for (o = 1; o <= 3; o++) {
      s = order[o]
      for (y in sys) {
        k = y SUBSEP s
        if (!(k in n)) continue
        printf "%-8s %-8s %5d %14s %14s %12s %14s\n", y, s, n[k], range(msgs, k), range(mbs, k), range(p50, k), range(p99, k)
      }
    }
    print ""
    printf "%-8s %-22s %12s %12s\n", "scenario", "metric (median)", "rill/redis", "rill/nats"
    for (o = 1; o <= 3; o++) {
      s = order[o]
      r = "rill" SUBSEP s; d = "redis" SUBSEP s; t = "nats" SUBSEP s
      if (!(r in n)) continue
      if (s == "produce") { m = "msg/s"; rv = median(msgs, r); dv = (d in n) ? median(msgs, d) : 0; tv = (t in n) ? median(msgs, t) : 0 }
      if (s == "catchup") { m = "MB/s"; rv = median(mbs, r); dv = (d in n) ? median(mbs, d) : 0; tv = (t in n) ? median(mbs, t) : 0 }
      if (s == "e2e") { m = "p99 us (lower wins)"; rv = median(p99, r); dv = (d in n) ? median(p99, d) : 0; tv = (t in n) ? median(p99, t) : 0 }
      printf "%-8s %-22s %12s %12s\n", s, m, dv ? sprintf("%.2f", rv / dv) : "-", tv ? sprintf("%.2f", rv / tv) : "-"
      if (dv) ratio[s] = rv / dv
    }
    # The regression check, last: higher ratios win for produce and catchup, lower for e2e.
    print ""
    print "# regression check against " baseline " (Rill/Redis medians, this run vs recorded)"
    flagged = 0; checked = 0
    for (o = 1; o <= 3; o++) {
      s = order[o]
      if (!(s in want)) continue
      if (!(s in ratio)) { printf "%-8s no Rill/Redis ratio in this run: not checked\n", s; continue }
      checked++
      lower = (s == "e2e")
      change = (ratio[s] / want[s] - 1) * 100
      bad = lower ? (change > tol[s]) : (-change > tol[s])
      printf "%-8s %-10s %6.2f vs %6.2f recorded (%+.0f%%, tolerance %g%%, %s wins)\n", s, bad ? "REGRESSION" : "ok", ratio[s], want[s], change, tol[s], lower ? "lower" : "higher"
      flagged += bad
    }
    if (!checked) print "no scenario checked (no Redis figures in this run, or no baseline rows)"
    else if (flagged) print "REGRESSION flagged in " flagged " scenario(s)"
    else print "no regression"
    exit (flagged ? 3 : 0)
  }' "$RAW" || RESULT=$?
if [ "$RESULT" = 3 ] && [ -z "${COMPARE_STRICT:-}" ]; then RESULT=0; fi
exit "$RESULT"
