//! The local backend: a job's servers and workers as child processes on this machine.
//!
//! [`LocalLauncher::run`] starts every parameter-server shard, waits until each reports the
//! address it listens on, then starts the workers with those addresses. While the job runs it
//! prints the children's log lines (prefixed with the process name), shows overall progress
//! and evaluations, and restarts workers that fail. When every worker has finished it stops
//! the servers; when the job fails or is cancelled it stops everything.
//!
//! # What it leaves behind
//!
//! While it runs the launcher keeps the job's state record (`<output dir>/state.json`) and
//! writes every process's output, one file per process and attempt, and its own console to
//! `<output dir>/logs/<run id>/` (see [`crate::state`]): `gradflow status JOB.toml` and
//! `gradflow logs JOB.toml` read them, during the run and after it.
//!
//! # A server that dies
//!
//! A shard holds part of the model, so its death stops the job. With a `[checkpoint]`
//! section the launcher SIGKILLs every remaining process, pins the latest complete
//! checkpoint, and starts all servers (restoring that step) and all workers (which skip the
//! batches that step already holds) again, up to `launcher.max_restarts` times. At most one
//! checkpoint interval of steps is redone. Without checkpoints the job fails.
//!
//! # No child outlives the launcher
//!
//! - Whenever `run` returns, every child has had SIGTERM, then SIGKILL once
//!   `launcher.grace_period` has passed, and has been reaped.
//! - If the launcher dies, even by SIGKILL, the kernel SIGKILLs its children: each one is
//!   started with `PR_SET_PDEATHSIG`. Linux sends that signal when the *thread* that forked
//!   the child exits, not when the process does, so all children are forked by one
//!   dedicated thread that lives until `run` has reaped them all. (Forking from the async
//!   task would fork from whichever runtime thread polls it, and runtime threads come and
//!   go: blocking-pool threads exit when idle, `block_in_place` retires worker threads.)
//! - If the future returned by `run` is dropped before it finishes, that thread exits and
//!   the children are SIGKILLed at once, without a grace period. Pass a cancellation future
//!   to `run` to stop a job cleanly.
//!
//! # Ctrl-C
//!
//! Every child runs in its own process group. A terminal sends Ctrl-C's SIGINT to its whole
//! foreground process group: children in the launcher's group would get SIGINT at the same
//! moment as the launcher, so servers could go away while workers still push to them, and
//! the launcher's own SIGTERM would then be a second signal to half-stopped processes. In
//! their own groups only the launcher sees Ctrl-C ([`shutdown_signal`]) and every child gets
//! exactly one SIGTERM from it. Signals go to the child's group so that anything the child
//! started goes with it.

use std::ffi::OsString;
use std::future::Future;
use std::io::{self, IsTerminal, Write};
use std::path::PathBuf;
use std::process::{ExitStatus, Stdio};
use std::time::{Duration, Instant};

use gradflow_core::Restore;
use gradflow_job::contract::{CLUSTER_SPEC_VERSION, ENV_RUN_ID, ENV_TOKEN, EXIT_NO_RESTART};
use gradflow_job::{ClusterSpec, Event, JobConfig, Role};
use indicatif::{ProgressBar, ProgressStyle};
use tokio::io::{AsyncBufReadExt, AsyncRead, BufReader};
use tokio::process::{Child, Command};
use tokio::sync::{mpsc, oneshot};
use tokio_util::sync::CancellationToken;

use crate::LaunchError;
use crate::state::{JobState, LocalState};

pub use gradflow_job::contract::ENV_LOG;

/// Address servers are told to listen on: loopback, port chosen by the server.
const LOCAL_ANY_PORT: &str = "127.0.0.1:0";

/// How long a child's output is still read after it exited. Something the child started
/// outside its process group can hold the pipes open forever.
const DRAIN_TIMEOUT: Duration = Duration::from_secs(2);

/// Runs one job as child processes of this process.
pub struct LocalLauncher {
    job: JobConfig,
    run_id: String,
    program: PathBuf,
    env: Vec<(OsString, OsString)>,
    console: Console,
    startup_timeout: Duration,
}

/// What a job that finished did.
#[derive(Debug, Clone, PartialEq)]
pub struct JobOutcome {
    /// Server addresses in shard order.
    pub servers: Vec<String>,
    /// Each shard's `/metrics` address, in shard order; `None` where metrics are off.
    pub metrics: Vec<Option<String>>,
    /// How many times each worker was restarted after it failed.
    pub restarts: Vec<u32>,
    /// How many times the whole job was restarted from its latest checkpoint because a
    /// server died.
    pub server_restarts: u32,
    /// The job's progress at every worker report: what the console's progress line shows.
    pub progress: Vec<JobProgress>,
    /// Every [`Event::Eval`] the workers reported, in the order they arrived.
    pub evals: Vec<Event>,
    /// Every [`Event::Done`] the workers reported, in the order they arrived.
    pub done: Vec<Event>,
    /// From the start of [`LocalLauncher::run`] until every process was gone.
    pub wall_time: Duration,
}

/// The job's progress when a worker reported.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct JobProgress {
    /// Since the start of [`LocalLauncher::run`].
    pub elapsed: Duration,
    /// The highest step any worker reported.
    pub step: u64,
    /// The sum of every running worker's latest samples/s.
    pub samples_per_sec: f64,
}

impl LocalLauncher {
    /// A launcher for `job` that starts `program ps` and `program worker`. `program` is the
    /// `gradflow` binary, normally [`std::env::current_exe`].
    ///
    /// Output goes to [`Console::stderr`]; servers get 60 s to report their address.
    pub fn new(job: JobConfig, program: impl Into<PathBuf>) -> LocalLauncher {
        LocalLauncher {
            run_id: gradflow_job::contract::new_run_id(&job.name),
            job,
            program: program.into(),
            env: Vec::new(),
            console: Console::stderr(),
            startup_timeout: Duration::from_secs(60),
        }
    }

