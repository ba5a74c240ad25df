//! The `gradflow` command.
//!
//! `gradflow launch JOB.toml` runs a whole job; `gradflow ps` and `gradflow worker` run one
//! process of a job (what the launcher starts, and what a Kubernetes pod runs); `gradflow data
//! synth` writes a synthetic click-through dataset; `gradflow eval` scores the model a job's
//! servers hold, or a checkpoint's; `gradflow predict` and `gradflow serve` use a checkpoint's
//! model after the job; `gradflow bench` measures the runtime on this machine; `gradflow status`
//! and `gradflow logs` show a job, local or on Kubernetes; `gradflow completions SHELL` prints a
//! shell completion script.

#![forbid(unsafe_code)]

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
    Predict(cmd::predict::Args),
    Serve(cmd::serve::Args),
    Bench(cmd::bench::Args),
    /// Data files: a synthetic dataset to try gradflow out (`gradflow data synth`); what a file
    /// holds, local or on object storage (`inspect`); CSV to Parquet (`convert`).
    #[command(subcommand)]
    Data(cmd::data::Command),
    /// List and inspect checkpoints (`gradflow checkpoint ls URL`, `inspect URL`).
    #[command(subcommand)]
    Checkpoint(cmd::checkpoint::Command),
    Export(cmd::checkpoint::ExportArgs),
    Status(cmd::kube::StatusArgs),
    Logs(cmd::kube::LogsArgs),
    Delete(cmd::kube::DeleteArgs),
    Attach(cmd::kube::AttachArgs),
    #[command(hide = true)]
    Prepare(cmd::kube::PrepareArgs),
    Completions(CompletionsArgs),
}

/// Print a completion script for SHELL on standard output.
///
/// bash: `gradflow completions bash > ~/.local/share/bash-completion/completions/gradflow`;
/// zsh: `gradflow completions zsh > "${fpath[1]}/_gradflow"`; fish: `gradflow completions fish >
/// ~/.config/fish/completions/gradflow.fish`.
#[derive(clap::Args)]
struct CompletionsArgs {
    /// The shell to complete in.
    shell: clap_complete::Shell,
}

fn main() -> std::process::ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Launch(a) => cmd::launch::run(a),
        Command::Ps(a) => cmd::ps::run(a),
        Command::Worker(a) => cmd::worker::run(a),
        Command::Eval(a) => cmd::eval::run(a),
        Command::Predict(a) => cmd::predict::run(a),
        Command::Serve(a) => cmd::serve::run(a),
        Command::Bench(a) => cmd::bench::run(a),
        Command::Data(c) => cmd::data::run(c),
        Command::Checkpoint(c) => cmd::checkpoint::run(c),
        Command::Export(a) => cmd::checkpoint::run_export(a),
        Command::Status(a) => cmd::kube::status(a),
        Command::Logs(a) => cmd::kube::logs(a),
        Command::Delete(a) => cmd::kube::delete(a),
        Command::Attach(a) => cmd::kube::attach(a),
        Command::Prepare(a) => cmd::kube::prepare(a),
        Command::Completions(a) => {
            let mut command = <Cli as clap::CommandFactory>::command();
            clap_complete::generate(a.shell, &mut command, "gradflow", &mut std::io::stdout());
            Ok(std::process::ExitCode::SUCCESS)
        }
    };
    match result {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}
