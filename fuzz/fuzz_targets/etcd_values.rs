//! An etcd entry (key, then a newline, then the value) as the watch judges
//! it: accepted or rejected with a reason, never a panic.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let text = String::from_utf8_lossy(data);
    let (key, value) = text.split_once('\n').unwrap_or((&text, ""));
    let _ = router_etcd::check_entry("/api-router", key, value);
});