    /// The run's id, passed to every child as `GRADFLOW_RUN_ID` (default: a new one, see
    /// [`gradflow_job::contract::new_run_id`]).
    pub fn run_id(mut self, run_id: impl Into<String>) -> LocalLauncher {
        self.run_id = run_id.into();
        self
    }

    /// Where logs, progress and the launcher's own messages go.
    pub fn console(mut self, console: Console) -> LocalLauncher {
        self.console = console;
        self
    }

    /// How long every server together gets to report the address it listens on.
    pub fn startup_timeout(mut self, timeout: Duration) -> LocalLauncher {
        self.startup_timeout = timeout;
        self
    }

    /// Sets an environment variable for every child, on top of the launcher's own
    /// environment and the contract's variables.
    pub fn env(mut self, key: impl Into<OsString>, value: impl Into<OsString>) -> LocalLauncher {
        self.env.push((key.into(), value.into()));
        self
    }

    /// Runs the job to its end. Every child is gone when this returns, whatever the result.
    ///
    /// When `cancel` completes (pass [`shutdown_signal`] in the `gradflow` binary), every
    /// child is stopped and the result is [`LaunchError::Process`]. A job that cannot go on
    /// (a server exits, a worker fails more than `launcher.max_restarts` times, a server
    /// does not report its address in time, a worker exits with
    /// [`EXIT_NO_RESTART`], a server exits non-zero or has to
    /// be killed while the finished job stops, which may have cost its last checkpoint) is
    /// [`LaunchError::JobFailed`]; a child that cannot be started is [`LaunchError::Io`]; more
    /// processes than [`check_process_count`] allows is [`LaunchError::TooManyProcesses`].
    ///
    /// Must be called inside a tokio runtime with IO and time enabled.
    pub async fn run(self, cancel: impl Future<Output = ()>) -> Result<JobOutcome, LaunchError> {
        let started = Instant::now();
        check_process_count(&self.job)?;
        let spawner = Spawner::start().map_err(|source| LaunchError::Io {
            context: "starting the process-spawning thread".into(),
            source,
        })?;
        let (tx, rx) = mpsc::channel(1024);
        let (servers, workers) = (self.job.servers as usize, self.job.workers as usize);
        let mut state = LocalState::new(&self.job, &self.run_id);
        let counted = self.job.clone();
        let examples = tokio::task::spawn_blocking(move || crate::prepare::count_examples(&counted))
            .await
            .ok()
            .flatten();
        state.total_steps = crate::prepare::total_steps(&self.job, examples);
        let logs = self.job.logs_dir(&self.run_id);
        let mut console = self.console;
        let metrics = crate::metrics::LauncherMetrics::default();
        let stop_metrics = CancellationToken::new();
        let _stop_metrics = stop_metrics.clone().drop_guard();
        // After the servers' and the workers' ports.
        if let Some(listen) = self.job.metrics_listen(self.job.servers + self.job.workers) {
            let served = match listen.parse() {
                Ok(addr) => metrics.serve(addr, stop_metrics).await.map_err(|e| e.to_string()),
                Err(e) => Err(format!("{listen:?} is not an address: {e}")),
            };
            match served {
                Ok(addr) => state.metrics = Some(addr.to_string()),
                Err(e) => console.note(&format!("warning: no launcher /metrics: {e}")),
            }
        }
        match std::fs::create_dir_all(&logs).and_then(|()| std::fs::File::create(logs.join("launch.log"))) {
            Ok(file) => console.copy = Some(file),
            Err(e) => console.note(&format!("warning: no log files for this run ({}: {e})", logs.display())),
        }
        // Every process of the job gets its token; a later `env(GRADFLOW_TOKEN, ..)` wins.
        let token = self.job.auth.token()?;
        let mut env = self.env;
        if let Some(t) = &token {
            env.insert(0, (ENV_TOKEN.into(), t.expose().into()));
        }
        env.insert(0, (ENV_RUN_ID.into(), self.run_id.clone().into()));
        let mut run = Run {
            started,
            run_id: self.run_id,
            token: token.map(|t| t.expose().to_string()),
            grace: self.job.launcher.grace_period,
            job: self.job,
            program: self.program,
            env,
            console,
            startup_timeout: self.startup_timeout,
            spawner,
            tx,
            rx,
            stop: CancellationToken::new(),
            kill: CancellationToken::new(),
            ps_attempts: vec![0; servers],
            worker_attempts: vec![0; workers],
            live: 0,
            rates: vec![None; workers],
            max_step: 0,
            logs,
            state,
            metrics,
            state_saved: None,
            state_unwritable: false,
            first_progress: None,
            line_step: None,
            outcome: JobOutcome {
                servers: Vec::with_capacity(servers),
                metrics: Vec::with_capacity(servers),
                restarts: vec![0; workers],
                server_restarts: 0,
                progress: Vec::new(),
                evals: Vec::new(),
                done: Vec::new(),
                wall_time: Duration::ZERO,
            },
        };
        let result = tokio::select! {
            result = run.start_and_train() => result,
            () = cancel => Err(LaunchError::Process("interrupted: stopped every process of the job".into())),
        };
        let stopped = run.stop_all(result.is_err()).await;
        let _ = std::fs::remove_file(RunningJob::path(&run.job));
        match result.as_ref().err().or(stopped.as_ref().err()) {
            None => {
                run.state.state = JobState::Succeeded;
                run.state.message =
                    Some(format!("every worker finished in {:.1}s", started.elapsed().as_secs_f64()));
            }
            Some(e) => {
                run.state.state = JobState::Failed;
                run.state.message = Some(e.to_string());
            }
        }
        run.save_state(true);
        run.console.finish();
        result?;
        stopped?;
        run.outcome.wall_time = started.elapsed();
        Ok(run.outcome)
    }
}

