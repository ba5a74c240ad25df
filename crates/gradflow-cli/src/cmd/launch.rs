//! `gradflow launch`: run a whole job, locally or on Kubernetes.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{Context, bail};
use gradflow_job::contract::new_run_id;
use gradflow_launch::guard::RunGuard;
use gradflow_launch::kubernetes::render::{Renderer, controller_name, to_json, to_yaml};
use gradflow_launch::kubernetes::{JobClient, JobState, KubernetesConfig, RunOutcome, config};
use gradflow_launch::local::{LocalLauncher, shutdown_signal};

/// Run a training job from its job file: prepare the data, start the parameter servers and
/// workers, show progress, print test scores, and stop everything at the end.
///
/// With the local backend (the default) the job runs as child processes of this one. Ctrl-C
/// or SIGTERM stops every child; if this process is killed, its children are killed too.
///
/// With `--backend kubernetes` the job runs as pods in a cluster (kubeconfig or in-cluster
/// configuration); this process follows it to its end and prints its state changes, and
/// Ctrl-C stops it. `--detach` leaves it to a controller in the cluster instead;
/// `--dry-run` prints the manifests without a cluster. See docs/kubernetes.md.
///
/// Locally, each run gets a run id (`<job>-<UTC time>-<4 hex>`, printed at the start and
/// given to every process as GRADFLOW_RUN_ID) and holds a lease on the job's output folder
/// and checkpoint root while it runs (`lease.json` there): a second launch of a running job
/// is refused, naming the run that holds them. A run without `restore` into a checkpoint root
/// that holds checkpoints is refused too (see --fresh). A job of more processes than 4 per
/// CPU is refused (see --allow-oversubscribe), and the data is checked against the model
/// before any process starts.
///
/// The exit code is 0 when every worker finished and every server stopped cleanly (a server
/// that fails or is killed while stopping may have lost a checkpoint), non-zero otherwise.
#[derive(clap::Args)]
pub struct Args {
    /// The job file (TOML); see the README for every key.
    job: PathBuf,
    /// Where the job runs.
    #[arg(long, value_enum, default_value_t = Backend::Local)]
    backend: Backend,
    /// Kubernetes: the namespace. Default: the job file's `kubernetes.namespace`, else the
    /// kubeconfig context's (with --dry-run: `default`).
    #[arg(long, short = 'n')]
    namespace: Option<String>,
    /// Kubernetes: print every manifest instead of creating anything; needs no cluster.
    #[arg(long)]
    dry_run: bool,
    /// Kubernetes, with --dry-run: the format of the manifests [default: yaml].
    #[arg(long, short = 'o', value_enum)]
    output: Option<Output>,
    /// Kubernetes: create the job and return at once; a controller in the cluster drives
    /// it (it runs as the service account in deploy/rbac.yaml).
    #[arg(long)]
    detach: bool,
    /// Start from scratch although the checkpoint root holds an earlier run's checkpoints:
    /// first move them, and `latest`, into `<root>/archive/<earlier run id>/` (under the same
    /// store), where `gradflow checkpoint ls` and `restore` still find them. Nothing is
    /// deleted. Not with `restore`.
    #[arg(long)]
    fresh: bool,
    /// Start more processes (servers + workers) than 4 per CPU of this machine, which is
    /// refused otherwise (the same as `launcher.allow_oversubscribe = true`).
    #[arg(long)]
    allow_oversubscribe: bool,
}

#[derive(Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
enum Backend {
    /// Child processes of this process, on this machine.
    Local,
    /// Pods in a Kubernetes cluster.
    Kubernetes,
}

#[derive(Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
enum Output {
    Yaml,
    Json,
}

