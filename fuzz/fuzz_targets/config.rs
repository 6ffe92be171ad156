#![no_main]
//! `cargo fuzz run config`: the body is `game_gateway::fuzzing::config` (src/fuzzing.rs),
//! which the stable corpus replay test runs too.
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| game_gateway::fuzzing::config(data));