/// Where a running local job's servers are: written by the launcher to
/// `<output dir>/servers.json` once every server listens (again after a restart), and removed
/// when the job ends, so that `gradflow checkpoint now JOB.toml` can find them.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct RunningJob {
    pub job: String,
    /// The run's id (`GRADFLOW_RUN_ID`).
    #[serde(default)]
    pub run_id: Option<String>,
    /// The launcher's process id.
    pub launcher_pid: u32,
    /// Server addresses in shard order.
    pub servers: Vec<String>,
    /// The job's token (the file is readable by its owner only).
    #[serde(default)]
    pub token: Option<String>,
}

impl RunningJob {
    pub fn path(job: &JobConfig) -> PathBuf {
        job.output_dir().join("servers.json")
    }

    /// The running job's record; the error says that the job does not seem to run. A record
    /// whose launcher is gone (killed, so it could not remove it) is removed, and the error
    /// says so: the launcher's process is gone, or it no longer holds the output folder's
    /// lease (its pid now names another process).
    pub fn read(job: &JobConfig) -> Result<RunningJob, LaunchError> {
        let path = RunningJob::path(job);
        let text = std::fs::read_to_string(&path).map_err(|e| {
            LaunchError::JobFailed(format!(
                "job {} is not running on this machine ({}: {e}); pass the server addresses instead",
                job.name,
                path.display()
            ))
        })?;
        let record: RunningJob = serde_json::from_str(&text).map_err(|e| {
            LaunchError::JobFailed(format!("{}: not a running job's record: {e}", path.display()))
        })?;
        // SAFETY: kill with signal 0 only checks that the process exists.
        let alive = unsafe { libc::kill(record.launcher_pid as libc::pid_t, 0) } == 0
            || io::Error::last_os_error().raw_os_error() == Some(libc::EPERM);
        // A record written by a launcher that holds the folder's lease is stale once the lease
        // is free; records of launchers that take no lease (the library used alone) have only
        // their pid to go by.
        let released = gradflow_checkpoint::lease::Lease::is_held_dir(&job.output_dir())
            .is_ok_and(|held| !held)
            && job.output_dir().join(gradflow_checkpoint::lease::LEASE).exists();
        if !alive || released {
            let removed = match std::fs::remove_file(&path) {
                Ok(()) => "removed it".to_string(),
                Err(e) => format!("could not remove it: {e}"),
            };
            return Err(LaunchError::JobFailed(format!(
                "job {} is not running on this machine: its launcher (pid {}) is gone and left {} behind ({removed})",
                job.name,
                record.launcher_pid,
                path.display()
            )));
        }
        Ok(record)
    }

    fn write(&self, job: &JobConfig) -> io::Result<()> {
        let path = RunningJob::path(job);
        std::fs::create_dir_all(job.output_dir())?;
        let tmp = path.with_extension("json.tmp");
        let _ = std::fs::remove_file(&tmp);
        let mut file = std::fs::OpenOptions::new();
        file.write(true).create_new(true);
        #[cfg(unix)]
        std::os::unix::fs::OpenOptionsExt::mode(&mut file, 0o600);
        file.open(&tmp)?.write_all(&serde_json::to_vec_pretty(self).expect("a record always serializes"))?;
        std::fs::rename(tmp, path)
    }
}

/// Processes per CPU that a local job may start without `launcher.allow_oversubscribe`.
///
/// Every server and worker runs a tokio runtime and trains or applies updates on its own
/// threads; past a few processes per CPU they mostly wait for a CPU, heartbeats come late
/// (`server.heartbeat_timeout`, 5 s), and sync steps wait for the slowest. 4 per CPU leaves
/// room for jobs that wait on I/O and still refuses the thousands of processes a typo in
/// `workers` starts.
pub const MAX_PROCESSES_PER_CPU: usize = 4;

/// Refuses a job of more local processes (servers + workers) than [`MAX_PROCESSES_PER_CPU`]
/// per CPU of this machine, unless `launcher.allow_oversubscribe` is set.
pub fn check_process_count(job: &JobConfig) -> Result<(), LaunchError> {
    let cpus = std::thread::available_parallelism().map_or(1, |n| n.get());
    let processes = job.servers as usize + job.workers as usize;
    let limit = cpus * MAX_PROCESSES_PER_CPU;
    if processes <= limit || job.launcher.allow_oversubscribe {
        return Ok(());
    }
    Err(LaunchError::TooManyProcesses(format!(
        "{processes} processes asked for ({} server(s) + {} worker(s)), but this machine has {cpus} CPU(s) and \
         runs at most {limit} ({MAX_PROCESSES_PER_CPU} per CPU) well; lower `servers`/`workers`, or pass \
         --allow-oversubscribe (or set launcher.allow_oversubscribe = true) to start them anyway",
        job.servers, job.workers
    )))
}

/// Completes on the first SIGINT (Ctrl-C), SIGTERM or SIGHUP sent to this process: the
/// `cancel` argument of [`LocalLauncher::run`] in the `gradflow` binary.
///
/// The handlers are installed by this call, not when the future is first polled, so call
/// it before starting the job: a signal that arrives in between is not lost, and does not
/// kill the launcher outright. Must be called inside a tokio runtime.
pub fn shutdown_signal() -> Result<impl Future<Output = ()> + Send + 'static, LaunchError> {
    use tokio::signal::unix::{SignalKind, signal};
    let install = |kind: SignalKind| {
        signal(kind)
            .map_err(|source| LaunchError::Io { context: "installing a signal handler".into(), source })
    };
    let (mut int, mut term, mut hup) = (
        install(SignalKind::interrupt())?,
        install(SignalKind::terminate())?,
        install(SignalKind::hangup())?,
    );
    Ok(async move {
        tokio::select! {
            _ = int.recv() => {}
            _ = term.recv() => {}
            _ = hup.recv() => {}
        }
    })
}

