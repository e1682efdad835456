//! `mock-backend`: the fake inference backend as a process. Everything is in
//! the `mock-backend` library (`mock_backend::main`).

fn main() -> std::process::ExitCode {
    mock_backend::main()
}
