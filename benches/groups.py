#!/usr/bin/env python3
"""Consumer-group figures with real processes: one local broker, a topic of 6 partitions, and
`rill consume --group G -f` processes. ROUNDS rounds of each:

- join, alone: an empty group; the time from starting the consumer process to its first
  printed record (process start, connect, join, fetch);
- join, second member: a member already consumes; the time from starting a second one to its
  first record (the first must revoke, commit and release, then the second's next heartbeat
  receives the partitions);
- kill: two members and a producer writing every 10 ms; kill -9 one; the time from the kill
  to the first record the survivor prints from a partition of the killed one (session
  timeout, then the broker's expiry check, then the survivor's next heartbeat and fetch).

All with a 3 s session timeout (heartbeat interval 1 s) unless SESSION_MS says otherwise.
Prints every sample, then p50 and max.

usage: benches/groups.py [ROUNDS]   (after cargo build --release -p rill-broker -p rill-client;
       RILL_PROFILE=debug uses target/debug; SESSION_MS=45000 KILL=0 measures the joins with
       the broker's default session timeout, without the kill rounds)
Every process started here is killed here, and the data folder removed."""
import json, os, signal, socket, subprocess, sys, tempfile, threading, time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PROFILE = os.environ.get("RILL_PROFILE", "release")
BROKER = os.path.join(ROOT, "target", PROFILE, "rill-broker")
RILL = os.path.join(ROOT, "target", PROFILE, "rill")
ROUNDS = int(sys.argv[1]) if len(sys.argv) > 1 else 5
SESSION_MS = os.environ.get("SESSION_MS", "3000")
KILL = os.environ.get("KILL", "1") != "0"


def free_port():
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


class Consumer:
    """A `rill consume --group -f -v` process; its records and ownership lines are read by
    threads, each record stamped with the time it was read."""

    def __init__(self, broker, topic, group):
        self.started = time.time()
        self.proc = subprocess.Popen(
            [RILL, "--broker", broker, "--output", "json", "consume", topic, "--group", group,
             "-f", "-v", "--session-timeout-ms", SESSION_MS],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        self.records = []  # (time read, partition)
        self.owned = set()
        self.lock = threading.Lock()
        threading.Thread(target=self._out, daemon=True).start()
        threading.Thread(target=self._err, daemon=True).start()

    def _out(self):
        for line in self.proc.stdout:
            r = json.loads(line)
            with self.lock:
                self.records.append((time.time(), r["partition"]))

    def _err(self):
        for line in self.proc.stderr:
            words = line.split()
            if words and words[0] in ("assigned", "revoked", "lost"):
                fields = dict(w.split("=", 1) for w in words[1:] if "=" in w)
                ps = {int(p) for p in fields.get("partitions", "").split(",") if p}
                with self.lock:
                    if words[0] == "assigned":
                        self.owned |= ps
                    else:
                        self.owned -= ps

    def first_record_after(self, since, partitions=None, timeout=60):
        deadline = time.time() + timeout
        while time.time() < deadline:
            with self.lock:
                for t, p in self.records:
                    if t >= since and (partitions is None or p in partitions):
                        return t
            time.sleep(0.005)
        raise SystemExit("no record within 60 s")

    def wait_owned(self, n, timeout=60):
        deadline = time.time() + timeout
        while time.time() < deadline:
            with self.lock:
                if len(self.owned) == n:
                    return set(self.owned)
            time.sleep(0.01)
        raise SystemExit(f"never owned {n} partitions")

    def stop(self, sig=signal.SIGINT):
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        try:
            self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


def summary(name, samples):
    samples = sorted(samples)
    print(f"{name} over {len(samples)} rounds: p50 {samples[len(samples) // 2] * 1000:.0f} ms, "
          f"max {samples[-1] * 1000:.0f} ms", flush=True)


def main():
    tmp = tempfile.mkdtemp()
    broker = f"127.0.0.1:{free_port()}"
    log = open(os.path.join(tmp, "broker.log"), "a")
    bp = subprocess.Popen([BROKER, "--listen", broker, "--data-dir", os.path.join(tmp, "data")],
                          stdout=log, stderr=log, env={**os.environ, "RUST_LOG": "error"})
    consumers = []
    producer = None
    try:
        deadline = time.time() + 30
        while subprocess.run([RILL, "--broker", broker, "topic", "create", "g6", "--partitions", "6"],
                             capture_output=True).returncode != 0:
            if time.time() > deadline:
                sys.exit("could not create the topic")
            time.sleep(0.2)
        # A producer writing one record every 10 ms, round robin over the partitions.
        producer = subprocess.Popen([RILL, "--broker", broker, "produce", "g6"],
                                    stdin=subprocess.PIPE, stdout=subprocess.DEVNULL,
                                    stderr=subprocess.DEVNULL, text=True, bufsize=1)
        stop = threading.Event()

        def produce():
            i = 0
            while not stop.is_set():
                producer.stdin.write(f"r{i}\n")
                producer.stdin.flush()
                i += 1
                time.sleep(0.01)

        threading.Thread(target=produce, daemon=True).start()
        time.sleep(1)
        alone, second, kill = [], [], []
        for k in range(ROUNDS):
            a = Consumer(broker, "g6", f"join-{k}")
            consumers.append(a)
            alone.append(a.first_record_after(0) - a.started)
            a.wait_owned(6)
            b = Consumer(broker, "g6", f"join-{k}")
            consumers.append(b)
            second.append(b.first_record_after(0) - b.started)
            b.wait_owned(3)
            a.wait_owned(3)
            print(f"round {k + 1}: join alone {alone[-1] * 1000:.0f} ms, "
                  f"join as second {second[-1] * 1000:.0f} ms", flush=True)
            if not KILL:
                a.stop()
                b.stop()
                continue
            lost = a.wait_owned(3)
            a.stop(signal.SIGKILL)
            killed = time.time()
            kill.append(b.first_record_after(killed, lost) - killed)
            print(f"round {k + 1}: kill -9 -> redelivery {kill[-1] * 1000:.0f} ms", flush=True)
            b.stop()
        print(f"session timeout {SESSION_MS} ms", flush=True)
        summary("join alone -> first record", alone)
        summary("join as second member -> first record", second)
        if kill:
            summary(f"kill -9 -> first redelivered record (session {SESSION_MS} ms)", kill)
        stop.set()
    finally:
        for c in consumers:
            c.stop(signal.SIGKILL)
        if producer:
            producer.kill()
            producer.wait()
        bp.kill()
        bp.wait()
        subprocess.run(["rm", "-rf", tmp])


if __name__ == "__main__":
    main()
