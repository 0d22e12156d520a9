#!/usr/bin/env python3
"""Failover time of a replicated partition: 3 local brokers (release build), a topic with one
partition and replication factor 3; KILLS times: kill -9 the partition leader, then produce
through the `rill` CLI with every broker as bootstrap until one produce is acknowledged; the
time from the kill to that acknowledgement is one sample. The killed broker is restarted
before the next round. Prints every sample, then p50 and max.

usage: benches/failover.py [KILLS]   (after cargo build --release -p rill-broker -p rill-client)
Every broker started here is killed here, and its data folder removed."""
import json, os, signal, socket, subprocess, sys, tempfile, time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BROKER = os.path.join(ROOT, "target/release/rill-broker")
RILL = os.path.join(ROOT, "target/release/rill")
KILLS = int(sys.argv[1]) if len(sys.argv) > 1 else 20


def free_port():
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


def rill(broker, *args, stdin=""):
    return subprocess.run([RILL, "--broker", broker, *args], input=stdin, text=True,
                          capture_output=True, timeout=30)


def main():
    tmp = tempfile.mkdtemp()
    ports = {i: free_port() for i in (1, 2, 3)}
    peers = ",".join(f"{i}=127.0.0.1:{p}" for i, p in ports.items())
    everyone = ",".join(f"127.0.0.1:{p}" for p in ports.values())
    procs = {}

    def start(i):
        out = open(os.path.join(tmp, f"{i}.log"), "a")
        procs[i] = subprocess.Popen(
            [BROKER, "--node-id", str(i), "--peers", peers, "--listen", f"127.0.0.1:{ports[i]}",
             "--data-dir", os.path.join(tmp, str(i))],
            stdout=out, stderr=out, env={**os.environ, "RUST_LOG": "error"})

    try:
        for i in ports:
            start(i)
        deadline = time.time() + 30
        while rill(everyone, "topic", "create", "fo", "--partitions", "1",
                   "--replication-factor", "3").returncode != 0:
            if time.time() > deadline:
                sys.exit("could not create the topic")
            time.sleep(0.2)
        samples = []
        for k in range(KILLS):
            leader = 0
            while not leader:
                d = rill(everyone, "--output", "json", "topic", "describe", "fo")
                if d.returncode == 0:
                    leader = (json.loads(d.stdout).get("replication") or [{}])[0].get("leader") or 0
                if not leader:
                    time.sleep(0.05)
            rill(everyone, "produce", "fo", "--partition", "0", stdin="warm\n")
            procs[leader].send_signal(signal.SIGKILL)
            killed_at = time.time()
            procs[leader].wait()
            while rill(everyone, "produce", "fo", "--partition", "0", stdin=f"after-{k}\n").returncode != 0:
                pass
            samples.append(time.time() - killed_at)
            print(f"kill {k + 1}: node {leader}, first acknowledged produce after {samples[-1] * 1000:.0f} ms")
            start(leader)
            time.sleep(1.5)  # let it rejoin and catch up before the next kill
        samples.sort()
        print(f"failover over {len(samples)} kills: p50 {samples[len(samples) // 2] * 1000:.0f} ms, "
              f"max {samples[-1] * 1000:.0f} ms")
    finally:
        for p in procs.values():
            p.kill()
            p.wait()
        subprocess.run(["rm", "-rf", tmp])


main()
