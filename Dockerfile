# The pylon image: `pylon` (the sidecar and `pylon-init`'s `init-iptables`)
# and `pylon-control` (the control plane and its CLI).
#
#   docker build -t pylon/pylon:0.1.0 .
#
# The build runs the commands CI runs (.ci/run), with the committed
# Cargo.lock. The sidecar is built without the default feature `full`
# (the demo, its embedded control plane, the load generator and `inject`),
# so the binary on every pod carries the sidecar only. Both are built with
# the `dist` profile (Cargo.toml: `release` with fat LTO and one codegen
# unit; ADR 20); the sidecar's text is linked in the order of
# link/pylon.order (build.rs, ADR 21).

FROM rust:1.95-bookworm AS build
WORKDIR /src
COPY . .
RUN cargo build --profile dist --locked --no-default-features --bin pylon
RUN cargo build --profile dist --locked --bin pylon-control

# Debian slim rather than distroless: the pylon-init container needs
# iptables-restore. Nothing else is added but the CA certificates.
FROM debian:bookworm-slim
RUN apt-get update \
 && apt-get install -y --no-install-recommends iptables ca-certificates \
 && rm -rf /var/lib/apt/lists/*
COPY --from=build /src/target/dist/pylon /usr/local/bin/pylon
COPY --from=build /src/target/dist/pylon-control /usr/local/bin/pylon-control
# The sidecar's UID: its own traffic is what iptables does not redirect.
# pylon-init runs as root by its pod's securityContext.
USER 1337:1337
ENTRYPOINT ["/usr/local/bin/pylon"]