/// Where the launcher writes: children's log lines, progress, evaluations and its own
/// messages, always one whole line at a time.
pub struct Console {
    sink: Sink,
    progress_every: Duration,
    last_progress: Option<Instant>,
    /// Where every line also goes: the run's `launch.log`.
    copy: Option<std::fs::File>,
}

enum Sink {
    /// A terminal: a spinner with the progress, log lines printed above it.
    Bar(ProgressBar),
    /// Anything else: progress as plain lines, at most one per `progress_every`.
    Lines(Box<dyn Write + Send>),
}

impl Console {
    /// Standard error: a live spinner with the progress when it is a terminal, plain lines
    /// (progress at most every 5 s) otherwise.
    pub fn stderr() -> Console {
        if !io::stderr().is_terminal() {
            return Console::lines(io::stderr());
        }
        let bar = ProgressBar::new_spinner();
        bar.set_style(
            ProgressStyle::with_template("{spinner} {elapsed_precise} {msg}").expect("valid template"),
        );
        bar.set_message("starting");
        bar.enable_steady_tick(Duration::from_millis(120));
        Console { sink: Sink::Bar(bar), progress_every: Duration::ZERO, last_progress: None, copy: None }
    }

    /// Plain lines to `out`: a progress line every `train.log_every_steps` steps.
    pub fn lines(out: impl Write + Send + 'static) -> Console {
        Console {
            sink: Sink::Lines(Box::new(out)),
            progress_every: Duration::ZERO,
            last_progress: None,
            copy: None,
        }
    }

    /// The shortest time between two plain progress lines, on top of one per
    /// `train.log_every_steps` steps (no effect on a terminal, where the progress line is
    /// updated in place). Default: none.
    pub fn progress_every(mut self, every: Duration) -> Console {
        self.progress_every = every;
        self
    }

    fn line(&mut self, text: &str) {
        if let Some(copy) = &mut self.copy {
            let _ = copy.write_all(format!("{text}\n").as_bytes());
        }
        match &mut self.sink {
            Sink::Bar(bar) => bar.println(text),
            Sink::Lines(out) => {
                // One write per line, so that lines from another writer of the same file
                // (the launcher's own tracing, say) land between lines, not inside them.
                let mut bytes = Vec::with_capacity(text.len() + 1);
                bytes.extend_from_slice(text.as_bytes());
                bytes.push(b'\n');
                let _ = out.write_all(&bytes);
                let _ = out.flush();
            }
        }
    }

    fn note(&mut self, text: &str) {
        self.line(&format!("[launch] {text}"));
    }

    fn status(&mut self, text: &str) {
        if let Sink::Bar(bar) = &self.sink {
            bar.set_message(text.to_string());
        }
    }

    /// Shows `text`: in place on a terminal; as a line when `line` is true (a new
    /// `log_every_steps` interval) and `progress_every` has passed.
    fn progress(&mut self, text: String, line: bool) {
        match &self.sink {
            Sink::Bar(bar) => bar.set_message(text),
            Sink::Lines(_) => {
                if line && self.last_progress.is_none_or(|last| last.elapsed() >= self.progress_every) {
                    self.last_progress = Some(Instant::now());
                    self.line(&text);
                }
            }
        }
    }

    fn finish(&mut self) {
        if let Sink::Bar(bar) = &self.sink {
            bar.finish_and_clear();
        }
    }
}

/// A process of the job, named like `ps-0` or `worker-3` in logs and errors.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Proc {
    role: Role,
    index: u32,
}

impl std::fmt::Display for Proc {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}-{}", self.role.as_str(), self.index)
    }
}

/// What the tasks watching the children tell the run.
enum Msg {
    Log(Proc, String),
    Event(Proc, Event),
    Note(String),
    /// Sent once per child, after its output has been read to the end.
    Exited(Proc, io::Result<ExitStatus>),
}

/// A message that moves the job along; [`Run::next`] handles all others itself.
enum Step {
    Listening { shard: u32, addr: String, metrics: Option<String> },
    Exited(Proc, io::Result<ExitStatus>),
}

/// One run of a job.
struct Run {
    job: JobConfig,
    run_id: String,
    started: Instant,
    /// The job's token, for the running job's record.
    token: Option<String>,
    program: PathBuf,
    env: Vec<(OsString, OsString)>,
    console: Console,
    startup_timeout: Duration,
    grace: Duration,
    spawner: Spawner,
    /// Kept so that `rx` never closes, and cloned into every child's watcher.
    tx: mpsc::Sender<Msg>,
    rx: mpsc::Receiver<Msg>,
    /// Tells every child's watcher to stop its child.
    stop: CancellationToken,
    /// Tells the watchers of this generation's children to SIGKILL them at once.
    kill: CancellationToken,
    /// The next start's `GRADFLOW_ATTEMPT` of each shard and worker.
    ps_attempts: Vec<u32>,
    worker_attempts: Vec<u32>,
    /// Children started whose `Exited` has not arrived yet.
    live: usize,
    /// Each running worker's latest samples/s.
    rates: Vec<Option<f64>>,
    max_step: u64,
    /// This run's log folder.
    logs: PathBuf,
    /// The record `gradflow status` reads, and when it was last written.
    state: LocalState,
    /// The launcher's `/metrics`, set from `state`.
    metrics: crate::metrics::LauncherMetrics,
    state_saved: Option<Instant>,
    /// The last write of the record failed (and was said).
    state_unwritable: bool,
    /// The first progress report (when, at which step): the rate the ETA is taken from.
    first_progress: Option<(Instant, u64)>,
    /// The step of the last plain progress line.
    line_step: Option<u64>,
    outcome: JobOutcome,
}

