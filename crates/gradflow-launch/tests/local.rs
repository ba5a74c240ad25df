//! The local backend with real child processes: `tests/fixtures/fake-gradflow` plays the
//! `gradflow` binary and behaves as `FAKE_MODE` says; every process writes its PID to a
//! directory, so that the tests can check that nothing is left running afterwards.

use std::io::Write;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use std::os::unix::process::CommandExt;

use gradflow_job::{Event, JobConfig};
use gradflow_launch::LaunchError;
use gradflow_launch::local::{Console, JobOutcome, LocalLauncher, shutdown_signal};

const FAKE: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures/fake-gradflow");

fn job(servers: u32, workers: u32, max_restarts: u32, grace: Duration) -> JobConfig {
    let mut job = JobConfig::parse(
        "name = \"fake\"\n[model]\nkind = \"logistic_regression\"\n[data]\ntrain = \"x\"\nformat = \"libsvm\"\n",
    )
    .unwrap();
    job.servers = servers;
    job.workers = workers;
    job.launcher.max_restarts = max_restarts;
    job.launcher.grace_period = grace;
    job.output.metrics = false;
    job.output.log = "debug".into();
    job.output.dir = Some(output_dir());
    job
}

/// A fresh output folder for one job, under cargo's folder for tests' files: the state
/// record, log files and servers record of one test never meet another's.
fn output_dir() -> std::path::PathBuf {
    static NEXT: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
    let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let dir = Path::new(env!("CARGO_TARGET_TMPDIR")).join(format!("local-{}-{n}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    dir
}

/// The launcher's output, shared with the test.
#[derive(Clone, Default)]
struct Capture(Arc<Mutex<Vec<u8>>>);

impl Write for Capture {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl Capture {
    fn text(&self) -> String {
        String::from_utf8(self.0.lock().unwrap().clone()).unwrap()
    }
}

/// One launch of the fake: its output and PID directory.
struct Fake {
    out: Capture,
    pids: tempfile::TempDir,
}

impl Fake {
    fn new() -> Fake {
        Fake { out: Capture::default(), pids: tempfile::tempdir().unwrap() }
    }

    fn launcher(&self, job: JobConfig, mode: &str) -> LocalLauncher {
        LocalLauncher::new(job, FAKE)
            .console(Console::lines(self.out.clone()).progress_every(Duration::ZERO))
            .startup_timeout(Duration::from_secs(20))
            .env("FAKE_MODE", mode)
            .env("FAKE_PIDS", self.pids.path())
    }

    async fn run(&self, job: JobConfig, mode: &str) -> Result<JobOutcome, LaunchError> {
        self.launcher(job, mode).run(std::future::pending()).await
    }

    /// Names of the processes that started (`worker-1-0`: worker 1, attempt 0).
    fn started(&self) -> Vec<String> {
        let mut names: Vec<String> = std::fs::read_dir(self.pids.path())
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .filter(|n| !n.ends_with(".tmp"))
            .collect();
        names.sort();
        names
    }

    fn pids(&self) -> Vec<i32> {
        self.started().iter().map(|n| read_pid(&self.pids.path().join(n))).collect()
    }

    /// Every process that started, and anything in its process group, is gone.
    fn assert_nothing_left(&self) {
        let pids = self.pids();
        assert!(!pids.is_empty(), "no process started");
        // Grandchildren (the fake's `sleep`) are reaped by init, which may take a moment.
        let deadline = Instant::now() + Duration::from_secs(3);
        loop {
            let left: Vec<i32> = running()
                .into_iter()
                .filter(|(pid, pgrp)| pids.contains(pid) || pids.contains(pgrp))
                .map(|(pid, _)| pid)
                .collect();
            if left.is_empty() {
                return;
            }
            assert!(Instant::now() < deadline, "still running: {left:?} (started: {:?})", self.started());
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

fn read_pid(path: &Path) -> i32 {
    std::fs::read_to_string(path).unwrap().trim().parse().unwrap()
}

/// `(pid, process group)` of every process on the machine that is not a zombie.
fn running() -> Vec<(i32, i32)> {
    let mut out = Vec::new();
    for entry in std::fs::read_dir("/proc").unwrap().flatten() {
        let Ok(pid) = entry.file_name().to_string_lossy().parse::<i32>() else { continue };
        let Ok(stat) = std::fs::read_to_string(entry.path().join("stat")) else { continue };
        // pid (comm) state ppid pgrp ...; comm may contain spaces and parentheses.
        let Some((_, rest)) = stat.rsplit_once(')') else { continue };
        let fields: Vec<&str> = rest.split_whitespace().collect();
        if fields.first() != Some(&"Z") {
            out.push((pid, fields[2].parse().unwrap()));
        }
    }
    out
}

fn alive(pid: i32) -> bool {
    running().iter().any(|&(p, _)| p == pid)
}

async fn wait_for_files(dir: &Path, names: &[&str]) {
    let deadline = Instant::now() + Duration::from_secs(20);
    while !names.iter().all(|n| dir.join(n).exists()) {
        assert!(Instant::now() < deadline, "processes did not start: {names:?}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

fn count(text: &str, needle: &str) -> usize {
    text.matches(needle).count()
}

#[tokio::test]
async fn two_servers_two_workers_succeed_and_leave_nothing_running() {
    let fake = Fake::new();
    let outcome = fake.run(job(2, 2, 3, Duration::from_secs(5)), "ok").await.unwrap();
    let out = fake.out.text();

    assert_eq!(outcome.servers, ["127.0.0.1:41000", "127.0.0.1:41001"]);
    assert_eq!(outcome.metrics, [None, None]);
    assert_eq!(outcome.restarts, [0, 0]);
    assert_eq!(outcome.evals.len(), 1, "{out}");
    assert!(matches!(outcome.evals[0], Event::Eval { worker: 0, epoch: 1, test_examples: 50000, .. }));
    assert_eq!(outcome.done.len(), 2);
    assert_eq!(fake.started(), ["ps-0-0", "ps-1-0", "worker-0-0", "worker-1-0"]);
    // Every progress report, with the job's rate as the console shows it.
    assert!(!outcome.progress.is_empty(), "{outcome:?}");
    assert_eq!(outcome.progress.last().unwrap().step, 2);
    assert!(outcome.progress.iter().all(|p| p.samples_per_sec > 0.0 && p.elapsed < outcome.wall_time));

    // Log lines from stdout and stderr, prefixed, whole, and the contract's environment.
    assert!(out.contains("[ps-0] shard 0 starting (attempt 0, log filter debug)\n"), "{out}");
    assert!(out.contains("[ps-1] shard 1: a line on stderr\n"), "{out}");
    assert!(out.contains("[worker-1] worker 1 attempt 0 servers=127.0.0.1:41000,127.0.0.1:41001\n"), "{out}");
    assert!(out.contains("[worker-0] worker 0 part one, part two\n"), "{out}");
    assert!(out.contains("[worker-1] worker 1 part one, part two\n"), "{out}");
    // Events are shown, not echoed.
    assert!(!out.contains("@gradflow"), "{out}");
    assert!(
        out.contains("\nepoch 1 test AUC 0.7512 loss 0.4601 accuracy 0.7800 (50000 examples)\n"),
        "{out}"
    );
    // Off a terminal, one line per new step reported (each worker reports every
    // `log_every_steps`); no total: the fake job's data cannot be counted.
    assert_eq!(count(&out, "\nepoch 1/1  step 1  samples/s "), 1, "{out}");
    assert_eq!(count(&out, "\nepoch 1/1  step 2  samples/s "), 1, "{out}");
    assert!(out.contains("loss 0.5000\n"), "{out}");
    for line in out.lines() {
        assert!(
            line.starts_with('[') || line.starts_with("step ") || line.starts_with("epoch "),
            "stray line {line:?} in\n{out}"
        );
    }
    // One fresh token for the whole job: 64 hex characters, the same in every process.
    assert!(out.contains("[ps-0] shard 0 token: 64 characters\n"), "{out}");
    assert!(out.contains("[ps-1] shard 1 token: 64 characters\n"), "{out}");
    let token = |w: usize| {
        let prefix = format!("[worker-{w}] worker {w} token: ");
        out.lines().find_map(|l| l.strip_prefix(prefix.as_str())).unwrap().to_string()
    };
    assert_eq!(token(0).len(), 64, "{out}");
    assert_eq!(token(0), token(1));
    // The servers were stopped once each, cleanly, after the workers.
    assert_eq!(count(&out, "[ps-0] ps 0 got SIGTERM"), 1, "{out}");
    assert_eq!(count(&out, "[ps-1] ps 1 got SIGTERM"), 1, "{out}");
    assert_eq!(count(&out, "got SIGTERM"), 2, "{out}");
    assert!(!out.contains("killing"), "{out}");
    fake.assert_nothing_left();
}

#[tokio::test]
async fn workers_run_the_jobs_own_command_with_the_same_environment() {
    let fake = Fake::new();
    let mut j = job(1, 2, 0, Duration::from_secs(5));
    j.model = None;
    j.worker.command = Some(vec![FAKE.into(), "worker".into(), "--hidden".into(), "32".into()]);
    j.validate().unwrap();
    let outcome = fake.run(j, "ok").await.unwrap();
    let out = fake.out.text();
    assert_eq!(outcome.done.len(), 2, "{out}");
    for w in 0..2 {
        assert!(out.contains(&format!("[worker-{w}] worker {w} arguments: worker --hidden 32\n")), "{out}");
        assert!(
            out.contains(&format!("[worker-{w}] worker {w} attempt 0 servers=127.0.0.1:41000\n")),
            "{out}"
        );
    }
    // The servers are still the launcher's program, with no extra arguments.
    assert!(!out.contains("[ps-0] ps 0 arguments"), "{out}");
    fake.assert_nothing_left();
}

#[tokio::test]
async fn metrics_addresses_are_requested_only_when_enabled() {
    // The fake reports `metrics: null` either way; what matters is that the job runs with
    // metrics on, and the outcome has one entry per shard.
    let fake = Fake::new();
    let mut j = job(1, 1, 0, Duration::from_secs(5));
    j.output.metrics = true;
    let outcome = fake.run(j, "ok").await.unwrap();
    assert_eq!(outcome.metrics, [None]);
    fake.assert_nothing_left();
}

#[tokio::test]
async fn a_worker_that_fails_once_is_restarted_with_the_next_attempt() {
    let fake = Fake::new();
    let outcome = fake.run(job(1, 2, 1, Duration::from_secs(5)), "fail_once").await.unwrap();
    let out = fake.out.text();
    assert_eq!(outcome.restarts, [1, 1], "{out}");
    assert_eq!(fake.started(), ["ps-0-0", "worker-0-0", "worker-0-1", "worker-1-0", "worker-1-1"]);
    assert!(out.contains("[worker-0] worker 0 attempt 1 servers=127.0.0.1:41000\n"), "{out}");
    assert!(
        out.contains("warning: worker-1 failed (exit status: 1); restarting it (1 of 1 restarts)"),
        "{out}"
    );
    fake.assert_nothing_left();
}

#[tokio::test]
async fn a_worker_that_always_fails_fails_the_job_after_max_restarts() {
    let fake = Fake::new();
    let err = fake.run(job(2, 1, 2, Duration::from_secs(5)), "fail_always").await.unwrap_err();
    let msg = err.to_string();
    assert!(matches!(err, LaunchError::JobFailed(_)), "{msg}");
    assert!(msg.contains("worker-0 failed (exit status: 1) after 2 restart(s)"), "{msg}");
    assert_eq!(fake.started(), ["ps-0-0", "ps-1-0", "worker-0-0", "worker-0-1", "worker-0-2"]);
    // The servers were stopped cleanly on the way out.
    assert_eq!(count(&fake.out.text(), "got SIGTERM"), 2, "{}", fake.out.text());
    fake.assert_nothing_left();
}

#[tokio::test]
async fn a_server_that_dies_fails_the_job_and_stops_everything() {
    let fake = Fake::new();
    let err = fake.run(job(2, 2, 3, Duration::from_secs(5)), "ps_dies").await.unwrap_err();
    let msg = err.to_string();
    assert!(matches!(err, LaunchError::JobFailed(_)), "{msg}");
    assert!(msg.contains("ps-1 exited (exit status: 3) before the workers finished"), "{msg}");
    let out = fake.out.text();
    for name in ["ps 0", "worker 0", "worker 1"] {
        assert_eq!(count(&out, &format!("{name} got SIGTERM")), 1, "{name}: {out}");
    }
    fake.assert_nothing_left();
}

#[tokio::test]
async fn a_server_that_dies_before_listening_fails_the_job_before_any_worker_starts() {
    let fake = Fake::new();
    let err = fake.run(job(2, 2, 3, Duration::from_secs(5)), "ps_early").await.unwrap_err();
    let msg = err.to_string();
    assert!(msg.contains("ps-1 exited (exit status: 4) before it was listening"), "{msg}");
    // ps-0 may be stopped before it gets as far as writing its PID.
    let started = fake.started();
    assert!(started.contains(&"ps-1-0".to_string()), "{started:?}");
    assert!(started.iter().all(|n| n.starts_with("ps-")), "{started:?}");
    fake.assert_nothing_left();
}

#[tokio::test]
async fn servers_that_never_listen_time_out() {
    let fake = Fake::new();
    let err = fake
        .launcher(job(2, 1, 3, Duration::from_secs(5)), "ps_silent")
        .startup_timeout(Duration::from_millis(500))
        .run(std::future::pending())
        .await
        .unwrap_err();
    let msg = err.to_string();
    assert!(msg.contains("ps-0, ps-1 did not report a listening address within 500ms"), "{msg}");
    fake.assert_nothing_left();
}

#[tokio::test]
async fn a_program_that_cannot_start_is_an_io_error() {
    let err = LocalLauncher::new(job(1, 1, 0, Duration::from_secs(1)), "/nonexistent/gradflow")
        .console(Console::lines(Capture::default()))
        .run(std::future::pending())
        .await
        .unwrap_err();
    assert!(matches!(&err, LaunchError::Io { context, .. } if context.contains("starting ps-0")), "{err}");
}

#[tokio::test]
async fn cancelling_stops_every_child_cleanly() {
    let fake = Fake::new();
    let dir = fake.pids.path().to_path_buf();
    let started = Instant::now();
    let cancel = async move {
        let names = ["ps-0-0", "worker-0-0", "worker-1-0"];
        wait_for_files(&dir, &names).await;
        // Each child leads its own process group, so a terminal's Ctrl-C (SIGINT to the
        // foreground group) reaches only the launcher, which then stops each child once.
        let procs = running();
        for name in names {
            let pid = read_pid(&dir.join(name));
            let group = procs.iter().find(|&&(p, _)| p == pid).map(|&(_, g)| g);
            assert_eq!(group, Some(pid), "{name} is not the leader of its own process group");
        }
    };
    let err = fake.launcher(job(1, 2, 3, Duration::from_secs(30)), "hang").run(cancel).await.unwrap_err();
    assert!(matches!(err, LaunchError::Process(_)), "{err}");
    assert!(err.to_string().contains("interrupted"), "{err}");
    // Well inside the grace period: everyone left on SIGTERM.
    assert!(started.elapsed() < Duration::from_secs(15), "took {:?}", started.elapsed());
    let out = fake.out.text();
    for name in ["ps 0", "worker 0", "worker 1"] {
        assert_eq!(count(&out, &format!("{name} got SIGTERM")), 1, "{name}: {out}");
    }
    assert!(!out.contains("killing"), "{out}");
    fake.assert_nothing_left();
}

#[tokio::test]
async fn cancelling_kills_children_that_ignore_sigterm_after_the_grace_period() {
    let fake = Fake::new();
    let dir = fake.pids.path().to_path_buf();
    let cancelled = Arc::new(Mutex::new(None));
    let at = cancelled.clone();
    let cancel = async move {
        wait_for_files(&dir, &["ps-0-0", "worker-0-0"]).await;
        *at.lock().unwrap() = Some(Instant::now());
    };
    let grace = Duration::from_millis(700);
    let err = fake.launcher(job(1, 1, 3, grace), "stubborn").run(cancel).await.unwrap_err();
    let took = cancelled.lock().unwrap().unwrap().elapsed();
    assert!(matches!(err, LaunchError::Process(_)), "{err}");
    assert!(took >= grace, "stopped after {took:?}, before the grace period");
    assert!(took < grace + Duration::from_secs(3), "stopped after {took:?}");
    let out = fake.out.text();
    for name in ["ps-0", "worker-0"] {
        assert!(
            out.contains(&format!("[launch] {name} did not exit within 700ms of SIGTERM; killing it")),
            "{out}"
        );
    }
    // Exactly one SIGTERM each, then SIGKILL.
    assert_eq!(count(&out, "ps 0 ignored SIGTERM"), 1, "{out}");
    assert_eq!(count(&out, "worker 0 ignored SIGTERM"), 1, "{out}");
    fake.assert_nothing_left();
}

/// Set to `<mode>:<directory>` for `helper_launcher`: `kill` runs a job of stubborn
/// children until the test kills this process; `ctrl_c` runs a job until SIGINT.
const HELPER_ENV: &str = "GRADFLOW_TEST_HELPER_LAUNCHER";

/// Not a test by itself: the tests below run this test binary with only this test and
/// `HELPER_ENV` set, as a launcher process they can signal and kill.
#[test]
fn helper_launcher() {
    let Ok(arg) = std::env::var(HELPER_ENV) else { return };
    let (mode, dir) = arg.split_once(':').unwrap();
    // A multi-threaded runtime: the children must not care which runtime thread happens to
    // poll the launcher, and die only with the launcher.
    let runtime = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
    let result = runtime.block_on(async {
        let launcher = LocalLauncher::new(job(1, 2, 3, Duration::from_secs(30)), FAKE)
            .console(Console::lines(std::io::stdout()))
            .env("FAKE_PIDS", dir);
        match mode {
            "kill" => launcher.env("FAKE_MODE", "stubborn").run(std::future::pending()).await,
            "ctrl_c" => launcher.env("FAKE_MODE", "hang").run(shutdown_signal().unwrap()).await,
            _ => panic!("unknown helper mode {mode}"),
        }
    });
    println!("result: {result:?}");
    std::process::exit(if result.is_ok() { 0 } else { 2 });
}

fn start_helper(mode: &str, dir: &Path) -> std::process::Child {
    std::process::Command::new(std::env::current_exe().unwrap())
        .args(["helper_launcher", "--exact", "--nocapture"])
        .env(HELPER_ENV, format!("{mode}:{}", dir.display()))
        // Its own process group, as a shell gives a foreground job.
        .process_group(0)
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap()
}

#[tokio::test]
async fn children_die_with_a_killed_launcher() {
    let pids = tempfile::tempdir().unwrap();
    let mut helper = start_helper("kill", pids.path());
    let names = ["ps-0-0", "worker-0-0", "worker-1-0"];
    wait_for_files(pids.path(), &names).await;
    let children: Vec<i32> = names.iter().map(|n| read_pid(&pids.path().join(n))).collect();
    // Children that ignore SIGTERM, alive with their launcher...
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert!(children.iter().all(|&pid| alive(pid)), "children exited early");
    helper.kill().unwrap();
    helper.wait().unwrap();
    // ...die with it, by the kernel's hand.
    let deadline = Instant::now() + Duration::from_secs(5);
    while children.iter().any(|&pid| alive(pid)) {
        let left: Vec<&i32> = children.iter().filter(|&&p| alive(p)).collect();
        assert!(Instant::now() < deadline, "orphans left: {left:?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test]
async fn ctrl_c_in_a_terminal_stops_each_child_exactly_once() {
    let pids = tempfile::tempdir().unwrap();
    let helper = start_helper("ctrl_c", pids.path());
    let names = ["ps-0-0", "worker-0-0", "worker-1-0"];
    wait_for_files(pids.path(), &names).await;
    tokio::time::sleep(Duration::from_millis(200)).await;
    // What a terminal does on Ctrl-C: SIGINT to every process of the foreground group.
    let group = helper.id() as i32;
    assert_eq!(unsafe { libc::kill(-group, libc::SIGINT) }, 0);
    let output = tokio::task::spawn_blocking(move || helper.wait_with_output().unwrap()).await.unwrap();
    let out = String::from_utf8_lossy(&output.stdout);
    assert_eq!(output.status.code(), Some(2), "{out}");
    assert!(out.contains("result: Err(Process(\"interrupted"), "{out}");
    for name in ["ps 0", "worker 0", "worker 1"] {
        assert_eq!(count(&out, &format!("{name} got SIGTERM")), 1, "{name}: {out}");
    }
    assert!(!out.contains("SIGINT"), "a child saw the terminal's SIGINT: {out}");
    let children: Vec<i32> = names.iter().map(|n| read_pid(&pids.path().join(n))).collect();
    assert!(children.iter().all(|&pid| !alive(pid)), "{out}");
}

#[tokio::test]
async fn a_server_that_fails_while_stopping_fails_the_finished_job_once() {
    let fake = Fake::new();
    let err = fake.run(job(2, 1, 3, Duration::from_secs(5)), "ps_fails_stop").await.unwrap_err();
    let out = fake.out.text();
    let text = err.to_string();
    assert!(matches!(err, LaunchError::JobFailed(_)), "{err:?}");
    assert!(text.contains("ps-1 (exit status: 1)") && text.contains("checkpoint"), "{text}");
    assert!(!text.contains("ps-0"), "ps-0 stopped cleanly: {text}");
    assert_eq!(count(&out, "the last checkpoint failed"), 1, "{out}");
    assert!(!out.contains("while stopping"), "the reason is given once, at the end:\n{out}");
    fake.assert_nothing_left();
}

#[tokio::test]
async fn a_server_killed_after_its_grace_period_fails_the_finished_job() {
    let fake = Fake::new();
    let err = fake.run(job(1, 1, 3, Duration::from_millis(500)), "ps_stubborn").await.unwrap_err();
    let text = err.to_string();
    assert!(text.contains("ps-0") && text.contains("SIGKILL"), "{text}");
    fake.assert_nothing_left();
}

#[tokio::test]
async fn a_worker_that_exits_with_no_restart_is_not_restarted() {
    let fake = Fake::new();
    let err = fake.run(job(1, 2, 3, Duration::from_secs(5)), "no_restart").await.unwrap_err();
    let text = err.to_string();
    assert!(text.contains("worker-0") && text.contains("restart would repeat"), "{text}");
    let started = fake.started();
    assert!(!started.contains(&"worker-0-1".to_string()), "restarted: {started:?}");
    let out = fake.out.text();
    assert_eq!(count(&out, "no label column"), 1, "{out}");
    assert!(!out.contains("restarting"), "{out}");
    fake.assert_nothing_left();
}

#[tokio::test]
async fn every_child_gets_the_run_id() {
    let fake = Fake::new();
    let launcher =
        fake.launcher(job(1, 1, 3, Duration::from_secs(5)), "ok").run_id("fake-20250101T000000Z-beef");
    launcher.run(std::future::pending()).await.unwrap();
    let out = fake.out.text();
    assert!(out.contains("run fake-20250101T000000Z-beef"), "{out}");
    assert_eq!(count(&out, "run id fake-20250101T000000Z-beef"), 2, "{out}");
}

#[test]
fn more_processes_than_the_machine_runs_well_are_refused_unless_allowed() {
    let cpus = std::thread::available_parallelism().unwrap().get();
    let limit = cpus * gradflow_launch::local::MAX_PROCESSES_PER_CPU;
    let mut j = job(1, limit as u32 - 1, 3, Duration::from_secs(5));
    gradflow_launch::local::check_process_count(&j).unwrap();
    j.workers = limit as u32;
    let err = gradflow_launch::local::check_process_count(&j).unwrap_err();
    let text = err.to_string();
    assert!(matches!(err, LaunchError::TooManyProcesses(_)), "{err:?}");
    assert!(
        text.contains(&format!("{} processes", limit + 1))
            && text.contains(&format!("{cpus} CPU(s)"))
            && text.contains("--allow-oversubscribe"),
        "{text}"
    );
    j.launcher.allow_oversubscribe = true;
    gradflow_launch::local::check_process_count(&j).unwrap();
}

/// The state record `gradflow status` reads, as the launcher left it.
fn state_of(job: &JobConfig) -> serde_json::Value {
    serde_json::from_str(&std::fs::read_to_string(job.state_path()).unwrap()).unwrap()
}

/// The run's log folder (the only run in the job's output folder).
fn logs_of(job: &JobConfig) -> std::path::PathBuf {
    let run = state_of(job)["run_id"].as_str().unwrap().to_string();
    job.logs_dir(&run)
}

#[tokio::test]
async fn the_state_record_and_log_files_follow_a_job_to_success() {
    let fake = Fake::new();
    let j = job(1, 2, 0, Duration::from_secs(5));
    fake.run(j.clone(), "ok").await.unwrap();
    let state = state_of(&j);
    assert_eq!(state["state"], "Succeeded", "{state:#}");
    assert_eq!(state["step"], 2, "{state:#}");
    let phases: Vec<_> = state["processes"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| (p["name"].clone(), p["phase"].clone()))
        .collect();
    assert_eq!(
        phases,
        [
            ("ps-0".into(), "Succeeded".into()),
            ("worker-0".into(), "Succeeded".into()),
            ("worker-1".into(), "Succeeded".into())
        ],
        "{state:#}"
    );
    let logs = logs_of(&j);
    let log = |name: &str| std::fs::read_to_string(logs.join(name)).unwrap_or_else(|e| panic!("{name}: {e}"));
    // Each process's own lines, stdout and stderr, whole, events included, unprefixed.
    let worker1 = log("worker-1-0.log");
    assert!(worker1.contains("worker 1 attempt 0 servers=127.0.0.1:41000\n"), "{worker1}");
    assert!(worker1.contains("worker 1: a line on stderr\n"), "{worker1}");
    assert!(worker1.contains("worker 1 part one, part two\n"), "{worker1}");
    assert!(worker1.contains("@gradflow {\"event\":\"progress\""), "{worker1}");
    assert!(!log("ps-0-0.log").contains("worker 1"), "{}", log("ps-0-0.log"));
    // The launcher's console, as it was shown.
    assert_eq!(log("launch.log"), fake.out.text());
}

#[tokio::test]
async fn a_restarted_worker_gets_a_log_per_attempt_and_a_failed_job_says_why() {
    let fake = Fake::new();
    let j = job(1, 1, 1, Duration::from_secs(5));
    fake.run(j.clone(), "fail_always").await.unwrap_err();
    let state = state_of(&j);
    assert_eq!(state["state"], "Failed", "{state:#}");
    assert!(
        state["message"].as_str().unwrap().contains("worker-0 failed (exit status: 1) after 1 restart(s)"),
        "{state:#}"
    );
    let worker = &state["processes"][1];
    assert_eq!((worker["attempt"].as_u64(), worker["restarts"].as_u64()), (Some(1), Some(1)), "{state:#}");
    assert_eq!(worker["phase"], "Failed", "{state:#}");
    assert_eq!(worker["problem"], "exit status: 1", "{state:#}");
    let logs = logs_of(&j);
    for attempt in [0, 1] {
        let text = std::fs::read_to_string(logs.join(format!("worker-0-{attempt}.log"))).unwrap();
        assert!(text.contains(&format!("worker 0 attempt {attempt} servers=")), "{text}");
    }
}

#[tokio::test]
async fn a_running_job_is_recorded_running_and_an_interrupted_one_failed() {
    let fake = Fake::new();
    let j = job(1, 2, 0, Duration::from_secs(30));
    let path = j.state_path();
    let seen = async move {
        // Generous: a loaded machine may take long to start three processes.
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let running = std::fs::read_to_string(&path)
                .ok()
                .and_then(|t| serde_json::from_str::<serde_json::Value>(&t).ok())
                .is_some_and(|s| {
                    s["state"] == "Running"
                        && s["processes"]
                            .as_array()
                            .unwrap()
                            .iter()
                            .all(|p| p["phase"] == "Running" && p["pid"].is_u64())
                });
            if running {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "the state record never said Running with every process running"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    };
    let err = fake.launcher(j.clone(), "hang").run(seen).await.unwrap_err();
    let state = state_of(&j);
    assert_eq!(state["state"], "Failed", "{state:#}");
    assert_eq!(state["message"], err.to_string(), "{state:#}");
    fake.assert_nothing_left();
}
