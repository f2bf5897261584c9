#!/usr/bin/env python3
"""Bulk transfer through pylon's two sidecars on the peers path (run.py's
certificates, configs and policy): how fast one large body crosses the two
hops, downloaded and uploaded, for one or more pylon binaries side by side.

    bulk.py --pylon BIN [--pylon BIN2 ...] [--rounds 3] [--mib 32] [-n 4]

For each binary, in each round (binaries alternating): start the two sidecars
(one Tokio worker each), then with h2load (1 connection, 1 stream) send -n
requests one after another: GET /bytes/<--mib MiB> (**download**: the backend
answers in 1 MiB chunks) and POST /upload with a body of --mib MiB
(**upload**: the backend reads it to its end). MB/s is bytes over h2load's
elapsed time; the figure is the median over rounds. The backend alone
(h2load straight to it) is measured once, as the ceiling.

One stream at a time shows what the flow-control windows allow on one
stream: the sidecars' receive windows (ADR 22) and the backend's.

Python 3 standard library, plus h2load. See docs/performance.md.
"""

import argparse
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
import run as peers  # noqa: E402


def transfer(h2load, url, n, upload=None):
    """Seconds h2load took for n requests to url, one at a time (upload: a
    file to POST)."""
    cmd = [h2load, "-t", "1", "-c", "1", "-m", "1", "-n", str(n)]
    if upload:
        cmd += ["-d", upload]
    r = subprocess.run(cmd + [url], capture_output=True, text=True, timeout=300)
    out = r.stdout + r.stderr
    done = peers.parse_h2load(out)
    if done["ok"] != n:
        raise RuntimeError(f"{url}: {done}\n{out[-1500:]}")
    m = re.search(r"finished in ([\d.]+)(ms|s)", out)
    return float(m.group(1)) / (1000 if m.group(2) == "ms" else 1)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--pylon", action="append", required=True, help="a pylon binary (repeatable)")
    ap.add_argument("--backend", help="default: TARGET/dist/examples/peers-backend")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--mib", type=int, default=32, help="MiB per request (default 32)")
    ap.add_argument("-n", type=int, default=4, help="requests per measurement (default 4)")
    a = ap.parse_args()

    class Ctx:
        pass

    ctx = Ctx()
    ctx.h2load = shutil.which("h2load")
    if not ctx.h2load:
        sys.exit("missing: h2load (apt-get install nghttp2-client)")
    ctx.connections, ctx.streams = 1, 1
    scratch = tempfile.mkdtemp(prefix="pylon-bulk-")
    ctx.certs = peers.make_certs(scratch)
    size = a.mib * 1024 * 1024
    payload = os.path.join(scratch, "payload")
    with open(payload, "wb") as f:
        f.write(b"\0" * size)
    backend = a.backend or peers.default_backend(peers.default_target_dir())
    be = subprocess.Popen([backend, "127.0.0.1:0", "1"], stdout=subprocess.PIPE,
                          stderr=subprocess.DEVNULL, text=True)
    ctx.backend_port = int(re.search(r":(\d+)", be.stdout.readline()).group(1))
    mb = a.n * size / 1e6
    results = {i: {"down": [], "up": []} for i in range(len(a.pylon))}
    try:
        base = f"http://127.0.0.1:{ctx.backend_port}"
        direct = (mb / transfer(ctx.h2load, f"{base}/bytes/{size}", a.n),
                  mb / transfer(ctx.h2load, f"{base}/upload", a.n, payload))
        peers.log(f"backend alone: download {direct[0]:.0f} MB/s, upload {direct[1]:.0f} MB/s")
        for rnd in range(a.rounds):
            order = list(range(len(a.pylon)))
            if rnd % 2:
                order.reverse()
            for i in order:
                ctx.pylon = a.pylon[i]
                d = os.path.join(scratch, f"r{rnd}-{i}")
                os.makedirs(d)
                px = peers.start_pylon(ctx, 1, d)
                try:
                    peers.wait_for_path(ctx, px, "pylon", d)
                    url = f"http://127.0.0.1:{px.outbound}"
                    down = mb / transfer(ctx.h2load, f"{url}/bytes/{size}", a.n)
                    up = mb / transfer(ctx.h2load, f"{url}/upload", a.n, payload)
                finally:
                    px.stop()
                results[i]["down"].append(down)
                results[i]["up"].append(up)
                peers.log(f"round {rnd + 1} {a.pylon[i]}: download {down:.0f} MB/s, upload {up:.0f} MB/s")
    finally:
        be.kill()
        shutil.rmtree(scratch, ignore_errors=True)
    print(f"\none stream, {a.n} x {a.mib} MiB each way, medians of {a.rounds} rounds; load average "
          f"{peers.load_average()}")
    print(f"  {'binary':<40} {'download MB/s':>14} {'upload MB/s':>12}")
    print(f"  {'(backend alone)':<40} {direct[0]:>14.0f} {direct[1]:>12.0f}")
    for i, path in enumerate(a.pylon):
        r = results[i]
        print(f"  {path:<40} {statistics.median(r['down']):>14.0f} {statistics.median(r['up']):>12.0f}")


if __name__ == "__main__":
    main()