impl Run {
    /// Says `text` on the console and records it as the job's last event.
    fn note(&mut self, text: &str) {
        self.console.note(text);
        self.state.last_event = Some(text.to_string());
        self.save_state(true);
    }

    /// Writes the state record: now if `now`, else at most once a second (progress).
    fn save_state(&mut self, now: bool) {
        self.metrics.observe(&self.state);
        if !now && self.state_saved.is_some_and(|t| t.elapsed() < Duration::from_secs(1)) {
            return;
        }
        self.state_saved = Some(Instant::now());
        match self.state.save(&self.job.state_path()) {
            Ok(()) => self.state_unwritable = false,
            // Said once: `gradflow status` will show the record as it last was.
            Err(e) if !self.state_unwritable => {
                self.state_unwritable = true;
                self.console.note(&format!("warning: cannot write {}: {e}", self.job.state_path().display()));
            }
            Err(_) => {}
        }
    }

    /// Records that `proc` is in `phase` (and why, for a failure).
    fn set_phase(&mut self, proc: Proc, phase: &str, problem: Option<String>) {
        if let Some(p) = self.state.process_mut(&proc.to_string()) {
            p.phase = phase.into();
            p.problem = problem;
            if phase != "Running" {
                p.pid = None;
            }
        }
        self.save_state(true);
    }

    /// The progress line: epoch, step of the total with its percentage, samples/s, loss and
    /// the time left at the rate since the first report.
    fn progress_text(&self, epoch: u64, total_rate: f64, loss: f64) -> String {
        let (step, epochs) = (self.max_step, self.job.train.epochs);
        let mut text = format!("epoch {epoch}/{epochs}  step {step}");
        if let Some(total) = self.state.total_steps.filter(|&t| t > 0) {
            let done = step.min(total);
            text.push_str(&format!("/{total} ({:.0}%)", done as f64 * 100.0 / total as f64));
        }
        text.push_str(&format!("  samples/s {total_rate:.0}  loss {loss:.4}"));
        if let (Some(total), Some((t0, s0))) = (self.state.total_steps, self.first_progress)
            && step > s0
        {
            let per_step = t0.elapsed().as_secs_f64() / (step - s0) as f64;
            let left = (total.saturating_sub(step) as f64 * per_step).round() as u64;
            text.push_str(&format!("  ETA {}:{:02}:{:02}", left / 3600, left / 60 % 60, left % 60));
        }
        text
    }

    /// Everything from the first server to the last worker's exit. Dropping this future
    /// halfway (cancellation) leaves no state behind that `stop_all` cannot handle: every
    /// await is on the message channel, a timer, or a spawn.
    async fn start_and_train(&mut self) -> Result<(), LaunchError> {
        loop {
            match self.generation().await? {
                None => return Ok(()),
                Some((proc, status)) => self.restart_from_checkpoint(proc, status).await?,
            }
        }
    }

    /// One start of every server and worker. `Some` names a server that exited while the
    /// workers still needed it; `None` means every worker finished.
    async fn generation(&mut self) -> Result<Option<(Proc, io::Result<ExitStatus>)>, LaunchError> {
        let (num_servers, num_workers) = (self.job.servers, self.job.workers);
        self.note(&format!(
            "job {} (run {}): starting {num_servers} server(s), then {num_workers} worker(s)",
            self.job.name, self.run_id
        ));
        if let Some(m) = self.state.metrics.clone() {
            self.note(&format!("launcher metrics at http://{m}/metrics"));
        }
        self.console.status("starting servers");
        for shard in 0..num_servers {
            let attempt = self.ps_attempts[shard as usize];
            self.spawn(Proc { role: Role::Ps, index: shard }, attempt, Vec::new()).await?;
        }

        let deadline = tokio::time::Instant::now() + self.startup_timeout;
        let mut listening: Vec<Option<(String, Option<String>)>> = vec![None; num_servers as usize];
        while listening.iter().any(Option::is_none) {
            let Ok(step) = tokio::time::timeout_at(deadline, self.next()).await else {
                let silent: Vec<String> = (0..num_servers)
                    .filter(|&s| listening[s as usize].is_none())
                    .map(|s| Proc { role: Role::Ps, index: s }.to_string())
                    .collect();
                return Err(LaunchError::JobFailed(format!(
                    "{} did not report a listening address within {:?}",
                    silent.join(", "),
                    self.startup_timeout
                )));
            };
            match step {
                Step::Listening { shard, addr, metrics } => {
                    let at = match &metrics {
                        Some(m) => format!(", metrics at http://{m}/metrics"),
                        None => String::new(),
                    };
                    self.note(&format!("ps-{shard} listening on {addr}{at}"));
                    listening[shard as usize] = Some((addr, metrics));
                }
                Step::Exited(proc, status) => {
                    return Err(LaunchError::JobFailed(format!(
                        "{proc} exited ({}) before it was listening",
                        describe(&status)
                    )));
                }
            }
        }
        self.outcome.servers.clear();
        self.outcome.metrics.clear();
        for (addr, metrics) in listening.into_iter().flatten() {
            self.outcome.servers.push(addr);
            self.outcome.metrics.push(metrics);
        }

        let servers = self.outcome.servers.clone();
        let record = RunningJob {
            job: self.job.name.clone(),
            run_id: Some(self.run_id.clone()),
            launcher_pid: std::process::id(),
            servers: servers.clone(),
            token: self.token.clone(),
        };
        if let Err(e) = record.write(&self.job) {
            self.note(&format!(
                "warning: cannot write {} ({e}); `gradflow checkpoint now` will need the server addresses",
                RunningJob::path(&self.job).display()
            ));
        }
        self.console.status("starting workers");
        for w in 0..num_workers {
            let attempt = self.worker_attempts[w as usize];
            self.spawn(Proc { role: Role::Worker, index: w }, attempt, servers.clone()).await?;
        }
        self.state.state = JobState::Running;
        self.save_state(true);
        let max_restarts = self.job.launcher.max_restarts;
        let mut running = num_workers;
        while running > 0 {
            match self.next().await {
                // A server has nothing new to say by listening twice.
                Step::Listening { .. } => {}
                Step::Exited(proc, status) if proc.role == Role::Ps => return Ok(Some((proc, status))),
                Step::Exited(_, Ok(status)) if status.success() => running -= 1,
                Step::Exited(proc, Ok(status)) if status.code() == Some(EXIT_NO_RESTART) => {
                    return Err(LaunchError::JobFailed(format!(
                        "{proc} stopped with an error that a restart would repeat ({status}; its message is above); not restarting it"
                    )));
                }
                Step::Exited(proc, status) => {
                    let restarts = &mut self.outcome.restarts[proc.index as usize];
                    if *restarts >= max_restarts {
                        return Err(LaunchError::JobFailed(format!(
                            "{proc} failed ({}) after {restarts} restart(s); launcher.max_restarts = {max_restarts}",
                            describe(&status)
                        )));
                    }
                    *restarts += 1;
                    let count = *restarts;
                    self.worker_attempts[proc.index as usize] += 1;
                    let attempt = self.worker_attempts[proc.index as usize];
                    self.state.state = JobState::Restarting;
                    if let Some(p) = self.state.process_mut(&proc.to_string()) {
                        p.restarts = count;
                    }
                    self.note(&format!(
                        "warning: {proc} failed ({}); restarting it ({} of {max_restarts} restarts)",
                        describe(&status),
                        count
                    ));
                    self.spawn(proc, attempt, servers.clone()).await?;
                }
            }
        }
        self.note(&format!("all {num_workers} worker(s) finished; stopping the servers"));
        Ok(None)
    }

