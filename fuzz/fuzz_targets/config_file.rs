//! The YAML file (`ROUTER_CONFIG`): a routing state or one error naming the
//! setting, never a panic.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let _ = api_router::settings::parse_file("fuzz.yaml", &String::from_utf8_lossy(data));
});
