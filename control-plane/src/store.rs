//! The durable policy store.
