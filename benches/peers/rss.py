#!/usr/bin/env python3
"""Resident memory of pylon's two sidecars on the peers path (run.py's
certificates, configs and policy), idle and after saturation, from
/proc/<pid>/smaps_rollup and /proc/<pid>/smaps.

    rss.py --pylon BIN [--pylon BIN2 ...] [--rounds 3] [--secs 10] [--env K=V ...] [--maps]
    rss.py --check-order --pylon BIN

For each binary, in each round (binaries alternating): start the server and
the client sidecar (one Tokio worker each, as run.py does), wait for /ready
and 20 requests through the path, wait 1 s, read **idle** Rss, RssAnon,
RssFile and Pss of each sidecar; warm up 2 s and saturate with h2load for
--secs (4 connections x 32 streams) while reading utime+stime of both
sidecars (CPU us per request); read VmHWM (**peak**, as run.py) and
smaps_rollup again (**after**); wait --settle seconds (default 12: jemalloc's
default decay is 10 s) and read it once more (**settled**). Figures are per
sidecar, the mean of the two, median over rounds, and how much of the binary's
text follows link/pylon.order (ADR 21). --maps prints the idle
server sidecar's resident memory per mapping group (the binary's text,
rodata, data; libc; heap; anonymous; stacks) in the first round.

The binary's pages are dropped from the page cache before each start
(posix_fadvise DONTNEED; --warm leaves them): which of them are cached, and
in what sizes, depends on how the file got there, and the kernel maps
cached pages around every fault, so a binary fresh from the linker reads
more resident than the same one started cold.

Pss divides each shared page by the processes mapping it: with both sidecars
running the same binary, the pages of its text they both touched count half
in each. On a node, every sidecar running the same image shares those pages
in the page cache; RssAnon is what each sidecar holds of its own.

Python 3 standard library, plus h2load. See docs/performance.md.
"""

import argparse
import os
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
import run as peers  # noqa: E402

KEYS = ("Rss", "Anonymous", "RssFile", "Pss")


def rollup(pid):
    """KiB of Rss, Anonymous (RssAnon), RssFile (Rss - Anonymous) and Pss."""
    out = {}
    with open(f"/proc/{pid}/smaps_rollup") as f:
        for line in f:
            parts = line.split()
            if len(parts) >= 2 and parts[0].endswith(":"):
                out[parts[0][:-1]] = int(parts[1])
    out["RssFile"] = out["Rss"] - out["Anonymous"]
    return {k: out[k] for k in KEYS}


def maps(pid, binary):
    """Resident KiB per mapping group."""
    groups = {}
    name = perms = None
    binary = os.path.realpath(binary)
    with open(f"/proc/{pid}/smaps") as f:
        for line in f:
            head = re.match(r"^[0-9a-f]+-[0-9a-f]+ (\S+) \S+ \S+ \S+\s*(.*)$", line)
            if head:
                perms, path = head.group(1), head.group(2).strip()
                if path and os.path.realpath(path) == binary:
                    kind = {"r-xp": "text", "r--p": "rodata/relro", "rw-p": "data"}.get(perms, perms)
                    name = f"binary {kind}"
                elif path.startswith("/"):
                    name = os.path.basename(path)
                elif path:
                    name = path
                else:
                    name = "anonymous" + (" (guard)" if perms == "---p" else "")
                continue
            if line.startswith("Rss:"):
                groups[name] = groups.get(name, 0) + int(line.split()[1])
    return groups


def threads(pid):
    return len(os.listdir(f"/proc/{pid}/task"))


def mean(rolls, key):
    return sum(r[key] for r in rolls) / len(rolls) / 1024


