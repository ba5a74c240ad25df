//! `gradflow status`, `logs`, `delete` and `attach`: jobs on Kubernetes, and `status` and
//! `logs` of local jobs too (given a job file, they read what the local launcher keeps, and
//! need no Kubernetes configuration); and the hidden `gradflow prepare` that a worker pod's
//! init container runs.

use std::process::ExitCode;
use std::time::Duration;

use anyhow::Context;
use futures::StreamExt;
use gradflow_job::Role;
use gradflow_launch::kubernetes::{JobClient, LogSelection, RunOutcome};
use gradflow_launch::local::shutdown_signal;
use gradflow_launch::state::{LocalState, LogFilter, log_files};

/// Show a job's state: Pending, Running, Restarting, Succeeded or Failed.
///
/// Given a job file (`gradflow status examples/wide_deep.toml`): the local job's latest run,
/// from the record its launcher keeps in the output folder (`state.json`): the step,
/// samples/s and loss, each process's phase, attempt and restarts, and the last event.
///
/// Given a name: the Kubernetes job's; per role the active, succeeded and failed pods; each
/// pod's phase, attempt and restarts; and the last warning event about its pods
/// (unschedulable, image pull failure, ...).
#[derive(clap::Args)]
pub struct StatusArgs {
    /// The Kubernetes job's name, or a local job's file (`JOB.toml`).
    job: String,
    /// Namespace. Default: the kubeconfig context's.
    #[arg(long, short = 'n')]
    namespace: Option<String>,
    /// Print JSON instead of a table.
    #[arg(long)]
    json: bool,
}

/// Print the logs of a job's processes.
///
/// Given a job file: the local job's latest run, from the files its launcher writes in
/// `<output dir>/logs/<run id>/`. Given a name: the Kubernetes job's pods (failed pods are
/// kept, with their logs, until `gradflow delete`).
///
/// Without --role, every process's latest attempt (locally also the launcher's own output),
/// each line prefixed with the process's name.
#[derive(clap::Args)]
pub struct LogsArgs {
    /// The Kubernetes job's name, or a local job's file (`JOB.toml`).
    job: String,
    /// Namespace. Default: the kubeconfig context's.
    #[arg(long, short = 'n')]
    namespace: Option<String>,
    /// Only pods of this role (`controller`: a detached job's controller).
    #[arg(long, value_enum)]
    role: Option<LogRole>,
    /// Only this shard or worker index.
    #[arg(long)]
    index: Option<u32>,
    /// This attempt (0 is the first pod of a process). Default: the latest.
    #[arg(long)]
    attempt: Option<u32>,
    /// Keep printing as the processes write (locally: until the job is over).
    #[arg(long, short = 'f')]
    follow: bool,
}

#[derive(Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
enum LogRole {
    Ps,
    Worker,
    Controller,
}

/// Delete a Kubernetes job and everything it made: pods (failed ones and their logs too),
/// its Service, its record.
#[derive(clap::Args)]
pub struct DeleteArgs {
    /// The job's name.
    job: String,
    /// Namespace. Default: the kubeconfig context's.
    #[arg(long, short = 'n')]
    namespace: Option<String>,
    /// Return at once instead of waiting until everything is gone.
    #[arg(long)]
    no_wait: bool,
    /// Seconds to wait for everything to be gone.
    #[arg(long, default_value_t = 120)]
    timeout: u64,
}

/// Drive an existing Kubernetes job to its end: what `launch --backend kubernetes` does after
/// creating it, and what a detached job's controller runs. Resumes a job whose launcher died.
///
/// Ctrl-C or SIGTERM detaches and leaves the job running; `gradflow delete` stops it. The exit
/// code is 0 once the job is over, whatever its outcome (`gradflow status` tells it): a
/// detached job's controller runs this in a Kubernetes Job, which would otherwise start it
/// again.
#[derive(clap::Args)]
pub struct AttachArgs {
    /// The job's name.
    job: String,
    /// Namespace. Default: the kubeconfig context's (the service account's in a pod).
    #[arg(long, short = 'n')]
    namespace: Option<String>,
}

