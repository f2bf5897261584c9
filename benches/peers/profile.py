#!/usr/bin/env python3
"""pylon's two sidecars on the peers path (run.py's certificates, configs and
policy), one fixed load, and one of three measurements:

    profile.py --pylon BIN --mode callgrind [-n 20000]   instructions per request
    profile.py --pylon BIN --mode perf [-n 100000]       perf.data per sidecar (-e cpu-clock -g)
    profile.py --pylon BIN --mode drift                  instructions per request early in long-lived
                                                          connections' life and two minutes later
    profile.py --pylon BIN --mode latency [--secs 10]    oha at 1,000 rps, and how long each
                                                          sidecar thread ran and waited for a CPU
    profile.py --pylon BIN --mode order [--order FILE]   the functions the sidecars ran, as a
                                                          linker symbol-ordering file
    profile.py --pylon BIN --mode managed                idle resident memory of a sidecar
                                                          the control plane manages

callgrind: both sidecars run under `valgrind --tool=callgrind`; after 20 probe
requests and a 2,000-request warm-up the counters are zeroed
(`callgrind_control -z`), h2load sends -n requests (4 connections x 32
streams), the counters are dumped (`callgrind_control -d`); the figure is the
dump's instructions / n. Instruction counts do not depend on the machine's
load, so two binaries measured this way compare even on a busy machine.

order: both sidecars run under callgrind from their first instruction, through
start-up, the probes, the warm-up, -n requests (default 5,000) and a read of
each admin endpoint (/live, /ready, /metrics, /config); then, with
pylon-control beside BIN (or --control), a third sidecar the control plane
manages (see managed). Every function of the binary that ran is written to
FILE (default link/pylon.order), one mangled symbol a line: what both kinds of
sidecar ran, then what the peers path alone ran, then what the managed one
alone ran; the most instructions first within each. The `dist` build links its
text in that order (build.rs, ADR 21): what a sidecar runs sits together at
the front, what it never runs stays out of its resident set.

managed: `pylon-control serve`, a token, the peers policy applied, and one
sidecar with identity and policy from the control plane and OTLP telemetry on
(to a port nobody listens at); after /ready, five calls (no upstream answers
them) and the admin endpoints, 1 s idle, its smaps_rollup (the binary's
pages dropped from the page cache before the start, as rss.py does).

drift: both sidecars under callgrind, one h2load run of 170 s whose
connections live throughout (4 x 8 streams); counters zeroed at 5 s and
dumped at 30 s (A), zeroed at 140 s and dumped at 165 s (B). Requests are
counted by the calls to RequestScope::begin in each dump. A per-connection
state that grows with use (an HPACK table filling with values that never
repeat, a map never pruned) shows as B above A; run.py's rounds, ~25 s per
start, only ever see A.

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
import urllib.request

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
import run as peers  # noqa: E402
import rss  # noqa: E402


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


def read_admin(port):
    """What a sidecar serves besides requests: a read of each admin
    endpoint (scrapes, probes, the config dump)."""
    for path in ("/live", "/ready", "/metrics", "/config"):
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=60) as r:
            r.read()


def run_managed(pylon, control, out, scratch, callgrind=True):
    """A sidecar as the injector runs one: identity issued and policy
    streamed by `pylon-control serve`, telemetry on (to an OTLP endpoint
    nobody listens at). Start-up, /ready, a few calls (no upstream answers
    them) and the admin endpoints. Under callgrind, returns its dump;
    otherwise, 1 s later, its smaps_rollup (KiB, as rss.rollup)."""
    data, cp_port = os.path.join(scratch, "control"), peers.free_port()
    server = f"https://127.0.0.1:{cp_port}"
    cp = subprocess.Popen([control, "serve", "--data-dir", data, "--listen", f"127.0.0.1:{cp_port}"],
                          stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    side, log = None, open(os.path.join(scratch, "managed.log"), "w")
    try:
        cli = dict(os.environ, PYLON_CONTROL_SERVER=server, PYLON_CONTROL_CA_FILE=os.path.join(data, "ca.pem"),
                   PYLON_CONTROL_TOKEN_FILE=os.path.join(data, "admin.token"))
        deadline = time.time() + 60
        while subprocess.run([control, "status"], env=cli, capture_output=True).returncode != 0:
            if time.time() > deadline or cp.poll() is not None:
                raise SystemExit("pylon-control did not come up")
            time.sleep(0.2)
        token = subprocess.run([control, "token", "create", "--identity", "spiffe://pylon.local/ns/default/sa/order"],
                               env=cli, capture_output=True, text=True, check=True).stdout.strip()
        policy = os.path.join(scratch, "managed-policy.yaml")
        with open(policy, "w") as f:
            f.write(peers.POLICY.format(inbound=peers.free_port(), server_id=peers.SERVER_ID))
        subprocess.run([control, "apply", "-f", policy], env=cli, capture_output=True, check=True)
        with open(os.open(os.path.join(scratch, "token"), os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600), "w") as f:
            f.write(token)
        admin, outbound = peers.free_port(), peers.free_port()
        config = os.path.join(scratch, "managed.yaml")
        with open(config, "w") as f:
            f.write(f"""admin: {{ listen: "127.0.0.1:{admin}", probeListen: "127.0.0.1:0" }}