    /// After server `proc` died mid-job: kills every process of the job and points the next
    /// start at the latest complete checkpoint. Every shard must restore the same step, and
    /// the workers must skip exactly the batches that step holds, so everything restarts:
    /// restarting only the dead shard would mix model versions across shards.
    async fn restart_from_checkpoint(
        &mut self,
        proc: Proc,
        status: io::Result<ExitStatus>,
    ) -> Result<(), LaunchError> {
        let Some(checkpoint) = self.job.checkpoint.clone() else {
            return Err(LaunchError::JobFailed(format!(
                "{proc} exited ({}) before the workers finished; with a [checkpoint] section the launcher restarts the job from its latest checkpoint instead",
                describe(&status)
            )));
        };
        let max_restarts = self.job.launcher.max_restarts;
        if self.outcome.server_restarts >= max_restarts {
            return Err(LaunchError::JobFailed(format!(
                "{proc} exited ({}) after the job was restarted {} time(s); launcher.max_restarts = {max_restarts}",
                describe(&status),
                self.outcome.server_restarts
            )));
        }
        self.outcome.server_restarts += 1;
        self.state.job_restarts = self.outcome.server_restarts;
        self.state.state = JobState::Restarting;
        self.note(&format!(
            "warning: {proc} exited ({}); restarting every process of the job from the latest checkpoint ({} of {max_restarts} restarts)",
            describe(&status),
            self.outcome.server_restarts
        ));
        // Its addresses are about to be stale.
        let _ = std::fs::remove_file(RunningJob::path(&self.job));
        // SIGKILL, not SIGTERM: the surviving servers would otherwise write a last
        // checkpoint that can never be complete without the dead shard, and wait for it.
        self.kill.cancel();
        while self.live > 0 {
            self.next().await;
        }
        self.kill = CancellationToken::new();

        match crate::prepare::latest_step(&checkpoint.url).await? {
            Some(step) => {
                self.note(&format!("restoring checkpoint step {step} from {}", checkpoint.url));
                self.job.restore = Some(Restore::Step(step));
                self.max_step = step;
            }
            None => {
                let from = match &self.job.restore {
                    Some(r) => format!("restore = \"{r}\" again"),
                    None => "the beginning".to_string(),
                };
                self.note(&format!("no checkpoint was written yet; starting from {from}"));
                self.max_step = 0;
            }
        }
        for a in self.ps_attempts.iter_mut().chain(self.worker_attempts.iter_mut()) {
            *a += 1;
        }
        self.rates.iter_mut().for_each(|r| *r = None);
        Ok(())
    }

    /// Stops every child that is still running and waits until all have been reaped. After a
    /// job that succeeded, a server that exits non-zero or must be killed makes it fail: its
    /// shutdown checkpoint, or an earlier one it was still writing, may be lost.
    async fn stop_all(&mut self, failed: bool) -> Result<(), LaunchError> {
        let mut servers_failed = Vec::new();
        if failed && self.live > 0 {
            self.note(&format!(
                "stopping {} process(es) (SIGTERM, SIGKILL after {:?})",
                self.live, self.grace
            ));
        }
        self.console.status("stopping");
        self.stop.cancel();
        while self.live > 0 {
            if let Step::Exited(proc, status) = self.next().await
                && !failed
                && proc.role == Role::Ps
                && !status.as_ref().is_ok_and(ExitStatus::success)
            {
                servers_failed.push(format!("{proc} ({})", describe(&status)));
            }
        }
        if servers_failed.is_empty() {
            return Ok(());
        }
        Err(LaunchError::JobFailed(format!(
            "every worker finished, but {} did not stop cleanly: a checkpoint may not have been written (see the server's log above)",
            servers_failed.join(", ")
        )))
    }