/// Write a job's synthetic data and check its data files, from GRADFLOW_CLUSTER_SPEC: what a
/// Kubernetes worker pod's init container runs.
#[derive(clap::Args)]
pub struct PrepareArgs {}

async fn client(namespace: Option<&str>) -> anyhow::Result<JobClient> {
    Ok(JobClient::infer(namespace).await?)
}

/// A job file rather than a Kubernetes job's name: names have no `.` or `/`.
fn local_job(job: &str) -> Option<anyhow::Result<gradflow_job::JobConfig>> {
    let path = std::path::Path::new(job);
    if !(job.ends_with(".toml") || job.contains('/') || path.is_file()) {
        return None;
    }
    Some(super::load_job(path).with_context(|| format!("reading job file {job}")))
}

/// Flags that only mean something on Kubernetes, refused for a local job.
fn kubernetes_only(namespace: &Option<String>) -> anyhow::Result<()> {
    if namespace.is_some() {
        anyhow::bail!("--namespace applies to Kubernetes jobs only; a job file names a local job");
    }
    Ok(())
}

pub fn status(args: StatusArgs) -> anyhow::Result<ExitCode> {
    if let Some(job) = local_job(&args.job) {
        kubernetes_only(&args.namespace)?;
        let state = LocalState::load(&job?)?;
        if args.json {
            println!("{}", serde_json::to_string_pretty(&state).context("printing the status")?);
        } else {
            print!("{state}");
        }
        return Ok(ExitCode::SUCCESS);
    }
    // kube-rs logs each failed request; the error we print says it once.
    super::init_logging("warn,kube_client=off");
    super::runtime()?.block_on(async move {
        let summary = client(args.namespace.as_deref()).await?.status(&args.job).await?;
        if args.json {
            println!("{}", serde_json::to_string_pretty(&summary).context("printing the status")?);
        } else {
            print!("{summary}");
        }
        Ok(ExitCode::SUCCESS)
    })
}

pub fn logs(args: LogsArgs) -> anyhow::Result<ExitCode> {
    if let Some(job) = local_job(&args.job) {
        kubernetes_only(&args.namespace)?;
        if args.role == Some(LogRole::Controller) {
            anyhow::bail!(
                "--role controller applies to detached Kubernetes jobs; a local job's launcher is `gradflow logs JOB.toml` without --role"
            );
        }
        let filter = LogFilter {
            role: args.role.map(|r| if r == LogRole::Ps { "ps".into() } else { "worker".into() }),
            index: args.index,
            attempt: args.attempt,
        };
        return local_logs(&job?, &filter, args.follow);
    }
    // kube-rs logs each failed request; the error we print says it once.
    super::init_logging("warn,kube_client=off");
    let selection = LogSelection {
        role: match args.role {
            Some(LogRole::Ps) => Some(Role::Ps),
            Some(LogRole::Worker) => Some(Role::Worker),
            _ => None,
        },
        index: args.index,
        attempt: args.attempt,
        controller: args.role == Some(LogRole::Controller),
    };
    super::runtime()?.block_on(async move {
        let client = client(args.namespace.as_deref()).await?;
        let targets = client.log_targets(&args.job, &selection).await?;
        // One pod: its log as it is. Several: each line says whose it is.
        let prefix = |pod: &str| if targets.len() > 1 { format!("[{pod}] ") } else { String::new() };
        if args.follow {
            let mut lines = client.follow_logs(&args.job, &selection).await?;
            while let Some((pod, line)) = lines.next().await {
                match line {
                    Ok(line) => println!("{}{line}", prefix(&pod)),
                    Err(e) => eprintln!("{}log stream ended: {e}", prefix(&pod)),
                }
            }
        } else {
            for (pod, text) in client.logs(&args.job, &selection).await? {
                let p = prefix(&pod);
                for line in text.lines() {
                    println!("{p}{line}");
                }
            }
        }
        Ok(ExitCode::SUCCESS)
    })
}