outbound: {{ listen: "127.0.0.1:{outbound}" }}
inbound: {{ listen: "127.0.0.1:0", app: "127.0.0.1:9" }}
identity: {{ controlPlane: {{}} }}
policy: {{ controlPlane: {{}} }}
controlPlane: {{ address: "{server}", caFile: "{data}/ca.pem", tokenFile: "{scratch}/token" }}
telemetry: {{ serviceName: order, otlp: {{ endpoint: "http://127.0.0.1:{peers.free_port()}" }}, sampling: 1.0 }}
stateDir: "{scratch}/state"
""")
        env = dict(os.environ, TOKIO_WORKER_THREADS="1", PYLON_LOG="warn")
        env.pop("PYLON_CONFIG", None)
        cmd = [pylon, "proxy", "--config", config]
        if not callgrind:
            rss.evict(pylon)  # as rss.py does: every binary starts from a cold page cache
        if callgrind:
            cmd = ["valgrind", "--tool=callgrind", "--demangle=no", f"--callgrind-out-file={out}/cg.managed.%p"] + cmd
        side = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=log)
        base = f"http://127.0.0.1:{admin}"
        deadline = time.time() + 180
        while not peers.http_ok(f"{base}/ready"):
            if time.time() > deadline or side.poll() is not None:
                raise SystemExit(f"the managed sidecar did not become ready: see {scratch}/managed.log")
            time.sleep(0.5)
        for _ in range(5):
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{outbound}/", timeout=60).read()
            except OSError:
                pass  # no upstream: the call fails, as it may
        read_admin(admin)
        if not callgrind:
            time.sleep(1)
            return rss.rollup(side.pid)
        subprocess.run(["callgrind_control", "-d", str(side.pid)], capture_output=True)
        return f"{out}/cg.managed.{side.pid}.1"
    finally:
        for p in (side, cp):
            if p:
                p.terminate()
                p.wait()
        log.close()


def write_order(binary, groups, path):
    """Every function of `binary` that ran in the callgrind dumps (each a
    list of dumps, everything since each process started): first what ran in
    every group, then what ran in the first group only, then the rest; the
    most instructions first within each. A sidecar that is not managed by a
    control plane runs the first two parts and touches nothing past them."""
    binary = os.path.realpath(binary)
    cost, seen = {}, []
    for dumps in groups:
        seen.append(set())
        for dump in dumps:
            for fn, n in self_costs(dump, binary):
                cost[fn] = cost.get(fn, 0) + n
                seen[-1].add(fn)

    def tier(fn):
        if all(fn in s for s in seen):
            return 0
        return 1 if fn in seen[0] else 2

    ran = sorted((k for k in cost if not k.startswith(("0x", "("))), key=lambda k: (tier(k), -cost[k]))
    with open(path, "w") as f:
        f.write("".join(k + "\n" for k in ran))
    print(f"{len(ran)} functions ran; written to {path}")


def self_costs(dump, binary):
    """(function, instructions) for each cost line of `binary`'s functions."""
    names, obs, ob, fn, call = {}, {}, None, None, False
    with open(dump) as f:
        for line in f:
            if call:  # the line after calls= is the call's inclusive cost
                call = False
            elif line.startswith("ob="):
                ob = resolve(obs, line[3:].strip())
            elif line.startswith("fn="):
                fn = resolve(names, line[3:].strip())
                # callgrind marks a recursion level with 'N
                fn = re.sub(r"'\d+$", "", fn) if ob == binary else None
            elif line.startswith("cob="):
                resolve(obs, line[4:].strip())
            elif line.startswith("cfn="):
                resolve(names, line[4:].strip())
            elif line.startswith("calls="):
                call = True
            elif fn and (line[:1].isdigit() or line[:1] in "+-*"):
                parts = line.split()
                if len(parts) >= 2:
                    yield fn, int(parts[1])


def resolve(table, text):
    """callgrind's name compression: `(id) name` defines, `(id)` refers."""
    m = re.match(r"\((\d+)\)(?: (.*))?$", text)
    if not m:
        return text
    if m.group(2) is not None:
        table[m.group(1)] = m.group(2)
    return table.get(m.group(1))