    /// Waits for the next message that moves the job along; prints log lines and notes,
    /// and tallies progress, evaluations and completions on the way.
    async fn next(&mut self) -> Step {
        loop {
            // `self.tx` keeps the channel open, so `None` cannot happen.
            let Some(msg) = self.rx.recv().await else { unreachable!("the run holds a sender") };
            match msg {
                Msg::Log(proc, line) => self.console.line(&format!("[{proc}] {line}")),
                Msg::Note(text) => self.note(&text),
                Msg::Event(proc, event) => match event {
                    Event::Listening { addr, metrics } if proc.role == Role::Ps => {
                        if let Some(p) = self.state.process_mut(&proc.to_string()) {
                            p.metrics.clone_from(&metrics);
                        }
                        return Step::Listening { shard: proc.index, addr, metrics };
                    }
                    Event::Listening { metrics, .. } => {
                        if let Some(m) = &metrics {
                            self.note(&format!("{proc} metrics at http://{m}/metrics"));
                        }
                        if let Some(p) = self.state.process_mut(&proc.to_string()) {
                            p.metrics = metrics;
                        }
                    }
                    Event::Progress { step, loss, samples_per_sec, epoch, .. } => {
                        // Index by the process, not the event's `worker`: the launcher knows
                        // who is talking, and a bad field must not panic it.
                        if let Some(rate) = self.rates.get_mut(proc.index as usize) {
                            *rate = Some(samples_per_sec);
                        }
                        self.max_step = self.max_step.max(step);
                        let total: f64 = self.rates.iter().flatten().sum();
                        self.first_progress.get_or_insert((Instant::now(), self.max_step));
                        // Workers report every `log_every_steps` of their steps; in sync mode
                        // all of them at the same steps, which is one line.
                        let line = self.line_step.is_none_or(|last| self.max_step > last);
                        if line {
                            self.line_step = Some(self.max_step);
                        }
                        let text = self.progress_text(epoch + 1, total, loss);
                        self.console.progress(text, line);
                        let state = &mut self.state;
                        (state.step, state.epoch, state.samples_per_sec, state.loss) =
                            (self.max_step, epoch + 1, total, Some(loss));
                        if state.state == JobState::Restarting {
                            state.state = JobState::Running;
                        }
                        self.save_state(false);
                        self.outcome.progress.push(JobProgress {
                            elapsed: self.started.elapsed(),
                            step: self.max_step,
                            samples_per_sec: total,
                        });
                    }
                    Event::Eval { epoch, test_loss, test_auc, test_accuracy, test_examples, .. } => {
                        let text = format!(
                            "epoch {epoch} test AUC {test_auc:.4} loss {test_loss:.4} accuracy {test_accuracy:.4} ({test_examples} examples)"
                        );
                        self.console.line(&text);
                        self.state.last_event = Some(text);
                        self.save_state(true);
                        self.outcome.evals.push(event);
                    }
                    Event::Done { step, .. } => {
                        // The last step, which no progress report may have shown.
                        self.max_step = self.max_step.max(step);
                        self.state.step = self.max_step;
                        self.save_state(true);
                        self.outcome.done.push(event);
                    }
                },
                Msg::Exited(proc, status) => {
                    self.live -= 1;
                    match &status {
                        Ok(s) if s.success() => self.set_phase(proc, "Succeeded", None),
                        _ => self.set_phase(proc, "Failed", Some(describe(&status))),
                    }
                    if proc.role == Role::Worker
                        && let Some(rate) = self.rates.get_mut(proc.index as usize)
                    {
                        *rate = None;
                    }
                    return Step::Exited(proc, status);
                }
            }
        }
    }

    /// Starts one child and the task that watches it.
    async fn spawn(&mut self, proc: Proc, attempt: u32, servers: Vec<String>) -> Result<(), LaunchError> {
        let job = &self.job;
        let is_ps = proc.role == Role::Ps;
        let spec = ClusterSpec {
            version: CLUSTER_SPEC_VERSION,
            job: job.name.clone(),
            attempt,
            role: proc.role,
            index: proc.index,
            servers,
            num_workers: job.workers,
            listen: is_ps.then(|| LOCAL_ANY_PORT.to_string()),
            // Shards take the first metrics ports, workers the ones after them.
            metrics_listen: job.metrics_listen(if is_ps { proc.index } else { job.servers + proc.index }),
            job_config: job.clone(),
        };
        // A worker runs the job's own trainer when it names one.
        let (program, args) = match (&job.worker.command, proc.role) {
            (Some(command), Role::Worker) => (PathBuf::from(&command[0]), command[1..].to_vec()),
            _ => (self.program.clone(), vec![proc.role.as_str().to_string()]),
        };
        let mut cmd = Command::new(&program);
        cmd.args(&args)
            .envs(spec.to_env())
            .env(ENV_LOG, &job.output.log)
            .envs(self.env.iter().map(|(k, v)| (k, v)))
            // A child in a background process group that read the terminal would be stopped.
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .kill_on_drop(true)
            .process_group(0);
        die_with_launcher(&mut cmd);
        let child = self.spawner.spawn(cmd).await.map_err(|source| LaunchError::Io {
            context: format!("starting {proc} ({} {})", program.display(), args.join(" ")),
            source,
        })?;
        self.live += 1;
        let log_path = self.logs.join(format!("{proc}-{attempt}.log"));
        let log = match std::fs::File::create(&log_path) {
            Ok(f) => Some(f),
            Err(e) => {
                self.console
                    .note(&format!("warning: {proc}'s output is not kept ({}: {e})", log_path.display()));
                None
            }
        };
        if let Some(p) = self.state.process_mut(&proc.to_string()) {
            (p.attempt, p.phase, p.pid, p.problem) = (attempt, "Running".into(), child.id(), None);
        }
        self.save_state(true);
        tokio::spawn(watch(
            proc,
            child,
            log,
            self.stop.clone(),
            self.kill.clone(),
            self.grace,
            self.tx.clone(),
        ));
        Ok(())
    }
}

