"""The API server's side of pylon's injection webhook, for tests/e2e/inject.rs.

usage: admission.py HOST:PORT CA_FILE REVIEW.json...

Over one HTTPS connection (HTTP/1.1, the certificate verified against
CA_FILE): GET /healthz, then POST each AdmissionReview to /inject. Prints
one JSON line for /healthz ({"status", "body", "alpn"}), then one per review:
{"status", "review": the answer, "patched": the request's object with the
answer's JSON Patch applied by the jsonpatch package, or null}.
"""

import base64
import http.client
import json
import ssl
import sys

import jsonpatch


def connect(address, ca_file):
    host, port = address.rsplit(":", 1)
    context = ssl.create_default_context(cafile=ca_file)
    context.set_alpn_protocols(["http/1.1"])
    return http.client.HTTPSConnection(host, int(port), context=context, timeout=30)


def patched(body, answer):
    response = answer.get("response", {})
    if "patch" not in response:
        return None
    if response.get("patchType") != "JSONPatch":
        raise SystemExit(f"unexpected patchType {response.get('patchType')!r}")
    ops = json.loads(base64.b64decode(response["patch"]))
    pod = json.loads(body)["request"]["object"]
    return jsonpatch.apply_patch(pod, ops)


def main():
    address, ca_file, *reviews = sys.argv[1:]
    connection = connect(address, ca_file)
    connection.request("GET", "/healthz")
    response = connection.getresponse()
    print(json.dumps({
        "status": response.status,
        "body": response.read().decode(),
        "alpn": connection.sock.selected_alpn_protocol(),
    }))
    for path in reviews:
        with open(path, "rb") as f:
            body = f.read()
        connection.request(
            "POST", "/inject?timeout=10s", body=body,
            headers={"Content-Type": "application/json"},
        )
        response = connection.getresponse()
        answer = json.loads(response.read())
        print(json.dumps({
            "status": response.status,
            "review": answer,
            "patched": patched(body, answer),
        }))


if __name__ == "__main__":
    main()
