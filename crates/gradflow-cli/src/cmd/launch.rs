//! `gradflow launch`: run a whole job.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;
use gradflow_launch::local::{LocalLauncher, shutdown_signal};

/// Run a training job from its job file: prepare the data, start the parameter servers and
/// workers, show progress, print test scores, and stop everything at the end.
///
/// The job runs as child processes of this one (the local backend). Ctrl-C or SIGTERM stops
/// every child; if this process is killed, its children are killed too. The exit code is 0
/// when every worker finished, non-zero otherwise.
#[derive(clap::Args)]
pub struct Args {
    /// The job file (TOML); see the README for every key.
    job: PathBuf,
}

pub fn run(args: Args) -> anyhow::Result<ExitCode> {
    super::init_logging("info");
    let job = super::load_job(&args.job)?;
    gradflow_launch::prepare::prepare_data(&job)?;
    let program = std::env::current_exe().context("finding the gradflow executable")?;
    let name = job.name.clone();
    let results = job.output_dir().join(&job.output.results);
    let outcome = super::runtime()?.block_on(async move {
        let cancel = shutdown_signal()?;
        LocalLauncher::new(job, program).run(cancel).await
    });
    match outcome {
        Ok(outcome) => {
            eprintln!(
                "job {name} finished in {:.1}s; results in {}",
                outcome.wall_time.as_secs_f64(),
                results.display()
            );
            Ok(ExitCode::SUCCESS)
        }
        Err(e) => {
            eprintln!("job {name} failed: {e}");
            Ok(ExitCode::FAILURE)
        }
    }
}
