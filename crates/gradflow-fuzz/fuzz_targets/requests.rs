//! Fuzz target `requests`: see `gradflow_fuzz::requests`. Without `--cfg fuzzing` (a plain
//! `cargo build`), replays the files named on the command line.
#![cfg_attr(fuzzing, no_main)]

#[cfg(fuzzing)]
libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    gradflow_fuzz::single_threaded();
    gradflow_fuzz::requests(data)
});

#[cfg(not(fuzzing))]
fn main() {
    gradflow_fuzz::replay_main("requests");
}