pub fn delete(args: DeleteArgs) -> anyhow::Result<ExitCode> {
    // kube-rs logs each failed request; the error we print says it once.
    super::init_logging("warn,kube_client=off");
    super::runtime()?.block_on(async move {
        let client = client(args.namespace.as_deref()).await?;
        let ns = client.namespace().to_string();
        let wait = (!args.no_wait).then_some(Duration::from_secs(args.timeout));
        let gone = client.delete(&args.job, wait).await?;
        match (wait, gone) {
            (None, _) => eprintln!("deleting job {} in namespace {ns}", args.job),
            (Some(_), true) => eprintln!("deleted job {} in namespace {ns}", args.job),
            (Some(t), false) => eprintln!(
                "job {} in namespace {ns} is being deleted; not all of it was gone after {t:?}",
                args.job
            ),
        }
        Ok(ExitCode::SUCCESS)
    })
}

pub fn attach(args: AttachArgs) -> anyhow::Result<ExitCode> {
    super::init_logging("info,kube_client=off");
    super::runtime()?.block_on(async move {
        let client = client(args.namespace.as_deref()).await?;
        let cancel = shutdown_signal()?;
        let controller = client.attach(&args.job).await?.stop_on_cancel(false);
        eprintln!("[kube] attached to job {} in namespace {}", args.job, client.namespace());
        match controller.run(cancel, |line| eprintln!("[kube] {line}")).await? {
            RunOutcome::Detached => Ok(ExitCode::SUCCESS),
            RunOutcome::Finished(summary) => {
                eprint!("\n{summary}");
                Ok(ExitCode::SUCCESS)
            }
        }
    })
}

pub fn prepare(_: PrepareArgs) -> anyhow::Result<ExitCode> {
    super::init_logging("info");
    let spec = super::cluster_from_env()?.context("GRADFLOW_CLUSTER_SPEC is not set: `gradflow prepare` runs in a pod made by `gradflow launch --backend kubernetes`")?;
    gradflow_launch::prepare::prepare_data(&spec.job_config)?;
    Ok(ExitCode::SUCCESS)
}

/// Prints a local job's log files, each line prefixed with its process's name when there are
/// several; with `follow`, keeps printing what is appended until the job is over.
fn local_logs(job: &gradflow_job::JobConfig, filter: &LogFilter, follow: bool) -> anyhow::Result<ExitCode> {
    use std::io::{BufRead, Write};
    let mut state = LocalState::load(job)?;
    let files = log_files(job, &state, filter)?;
    let several = files.len() > 1;
    let mut readers: Vec<(String, std::path::PathBuf, Option<std::io::BufReader<std::fs::File>>, String)> =
        files.into_iter().map(|(name, path)| (name, path, None, String::new())).collect();
    let mut out = std::io::stdout().lock();
    loop {
        // Read the state first: whatever was written before it said "over" is printed below.
        let over = !follow || state.state.is_terminal();
        for (name, path, reader, partial) in &mut readers {
            if reader.is_none() {
                match std::fs::File::open(&*path) {
                    Ok(f) => *reader = Some(std::io::BufReader::new(f)),
                    Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
                    Err(e) => return Err(e).with_context(|| format!("reading {}", path.display())),
                }
            }
            let reader = reader.as_mut().expect("opened above");
            loop {
                let n = reader.read_line(partial).with_context(|| format!("reading {}", path.display()))?;
                // Only whole lines; a line still being written is finished on the next pass.
                if n == 0 || !partial.ends_with('\n') {
                    break;
                }
                let prefix = if several { format!("[{name}] ") } else { String::new() };
                out.write_all(format!("{prefix}{partial}").as_bytes())?;
                partial.clear();
            }
        }
        out.flush()?;
        if over {
            return Ok(ExitCode::SUCCESS);
        }
        std::thread::sleep(Duration::from_millis(250));
        let again = LocalState::load(job)?;
        if again.run_id != state.run_id {
            eprintln!(
                "a new run ({}) of job {} started; its logs: `gradflow logs` again",
                again.run_id, job.name
            );
            return Ok(ExitCode::SUCCESS);
        }
        state = again;
    }
}
