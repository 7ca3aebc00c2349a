//! `Amount::parse` on arbitrary text and `format_minor` on any `i64`.
#![no_main]

use libfuzzer_sys::fuzz_target;

#[allow(dead_code)]
#[path = "../../crates/strife/tests/fuzz_bodies/mod.rs"]
mod bodies;

fuzz_target!(|data: &[u8]| {
    let _ = bodies::amount(data);
});
