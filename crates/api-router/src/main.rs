//! The `api-router` binary: read settings, start logging, run the service.

use std::process::ExitCode;

use api_router::config::Settings;

fn main() -> ExitCode {
    let settings = match Settings::from_env() {
        Ok(s) => s,
        Err(e) => {
            eprintln!("api-router: {e}");
            return ExitCode::from(2);
        }
    };
    api_router::telemetry::init_logging(settings.log_format);
    let runtime = match tokio::runtime::Builder::new_multi_thread().enable_all().build() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("api-router: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(api_router::app::run(settings)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!(error = %e, "api-router failed");
            eprintln!("api-router: {e}");
            ExitCode::FAILURE
        }
    }
}
