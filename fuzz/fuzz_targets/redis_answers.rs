//! Bytes from Redis as the limits' connection parses them: whole answers,
//! partial ones and garbage give an answer, a wait for more or a protocol
//! error, never a panic; an answer never claims more bytes than it was given.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let mut at = 0;
    while let Ok(Some((_, used))) = router_core::limits::resp::parse(&data[at..]) {
        assert!(used > 0 && at + used <= data.len());
        at += used;
    }
});
