//! Backend kinds, and the transport that reaches them.
//!
//! Everything that differs between kinds of backend lives behind one trait,
//! [`Provider`]: which operations a kind serves, the upstream path, the body
//! for one attempt (model mapping, asking for stream usage), the credential
//! header, usage from a full answer and from a stream, the stream's error
//! events, and the health probe's path. One module per kind ([`native`],
//! [`openai`], [`anthropic`], [`azure`]); adding a kind is one module and
//! one line in [`KINDS`]. A door and a kind of another shape meet through a
//! [`translate`] module (the Anthropic Messages API and OpenAI chat, both
//! ways).
//!
//! [`transport`] is the HTTP client: HTTP/1.1 and HTTP/2 (by ALPN), plain and
//! TLS (rustls), one connection pool per TLS configuration, and the
//! classification of every failure of one attempt. [`json_walk`] reads the
//! few fields the router needs of a body it passes on, without serde where
//! it is sure to read what serde would.
//!
//! This crate knows nothing of the router's core (limits, usage, audit,
//! routing) or of its doors; the core depends on it.

pub mod anthropic;
pub mod azure;
pub mod credential;
pub mod json_walk;
pub mod native;
pub mod openai;
pub mod operation;
pub mod provider;
pub mod sse;
pub mod translate;
pub mod transport;
pub mod usage;

pub use operation::Operation;
pub use provider::{Kind, Provider, Target};
pub use usage::Usage;

/// Every backend kind the router speaks, by the name used in configuration
/// (`kind: openai`, `openai+https://...`). The first is the default.
pub static KINDS: &[&dyn Provider] = &[&native::Native, &openai::OpenAi, &anthropic::Anthropic, &azure::Azure];
