#![no_main]
//! Params parser and validator: never panics; whatever it accepts compiles and renders.
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(text) = std::str::from_utf8(data) {
        portfwd::fuzzing::params(text);
    }
});
