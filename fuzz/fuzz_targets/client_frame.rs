#![no_main]
//! `cargo fuzz run client_frame`: the body is `game_gateway::fuzzing::client_frame` (src/fuzzing.rs),
//! which the stable corpus replay test runs too.
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| game_gateway::fuzzing::client_frame(data));
