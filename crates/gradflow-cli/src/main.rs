//! The `gradflow` command.
//!
//! `gradflow launch JOB.toml` runs a whole job; `gradflow ps` and `gradflow worker` run one
//! process of a job (what the launcher starts, and what a Kubernetes pod runs); `gradflow data
//! synth` writes a synthetic click-through dataset; `gradflow eval` scores the model a job's
//! servers hold.

mod cmd;

use clap::{Parser, Subcommand};

/// gradflow: distributed training with parameter servers.
///
/// Start with `gradflow launch examples/wide_deep.toml`: it generates synthetic data, starts
/// the parameter servers and workers the job file asks for on this machine, shows progress,
/// and prints the test AUC.
#[derive(Parser)]
#[command(name = "gradflow", version, propagate_version = true)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    Launch(cmd::launch::Args),
    Ps(cmd::ps::Args),
    Worker(cmd::worker::Args),
    Eval(cmd::eval::Args),
    /// Datasets for trying gradflow out (`gradflow data synth`).
    #[command(subcommand)]
    Data(cmd::data::Command),
}

fn main() -> std::process::ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Launch(a) => cmd::launch::run(a),
        Command::Ps(a) => cmd::ps::run(a),
        Command::Worker(a) => cmd::worker::run(a),
        Command::Eval(a) => cmd::eval::run(a),
        Command::Data(c) => cmd::data::run(c),
    };
    match result {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}
