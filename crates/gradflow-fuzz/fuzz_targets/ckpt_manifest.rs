//! Fuzz target `ckpt_manifest`: see `gradflow_fuzz::ckpt_manifest`. Without `--cfg fuzzing` (a plain
//! `cargo build`), replays the files named on the command line.
#![cfg_attr(fuzzing, no_main)]

#[cfg(fuzzing)]
libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    gradflow_fuzz::single_threaded();
    gradflow_fuzz::ckpt_manifest(data)
});

#[cfg(not(fuzzing))]
fn main() {
    gradflow_fuzz::replay_main("ckpt_manifest");
}