pub fn run(args: Args) -> anyhow::Result<ExitCode> {
    if args.backend == Backend::Kubernetes {
        return run_kubernetes(args);
    }
    for (set, flag) in [
        (args.namespace.is_some(), "--namespace"),
        (args.dry_run, "--dry-run"),
        (args.output.is_some(), "--output"),
        (args.detach, "--detach"),
    ] {
        if set {
            bail!("{flag} applies to --backend kubernetes only");
        }
    }
    super::init_logging("info");
    let mut job = super::load_job(&args.job)?;
    job.launcher.allow_oversubscribe |= args.allow_oversubscribe;
    let name = job.name.clone();
    // Refusals that need nothing but the job file come before anything is written.
    if let Err(e) = gradflow_launch::local::check_process_count(&job) {
        eprintln!("job {name}: {e}");
        return Ok(ExitCode::FAILURE);
    }
    let program = std::env::current_exe().context("finding the gradflow executable")?;
    let results = job.output_dir().join(&job.output.results);
    let run_id = new_run_id(&name);
    let job_file = job.clone();
    let outcome = super::runtime()?.block_on(async {
        let cancel = shutdown_signal()?;
        let mut guard = RunGuard::acquire(&job, &run_id).await?;
        eprintln!("[launch] job {name}: run {run_id}");
        let started = async {
            if let Some(note) = guard.remove_stale_record(&job) {
                eprintln!("[launch] {note}");
            }
            if let Some(note) = guard.check_checkpoint_root(&job, args.fresh).await? {
                eprintln!("[launch] {note}");
            }
            gradflow_launch::prepare::prepare_data(&job)?;
            gradflow_launch::prepare::pin_restore(&mut job).await?;
            guard.mark_started();
            LocalLauncher::new(job, program).run_id(run_id.clone()).run(cancel).await
        }
        .await;
        if let Some(warning) = guard.release().await {
            eprintln!("[launch] warning: {warning}");
        }
        if let Err(e) = &started
            && let Err(w) = gradflow_launch::state::record_failed_start(&job_file, &run_id, &e.to_string())
        {
            eprintln!("[launch] warning: `gradflow status` will not show this run: {w}");
        }
        started
    });
    match outcome {
        Ok(outcome) => {
            eprintln!(
                "job {name} (run {run_id}) finished in {:.1}s; results in {}",
                outcome.wall_time.as_secs_f64(),
                results.display()
            );
            Ok(ExitCode::SUCCESS)
        }
        Err(e) => {
            eprintln!("job {name} (run {run_id}): {e}");
            Ok(ExitCode::FAILURE)
        }
    }
}

fn run_kubernetes(args: Args) -> anyhow::Result<ExitCode> {
    if args.output.is_some() && !args.dry_run {
        bail!("--output applies to --dry-run only");
    }
    for (set, flag) in [(args.fresh, "--fresh"), (args.allow_oversubscribe, "--allow-oversubscribe")] {
        if set {
            bail!("{flag} applies to --backend local only");
        }
    }
    // Paths of the job file become paths inside the pods (`kubernetes.workdir`).
    let job = config::load_job(&args.job)?;
    let namespace = match args.namespace.clone() {
        Some(namespace) => Some(namespace),
        None => KubernetesConfig::of(&job)?.namespace,
    };
    if args.dry_run {
        let renderer = Renderer::new(job, namespace.as_deref().unwrap_or("default"))?;
        let manifests = renderer.manifests(args.detach);
        let text = match args.output.unwrap_or(Output::Yaml) {
            Output::Yaml => to_yaml(&manifests)?,
            Output::Json => to_json(&manifests)?,
        };
        print!("{text}");
        return Ok(ExitCode::SUCCESS);
    }
    // kube-rs logs each failed request; the error we print says it once.
    super::init_logging("warn,kube_client=off");
    let name = job.name.clone();
    super::runtime()?.block_on(async move {
        let client = JobClient::infer(namespace.as_deref()).await?;
        let ns = client.namespace().to_string();
        // Installed before anything is created, so that a Ctrl-C in between is not lost.
        let cancel = shutdown_signal()?;
        let controller = client.launch(job, args.detach).await?;
        if args.detach {
            eprintln!(
                "job {name} created in namespace {ns}; its controller runs as Job {}.\n\
                 Follow it with `gradflow status {name} -n {ns}` and `gradflow logs {name} -n {ns} --follow`; \
                 remove it with `gradflow delete {name} -n {ns}`.",
                controller_name(&name)
            );
            return Ok(ExitCode::SUCCESS);
        }
        eprintln!("[kube] job {name} created in namespace {ns}; following it (Ctrl-C stops it)");
        let outcome = controller.run(cancel, |line| eprintln!("[kube] {line}")).await?;
        let RunOutcome::Finished(summary) = outcome else { return Ok(ExitCode::FAILURE) };
        eprint!("\n{summary}");
        if summary.state == JobState::Succeeded {
            eprintln!("\njob {name} succeeded; logs: `gradflow logs {name} -n {ns}`");
            Ok(ExitCode::SUCCESS)
        } else {
            eprintln!(
                "\njob {name} {}; ended pods are kept for their logs until `gradflow delete {name} -n {ns}`",
                summary.state.to_string().to_lowercase()
            );
            Ok(ExitCode::FAILURE)
        }
    })
}
