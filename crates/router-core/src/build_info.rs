//! Version, git commit and build time, embedded by `build.rs`.

pub const VERSION: &str = env!("CARGO_PKG_VERSION");
pub const COMMIT: &str = env!("API_ROUTER_GIT_COMMIT");
pub const BUILD_TIME: &str = env!("API_ROUTER_BUILD_TIME");
