#!/usr/bin/env python3
"""pylon's two sidecars on the peers path (run.py's certificates, configs and
policy), one fixed load, and one of three measurements:

    profile.py --pylon BIN --mode callgrind [-n 20000]   instructions per request
    profile.py --pylon BIN --mode perf [-n 100000]       perf.data per sidecar (-e cpu-clock -g)
    profile.py --pylon BIN --mode latency [--secs 10]    oha at 1,000 rps, and how long each
                                                          sidecar thread ran and waited for a CPU

callgrind: both sidecars run under `valgrind --tool=callgrind`; after 20 probe
requests and a 2,000-request warm-up the counters are zeroed
(`callgrind_control -z`), h2load sends -n requests (4 connections x 32
streams), the counters are dumped (`callgrind_control -d`); the figure is the
dump's instructions / n. Instruction counts do not depend on the machine's
load, so two binaries measured this way compare even on a busy machine.

latency: per-thread run and run-queue wait from /proc/<pid>/task/<tid>/schedstat,
read before and after the run: a stall that is CPU contention (the thread was
runnable but not running) shows as wait, one inside the sidecar as neither.

Python 3 standard library, plus valgrind / perf / h2load / oha as the mode needs.
See docs/performance.md.
"""

import argparse
import glob
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
import run as peers  # noqa: E402


def thread_sched(pids):
    """(pid, tid, name) -> (ns on CPU, ns runnable but waiting, slices)."""
    out = {}
    for pid in pids:
        for tid in os.listdir(f"/proc/{pid}/task"):
            try:
                with open(f"/proc/{pid}/task/{tid}/comm") as f:
                    comm = f.read().strip()
                with open(f"/proc/{pid}/task/{tid}/schedstat") as f:
                    out[(pid, tid, comm)] = tuple(map(int, f.read().split()))
            except OSError:
                pass
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--pylon", required=True)
    ap.add_argument("--backend", help="default: TARGET/dist/examples/peers-backend")
    ap.add_argument("--mode", choices=["callgrind", "perf", "latency"], default="callgrind")
    ap.add_argument("-n", type=int, help="requests (callgrind 20000, perf 100000)")
    ap.add_argument("--secs", type=int, default=10, help="latency run length")
    ap.add_argument("--workers", default="1")
    ap.add_argument("--out", default="profile-out")
    a = ap.parse_args()
    n = a.n or (20000 if a.mode == "callgrind" else 100000)
    out = os.path.abspath(a.out)
    scratch = os.path.join(out, "scratch")
    shutil.rmtree(scratch, ignore_errors=True)
    os.makedirs(scratch)

    class Ctx:
        pass

    ctx = Ctx()
    ctx.pylon = a.pylon
    ctx.h2load = shutil.which("h2load")
    ctx.connections, ctx.streams = 4, 32
    ctx.certs = peers.make_certs(scratch)
    backend = a.backend or peers.default_backend(peers.default_target_dir())
    be = subprocess.Popen([backend, "127.0.0.1:0", "1"], stdout=subprocess.PIPE,
                          stderr=subprocess.DEVNULL, text=True)
    ctx.backend_port = int(re.search(r":(\d+)", be.stdout.readline()).group(1))

    # run.py's start_pylon, each sidecar under callgrind in that mode, and
    # more patience for /ready under valgrind.
    spawn, wait_for = peers.Proxy.spawn, peers.wait_for

    def spawn_wrapped(self, cmd, logfile, env=None):
        side = "server" if cmd[-1].endswith("server.yaml") else "client"
        if a.mode == "callgrind":
            cmd = ["valgrind", "--tool=callgrind", f"--callgrind-out-file={out}/cg.{side}.%p"] + cmd
        return spawn(self, cmd, logfile, env)

    peers.Proxy.spawn = spawn_wrapped
    peers.wait_for = lambda check, px, what, timeout=20: wait_for(check, px, what, 180)
    px = peers.start_pylon(ctx, int(a.workers), scratch)
    pids = [p.pid for p in px.procs]  # server, client
    try:
        peers.wait_for_path(ctx, px, "pylon", scratch, timeout=60)
        peers.h2load(ctx, px.outbound, requests=2000)
        url = f"http://127.0.0.1:{px.outbound}/"
        if a.mode == "latency":
            before = thread_sched(pids)
            r = subprocess.run([os.path.expanduser("~/.cargo/bin/oha"), "--no-tui", "--output-format", "json",
                                "--http2", "-c", "4", "-p", "16", "-q", "1000", "--latency-correction",
                                "-z", f"{a.secs}s", url], capture_output=True, text=True, check=True)
            j = json.loads(r.stdout)
            pct = j["latencyPercentiles"]
            print(f"1000 rps for {a.secs}s: p50 {pct['p50'] * 1e3:.2f} ms, p99 {pct['p99'] * 1e3:.2f} ms, "
                  f"max {j['summary']['slowest'] * 1e3:.2f} ms")
            for k, v in thread_sched(pids).items():
                if k in before:
                    ran, waited, slices = (v[i] - before[k][i] for i in range(3))
                    if ran > 10_000_000:
                        print(f"  pid {k[0]} {k[2]:<16} ran {ran / 1e6:7.1f} ms, waited for a CPU "
                              f"{waited / 1e6:7.1f} ms over {slices} slices")
            return
        if a.mode == "callgrind":
            for pid in pids:
                subprocess.run(["callgrind_control", "-z", str(pid)], capture_output=True)
        recorders = []
        if a.mode == "perf":
            for pid, side in zip(pids, ["server", "client"]):
                recorders.append(subprocess.Popen(
                    ["perf", "record", "-e", "cpu-clock", "-F", "2000", "-g", "-p", str(pid),
                     "-o", f"{out}/perf.{side}.data"],
                    stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
            time.sleep(1)
        r = subprocess.run([ctx.h2load, "-t", "1", "-c", "4", "-m", "32", "-n", str(n), url],
                           capture_output=True, text=True, timeout=3600)
        print("h2load:", peers.parse_h2load(r.stdout + r.stderr))
        for rec in recorders:
            rec.send_signal(signal.SIGINT)
            rec.wait()
        if a.mode == "callgrind":
            for pid in pids:
                subprocess.run(["callgrind_control", "-d", str(pid)], capture_output=True)
    finally:
        px.stop()
        be.kill()
    if a.mode == "callgrind":
        for pid, side in zip(pids, ["server", "client"]):
            with open(f"{out}/cg.{side}.{pid}.1") as f:
                total = max(int(line.split()[1]) for line in f if line.startswith(("summary:", "totals:")))
            print(f"{side} sidecar: {total / n:,.0f} instructions per request ({out}/cg.{side}.{pid}.1)")
    else:
        print(f"perf data in {out}/perf.server.data, {out}/perf.client.data")


if __name__ == "__main__":
    main()
