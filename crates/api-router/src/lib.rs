//! The `api-router` service as a library: what the binary (`main.rs`) runs,
//! open to the fuzz targets (`fuzz/`) too.
//!
//! - [`settings`]: environment variables and the YAML file, validated;
//! - [`app`]: start-up and the ordered shutdown of the HTTP server and the core;
//! - [`logging`]: the `tracing` subscriber and its JSON span fields.

pub mod app;
pub mod logging;
pub mod settings;