def evict(path):
    """Drop the file's pages from the page cache (it must not be mapped)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


def measure(ctx, binary, env, d, show_maps):
    ctx.pylon = binary
    if ctx.cold:
        evict(binary)
    saved = dict(os.environ)
    os.environ.update(env)
    try:
        px = peers.start_pylon(ctx, ctx.workers, d)
    except RuntimeError:
        # start_pylon returns no handle on failure: stop what it started.
        for pid in peers.descendants(os.getpid())[1:]:
            try:
                with open(f"/proc/{pid}/cmdline", "rb") as f:
                    if d.encode() in f.read():
                        os.kill(pid, signal.SIGKILL)
            except OSError:
                pass
        for side in ("server", "client"):
            with open(os.path.join(d, f"pylon-{side}.log")) as f:
                peers.log(f"{side} sidecar's log: {f.read()[-2000:]}")
        raise
    finally:
        os.environ.clear()
        os.environ.update(saved)
    pids = [p.pid for p in px.procs]
    try:
        peers.wait_for_path(ctx, px, "pylon", d)
        time.sleep(1)
        idle = [rollup(p) for p in pids]
        res = {"threads": threads(pids[0])}
        if show_maps:
            res["maps"] = maps(pids[0], binary)
        peers.h2load(ctx, px.outbound, secs=2)
        t0 = peers.cpu_ticks(pids)
        sat = peers.h2load(ctx, px.outbound, secs=ctx.secs)
        t1 = peers.cpu_ticks(pids)
        after = [rollup(p) for p in pids]
        peak = [peers.status_kib(p, "VmHWM") for p in pids]
        time.sleep(ctx.settle)
        settled = [rollup(p) for p in pids]
        if not px.alive():
            raise RuntimeError("a sidecar died during the run")
    finally:
        px.stop()
    for name, rolls in (("idle", idle), ("after", after), ("settled", settled)):
        for k in KEYS:
            res[f"{name} {k}"] = mean(rolls, k)
    res["peak"] = sum(peak) / len(peak) / 1024
    res["rps"] = sat["succeeded"] / sat["secs"]
    res["cpu_us"] = (t1 - t0) / peers.CLK_TCK * 1e6 / max(1, sat["succeeded"])
    return res


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--pylon", action="append", required=True, help="a pylon binary (repeatable)")
    ap.add_argument("--label", action="append", help="a label per --pylon (default: the file name)")
    ap.add_argument("--env", action="append", default=[],
                    help="KEY=VALUE for the sidecars' environment, applied to every binary; "
                         "KEY=VALUE@N applies to the N-th --pylon only (0-based)")
    ap.add_argument("--backend", help="default: TARGET/dist/examples/peers-backend")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--secs", type=int, default=10, help="seconds of saturation (default 10)")
    ap.add_argument("--settle", type=int, default=12, help="seconds idle after saturation (default 12)")
    ap.add_argument("--workers", type=int, default=1)
    ap.add_argument("--maps", action="store_true", help="resident KiB per mapping group")
    ap.add_argument("--warm", action="store_true",
                    help="leave the binary's pages in the page cache as they are (default: dropped "
                         "before each start, so every binary starts from the same state)")
    ap.add_argument("--check-order", action="store_true",
                    help="only say how much of each binary's text follows link/pylon.order")
    a = ap.parse_args()
    if a.check_order:
        for binary in a.pylon:
            print(f"{binary}: {text_order(binary)}")
        return
    labels = a.label or [os.path.basename(p) for p in a.pylon]
    envs = [{} for _ in a.pylon]
    for e in a.env:
        kv, _, idx = e.partition("@")
        k, _, v = kv.partition("=")
        for i in ([int(idx)] if idx else range(len(a.pylon))):
            envs[i][k] = v

    class Ctx:
        pass

    ctx = Ctx()
    ctx.h2load = shutil.which("h2load")
    ctx.connections, ctx.streams = 4, 32
    ctx.secs, ctx.settle, ctx.workers = a.secs, a.settle, a.workers
    ctx.cold = not a.warm
    scratch = tempfile.mkdtemp(prefix="pylon-rss-")
    ctx.certs = peers.make_certs(scratch)
    backend = a.backend or peers.default_backend(peers.default_target_dir())
    be = subprocess.Popen([backend, "127.0.0.1:0", "1"], stdout=subprocess.PIPE,
                          stderr=subprocess.DEVNULL, text=True)
    ctx.backend_port = int(re.search(r":(\d+)", be.stdout.readline()).group(1))
    results = {i: [] for i in range(len(a.pylon))}
    try:
        for rnd in range(a.rounds):
            order = list(range(len(a.pylon)))
            if rnd % 2:
                order.reverse()
            for i in order:
                d = os.path.join(scratch, f"r{rnd}-{i}")
                os.makedirs(d)
                try:
                    r = measure(ctx, a.pylon[i], envs[i], d, a.maps and rnd == 0)
                except RuntimeError as e:
                    # e.g. a port taken between free_port() and the bind: once more.
                    peers.log(f"round {rnd + 1} {labels[i]}: {e}; again")
                    d += "-again"
                    os.makedirs(d)
                    r = measure(ctx, a.pylon[i], envs[i], d, a.maps and rnd == 0)
                results[i].append(r)
                peers.log(f"round {rnd + 1} {labels[i]}: idle Rss {r['idle Rss']:.1f} "
                          f"Anon {r['idle Anonymous']:.1f} Pss {r['idle Pss']:.1f}, peak {r['peak']:.1f}, "
                          f"settled Rss {r['settled Rss']:.1f} Anon {r['settled Anonymous']:.1f}, "
                          f"{r['rps']:.0f} rps, {r['cpu_us']:.1f} us/req")
                if "maps" in r:
                    for name, kib in sorted(r["maps"].items(), key=lambda kv: -kv[1]):
                        if kib >= 64:
                            print(f"    {labels[i]} {name:<40} {kib / 1024:6.2f} MiB")
    finally:
        be.kill()
        shutil.rmtree(scratch, ignore_errors=True)
    print(f"\nper sidecar (mean of the two), MiB, medians of {a.rounds} rounds; load average "
          f"{peers.load_average()}")
    cols = ["idle Rss", "idle Anonymous", "idle RssFile", "idle Pss", "peak", "after Rss",
            "after Anonymous", "settled Rss", "settled Anonymous", "cpu_us", "rps", "threads"]
    print(f"  {'binary':<24} " + " ".join(f"{c.replace('Anonymous', 'Anon'):>11}" for c in cols))
    for i, label in enumerate(labels):
        rs = results[i]
        print(f"  {label:<24} " + " ".join(
            f"{statistics.median(r[c] for r in rs):>11.1f}" for c in cols))
        print(f"  {'':<24} cpu_us per round: " + ", ".join(f"{r['cpu_us']:.1f}" for r in rs))
        print(f"  {'':<24} {text_order(a.pylon[i])}")


def text_order(binary):
    """How much of link/pylon.order (ADR 21) the binary's text follows: a
    `dist` build has every symbol the file names that its code still has; a
    file gone stale (renamed code, new dependencies) shows as fewer found."""
    order = os.path.join(HERE, "..", "..", "link", "pylon.order")
    nm = shutil.which("nm")
    if not nm:
        return "text order: not checked (no nm)"
    with open(order) as f:
        wanted = [line.strip() for line in f if line.strip()]
    out = subprocess.run([nm, "--defined-only", binary], capture_output=True, text=True).stdout
    addr = {parts[2]: int(parts[0], 16) for parts in map(str.split, out.splitlines()) if len(parts) == 3}
    found = [s for s in wanted if s in addr]
    if not found:
        return f"text order: none of link/pylon.order's {len(wanted)} symbols in the binary"
    # In order when the addresses of the symbols found rise as the file lists them.
    rising = sum(addr[a] < addr[b] for a, b in zip(found, found[1:]))
    return (f"text order: {len(found)} of link/pylon.order's {len(wanted)} symbols in the binary, "
            f"{rising * 100 // max(1, len(found) - 1)} % of them in the file's order")


if __name__ == "__main__":
    main()
