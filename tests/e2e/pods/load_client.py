#!/usr/bin/env python3
"""A client app that calls one URL over and over (HTTP/1.1 keep-alive,
reconnecting after an error) until its stdin closes.

Every line read on stdin prints `COUNTS <ok> <failed> <pod>=<ok> ...` on
stdout (the successes by the `pod` the JSON answer names); at the end it
prints `DONE` and the same counts, then `FAILURE <what>` for the first
failures. A call succeeds when it is answered 200.
"""
import argparse
import http.client
import json
import sys
import threading
import time
import urllib.parse


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--url", required=True)
    parser.add_argument("--timeout", type=float, default=10.0)
    args = parser.parse_args()
    url = urllib.parse.urlsplit(args.url)

    lock = threading.Lock()
    counts = {"ok": 0, "failed": 0}
    by_pod = {}
    failures = []
    stop = threading.Event()

    def report(what):
        pods = " ".join(f"{pod}={n}" for pod, n in sorted(by_pod.items()))
        print(f"{what} {counts['ok']} {counts['failed']} {pods}", flush=True)

    def control():
        for _ in sys.stdin:
            with lock:
                report("COUNTS")
        stop.set()

    threading.Thread(target=control, daemon=True).start()

    conn = None
    while not stop.is_set():
        try:
            if conn is None:
                conn = http.client.HTTPConnection(url.hostname, url.port, timeout=args.timeout)
            conn.request("GET", url.path or "/")
            resp = conn.getresponse()
            body = resp.read()
            ok = resp.status == 200
            what = f"{resp.status} {dict(resp.getheaders())} {body[:200]!r}"
            pod = json.loads(body).get("pod", "?") if ok else None
        except Exception as e:  # every failure counts, whatever it is
            ok = False
            what = repr(e)
            pod = None
            if conn is not None:
                conn.close()
            conn = None
        with lock:
            if ok:
                counts["ok"] += 1
                by_pod[pod] = by_pod.get(pod, 0) + 1
            else:
                counts["failed"] += 1
                if len(failures) < 20:
                    failures.append(f"{time.monotonic():.3f} {what}")

    with lock:
        report("DONE")
        for f in failures:
            print(f"FAILURE {f}", flush=True)


if __name__ == "__main__":
    main()
