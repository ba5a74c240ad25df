//! `gradflow status`, `logs`, `delete` and `attach`: jobs on Kubernetes; and the hidden
//! `gradflow prepare` that a worker pod's init container runs.

use std::process::ExitCode;
use std::time::Duration;

use anyhow::Context;
use futures::StreamExt;
use gradflow_job::Role;
use gradflow_launch::kubernetes::{JobClient, LogSelection, RunOutcome};
use gradflow_launch::local::shutdown_signal;

/// Show a Kubernetes job's state: Pending, Running, Restarting, Succeeded or Failed; per
/// role the active, succeeded and failed pods; each pod's phase, attempt and restarts; and
/// the last warning event about its pods (unschedulable, image pull failure, ...).
#[derive(clap::Args)]
pub struct StatusArgs {
    /// The job's name.
    job: String,
    /// Namespace. Default: the kubeconfig context's.
    #[arg(long, short = 'n')]
    namespace: Option<String>,
    /// Print JSON instead of a table.
    #[arg(long)]
    json: bool,
}

/// Print the logs of a Kubernetes job's pods (failed pods are kept, with their logs, until
/// `gradflow delete`).
///
/// Without --role, every process's latest pod, each line prefixed with the pod's name.
#[derive(clap::Args)]
pub struct LogsArgs {
    /// The job's name.
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
    /// Keep printing as the pods write.
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

pub fn status(args: StatusArgs) -> anyhow::Result<ExitCode> {
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
