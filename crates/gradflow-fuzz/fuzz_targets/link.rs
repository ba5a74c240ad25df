//! Fuzz target `link`: see `gradflow_fuzz::link`. Without `--cfg fuzzing` (a plain
//! `cargo build`), replays the files named on the command line.
#![cfg_attr(fuzzing, no_main)]

#[cfg(fuzzing)]
libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    gradflow_fuzz::single_threaded();
    gradflow_fuzz::link(data)
});

#[cfg(not(fuzzing))]
fn main() {
    gradflow_fuzz::replay_main("link");
}