/// Forwards a child's output, stops it when told to, and reports its exit.
async fn watch(
    proc: Proc,
    mut child: Child,
    log: Option<std::fs::File>,
    stop: CancellationToken,
    kill: CancellationToken,
    grace: Duration,
    tx: mpsc::Sender<Msg>,
) {
    let copy = || log.as_ref().and_then(|f| f.try_clone().ok());
    let readers = [
        child.stdout.take().map(|out| tokio::spawn(forward_lines(proc, out, true, copy(), tx.clone()))),
        child.stderr.take().map(|err| tokio::spawn(forward_lines(proc, err, false, copy(), tx.clone()))),
    ];
    let status = tokio::select! {
        status = child.wait() => status,
        () = kill.cancelled() => {
            signal_group(&child, libc::SIGKILL);
            child.wait().await
        }
        () = stop.cancelled() => {
            signal_group(&child, libc::SIGTERM);
            match tokio::time::timeout(grace, child.wait()).await {
                Ok(status) => status,
                Err(_) => {
                    let _ = tx.send(Msg::Note(format!("{proc} did not exit within {grace:?} of SIGTERM; killing it"))).await;
                    signal_group(&child, libc::SIGKILL);
                    child.wait().await
                }
            }
        }
    };
    let deadline = tokio::time::Instant::now() + DRAIN_TIMEOUT;
    for reader in readers.into_iter().flatten() {
        let abort = reader.abort_handle();
        if tokio::time::timeout_at(deadline, reader).await.is_err() {
            abort.abort();
        }
    }
    let _ = tx.send(Msg::Exited(proc, status)).await;
}

/// Sends each whole line of `pipe` to the run, on standard output event lines as events, and
/// appends every line to the process's log file, one write per line.
async fn forward_lines(
    proc: Proc,
    pipe: impl AsyncRead + Unpin,
    events: bool,
    mut log: Option<std::fs::File>,
    tx: mpsc::Sender<Msg>,
) {
    let mut reader = BufReader::new(pipe);
    let mut buf = Vec::new();
    loop {
        buf.clear();
        match reader.read_until(b'\n', &mut buf).await {
            Ok(0) | Err(_) => return,
            Ok(_) => {}
        }
        // Lossy: a stray non-UTF-8 byte must not cost the rest of the log.
        if let Some(file) = &mut log {
            if !buf.ends_with(b"\n") {
                buf.push(b'\n');
            }
            // A short append to a local file; a full disk costs the log, not the job.
            if file.write_all(&buf).is_err() {
                log = None;
            }
        }
        let text = String::from_utf8_lossy(&buf);
        let line = text.trim_end_matches(['\n', '\r']);
        let msg = match events.then(|| Event::parse(line)).flatten() {
            Some(event) => Msg::Event(proc, event),
            None => Msg::Log(proc, line.to_string()),
        };
        if tx.send(msg).await.is_err() {
            return;
        }
    }
}

/// Sends `signal` to the child's process group (the child leads it), or to the child alone
/// if it left its group.
fn signal_group(child: &Child, signal: libc::c_int) {
    // `id()` is `None` once the child is reaped; its pid may then name another process.
    let Some(pid) = child.id() else { return };
    let pid = pid as libc::pid_t;
    // SAFETY: kill has no memory-safety preconditions.
    unsafe {
        if libc::kill(-pid, signal) != 0 {
            libc::kill(pid, signal);
        }
    }
}

/// Makes the kernel SIGKILL the child when the thread that forks it exits (see the module
/// documentation for why that thread lives as long as the children).
#[cfg(target_os = "linux")]
fn die_with_launcher(cmd: &mut Command) {
    let launcher = std::process::id() as libc::pid_t;
    // SAFETY: the closure runs in the child between fork and exec and only makes
    // async-signal-safe system calls; it allocates nothing.
    unsafe {
        cmd.pre_exec(move || {
            if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL as libc::c_ulong, 0, 0, 0) != 0 {
                return Err(io::Error::last_os_error());
            }
            // Had the launcher died between fork and prctl, no signal would ever come.
            if libc::getppid() != launcher {
                return Err(io::Error::from_raw_os_error(libc::ESRCH));
            }
            Ok(())
        });
    }
}

#[cfg(not(target_os = "linux"))]
fn die_with_launcher(_: &mut Command) {}

/// Forks every child from one thread that outlives them: `PR_SET_PDEATHSIG` fires when the
/// forking thread exits. The thread ends when the `Spawner` is dropped, which `run` does
/// only after reaping every child.
struct Spawner {
    requests: std::sync::mpsc::Sender<(Command, oneshot::Sender<io::Result<Child>>)>,
}

impl Spawner {
    fn start() -> io::Result<Spawner> {
        // tokio's `Command::spawn` registers the child with the runtime's SIGCHLD handling,
        // so the thread enters the caller's runtime.
        let runtime = tokio::runtime::Handle::current();
        let (requests, incoming) = std::sync::mpsc::channel::<(Command, oneshot::Sender<_>)>();
        std::thread::Builder::new().name("gradflow-spawner".into()).spawn(move || {
            let _entered = runtime.enter();
            for (mut cmd, reply) in incoming {
                // If nobody waits for the child any more, dropping it kills it (kill_on_drop).
                let _ = reply.send(cmd.spawn());
            }
        })?;
        Ok(Spawner { requests })
    }

    async fn spawn(&self, cmd: Command) -> io::Result<Child> {
        let (reply, child) = oneshot::channel();
        let gone = || io::Error::other("the process-spawning thread is gone");
        self.requests.send((cmd, reply)).map_err(|_| gone())?;
        child.await.map_err(|_| gone())?
    }
}

/// `exit status: 1`, `signal: 9 (SIGKILL)`, or why the status is unknown.
fn describe(status: &io::Result<ExitStatus>) -> String {
    match status {
        Ok(status) => status.to_string(),
        Err(e) => format!("exit status unknown: {e}"),
    }
}
