//! `pylon-control`: where users change policy, and how it reaches every
//! sidecar. The policy store ([`store`]) is durable (redb).

#![forbid(unsafe_code)]
#![deny(rust_2018_idioms)]

pub mod store;
