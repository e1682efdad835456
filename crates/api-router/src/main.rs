//! The `api-router` binary: read settings, start logging, run the service
//! (the library's [`settings`] and [`app`]).

use std::process::ExitCode;

use api_router::settings::{self, Settings};
use api_router::{app, logging};

fn main() -> ExitCode {
    fix_mmap_threshold();
    let nofile = settings::raise_nofile_limit();
    let settings = match Settings::from_env() {
        Ok(s) => s,
        Err(e) => {
            eprintln!("api-router: {e}");
            return ExitCode::from(2);
        }
    };
    logging::init(settings.log_format);
    tracing::debug!(nofile, max_connections = settings.server.max_connections, "open-file limit");
    let runtime = match tokio::runtime::Builder::new_multi_thread().enable_all().build() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("api-router: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(app::run(settings)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!(error = %e, "api-router failed");
            eprintln!("api-router: {e}");
            ExitCode::FAILURE
        }
    }
}

/// glibc's malloc serves blocks of 128 KiB and more from mmap, but raises
/// that threshold to the size of every such block freed (up to 32 MiB), and
/// from then on blocks of that size come from its arenas and stay resident
/// after they are freed. The write-ahead logs' and the audit log's
/// per-segment indexes (about 2 MiB each at 64 MiB a segment) did that at
/// their first rotation: the soak's RSS stepped up by ~4 MB and kept it
/// (`docs/benchmarks.md`, "Soak"). A fixed threshold keeps such blocks in
/// mmap, returned when freed.
#[cfg(all(target_os = "linux", target_env = "gnu"))]
#[allow(unsafe_code)]
fn fix_mmap_threshold() {
    // SAFETY: mallopt only sets one of the allocator's parameters, and this
    // runs first in `main`, before any other thread exists.
    unsafe {
        libc::mallopt(libc::M_MMAP_THRESHOLD, 128 * 1024);
    }
}

#[cfg(not(all(target_os = "linux", target_env = "gnu")))]
fn fix_mmap_threshold() {}
