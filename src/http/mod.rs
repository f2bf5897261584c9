//! HTTP transport, with no policy in it: the body type the proxy forwards,
//! header rewriting, connection pools to endpoints and plaintext upstreams,
//! the request-body replay buffer and read timeout, deadlines as `grpc-timeout` carries
//! them, the one wrapper that watches a response to its end, the proxy's
//! own errors and how they render, and how every listener accepts and serves its
//! connections under the limits of `connections.*`.

pub mod body;
pub mod deadline;
pub mod end;
pub mod error;
pub mod h2_client;
pub mod h2_server;
pub mod headers;
pub mod listener;
pub mod own_socket;
pub mod pool;
pub mod prefixed;
pub mod replay;
pub mod request_body;
pub mod server;
pub mod upstream;