def instructions_and_requests(path):
    """A callgrind dump's total instructions, and the requests it saw (calls
    to RequestScope::begin, made once per request)."""
    total, requests, names, callee = 0, 0, {}, None
    with open(path, errors="replace") as f:
        for line in f:
            if line.startswith(("summary:", "totals:")):
                total = max(total, int(line.split()[1]))
            elif line.startswith(("fn=", "cfn=")):
                m = re.match(r"c?fn=\((\d+)\)(?: (.*))?", line.rstrip("\n"))
                if m and m.group(2):
                    names[m.group(1)] = m.group(2)
                if line.startswith("cfn="):
                    callee = names.get(m.group(1)) if m else None
            elif line.startswith("calls=") and callee and callee.startswith(
                    "pylon::telemetry::request_scope::RequestScope::begin"):
                requests += int(line[6:].split()[0])
    return total, requests


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--pylon", required=True)
    ap.add_argument("--backend", help="default: TARGET/dist/examples/peers-backend")
    ap.add_argument("--mode", choices=["callgrind", "perf", "latency", "order", "managed", "drift"],
                    default="callgrind")
    ap.add_argument("-n", type=int, help="requests (callgrind 20000, perf 100000)")
    ap.add_argument("--secs", type=int, default=10, help="latency run length")
    ap.add_argument("--workers", default="1")
    ap.add_argument("--grpc", action="store_true",
                    help="callgrind and perf modes: the measured requests are gRPC calls "
                         "(content-type application/grpc, te: trailers), so the sidecars add "
                         "grpc-timeout and read grpc-status")
    ap.add_argument("--out", default="profile-out")
    ap.add_argument("--order", default=os.path.join(HERE, "..", "..", "link", "pylon.order"),
                    help="order mode: the file written (default link/pylon.order)")
    ap.add_argument("--control", help="order and managed modes: pylon-control (default: beside --pylon)")
    a = ap.parse_args()
    n = a.n or {"callgrind": 20000, "order": 5000}.get(a.mode, 100000)
    out = os.path.abspath(a.out)
    scratch = os.path.join(out, "scratch")
    shutil.rmtree(scratch, ignore_errors=True)
    os.makedirs(scratch)
    control = a.control or os.path.join(os.path.dirname(a.pylon), "pylon-control")
    if a.mode == "managed":
        m = run_managed(a.pylon, control, out, scratch, callgrind=False)
        print(f"managed sidecar, idle: Rss {m['Rss'] / 1024:.1f} MiB, RssAnon {m['Anonymous'] / 1024:.1f}, "
              f"RssFile {m['RssFile'] / 1024:.1f}, Pss {m['Pss'] / 1024:.1f}")
        return

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
        if a.mode in ("callgrind", "order", "drift"):
            names = ["--demangle=no"] if a.mode == "order" else []
            cmd = ["valgrind", "--tool=callgrind", *names, f"--callgrind-out-file={out}/cg.{side}.%p"] + cmd
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
        if a.mode == "drift":
            t0 = time.time()
            load = subprocess.Popen([ctx.h2load, "-t", "1", "-c", "4", "-m", "8", "-D", "170", url],
                                    stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            for begin, end in ((5, 30), (140, 165)):
                time.sleep(max(0.0, t0 + begin - time.time()))
                for pid in pids:
                    subprocess.run(["callgrind_control", "-z", str(pid)], capture_output=True)
                time.sleep(max(0.0, t0 + end - time.time()))
                for pid in pids:
                    subprocess.run(["callgrind_control", "-d", str(pid)], capture_output=True)
            load.wait()
            both = {}
            for pid, side in zip(pids, ["server", "client"]):
                for window, dump in (("A", 1), ("B", 2)):
                    path = f"{out}/cg.{side}.{pid}.{dump}"
                    total, requests = instructions_and_requests(path)
                    both.setdefault(window, []).append(total / max(1, requests))
                    print(f"{side} sidecar, {window}: {total / max(1, requests):,.0f} instructions per request "
                          f"({requests} requests, {path})")
            a_sum, b_sum = sum(both["A"]), sum(both["B"])
            print(f"both: A {a_sum:,.0f}, B {b_sum:,.0f} ({(b_sum / a_sum - 1) * 100:+.1f} %)")
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
        grpc = [arg for h in peers.GRPC_HEADERS for arg in ("-H", h)] if a.grpc else []
        r = subprocess.run([ctx.h2load, "-t", "1", "-c", "4", "-m", "32", "-n", str(n), *grpc, url],
                           capture_output=True, text=True, timeout=3600)
        print("h2load:", peers.parse_h2load(r.stdout + r.stderr))
        for rec in recorders:
            rec.send_signal(signal.SIGINT)
            rec.wait()
        if a.mode == "order":
            for admin in px.admins:
                read_admin(admin)
        if a.mode in ("callgrind", "order"):
            for pid in pids:
                subprocess.run(["callgrind_control", "-d", str(pid)], capture_output=True)
    finally:
        px.stop()
        be.kill()
    if a.mode == "order":
        groups = [[f"{out}/cg.{side}.{pid}.1" for pid, side in zip(pids, ["server", "client"])]]
        if os.path.exists(control):
            groups.append([run_managed(a.pylon, control, out, scratch)])
        else:
            print(f"no {control}: the order leaves out a sidecar the control plane manages")
        write_order(a.pylon, groups, a.order)
    elif a.mode == "callgrind":
        for pid, side in zip(pids, ["server", "client"]):
            total, _ = instructions_and_requests(f"{out}/cg.{side}.{pid}.1")
            print(f"{side} sidecar: {total / n:,.0f} instructions per request ({out}/cg.{side}.{pid}.1)")
    else:
        print(f"perf data in {out}/perf.server.data, {out}/perf.client.data")


if __name__ == "__main__":
    main()
