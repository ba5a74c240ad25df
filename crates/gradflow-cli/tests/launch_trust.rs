//! What `gradflow launch` refuses before it starts anything, and what it reports when a job
//! ends (issue 17): a second run of a running job, a new run into a used checkpoint root,
//! data that does not fit the model, more processes than the machine runs well, a bad log
//! filter; the stale `servers.json` of a killed launcher; run ids.

mod common;

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Output, Stdio};
use std::sync::mpsc::Receiver;
use std::time::{Duration, Instant};

use common::*;

fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

/// A small wide & deep job: 1 server, 1 worker, `rows` training rows, with a checkpoint root.
fn small_job(name: &str, rows: u32, ckpt: Option<&Path>, train: &str) -> String {
    let mut text = wide_deep_job(name, 1, "sync", "")
        .replace("servers = 2", "servers = 1")
        .replace("train_rows = 300000", &format!("train_rows = {rows}"))
        .replace("test_rows = 25000", "test_rows = 500");
    text.push_str(&format!("[train]\nlog_every_steps = 5\n{train}\n"));
    if let Some(ckpt) = ckpt {
        text.push_str(&format!("[checkpoint]\nurl = \"{}\"\nevery_steps = 20\nkeep = 10\n", ckpt.display()));
    }
    text
}

/// The launcher's standard error, line by line, read on a thread.
fn lines_of(child: &mut Child) -> Receiver<String> {
    let err = child.stderr.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(err).lines().map_while(Result::ok) {
            if tx.send(line).is_err() {
                return;
            }
        }
    });
    rx
}

/// Waits (generously) for a line containing `needle`; returns it.
fn wait_for(rx: &Receiver<String>, log: &mut Vec<String>, needle: &str) -> String {
    let deadline = Instant::now() + Duration::from_secs(180);
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        match rx.recv_timeout(left) {
            Ok(line) => {
                log.push(line.clone());
                if line.contains(needle) {
                    return line;
                }
            }
            Err(_) => panic!("no line with {needle:?} in:\n{}", log.join("\n")),
        }
    }
}

/// The run id the launcher printed (`[launch] job NAME: run ID`).
fn run_id_in(text: &str) -> String {
    let line =
        text.lines().find(|l| l.starts_with("[launch] job ") && l.contains(": run ")).unwrap_or_else(|| {
            panic!("no run id printed:\n{text}");
        });
    line.rsplit(": run ").next().unwrap().trim().to_string()
}

fn wait_until_gone(job: &str) {
    let start = Instant::now();
    while !processes_of_job(job).is_empty() {
        assert!(start.elapsed() < Duration::from_secs(30), "processes of {job} outlived their launcher");
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn sigterm(child: &Child) {
    let sent = std::process::Command::new("kill").arg("-TERM").arg(child.id().to_string()).status().unwrap();
    assert!(sent.success());
}

/// Nothing of the job was started: the launcher printed no process start.
fn assert_nothing_started(text: &str) {
    assert!(
        !text.contains("starting 1 server") && !text.contains("[ps-0]") && !text.contains("[worker-0]"),
        "{text}"
    );
}

#[test]
fn a_second_launch_of_a_running_job_is_refused_naming_the_running_one() {
    let dir = tempfile::tempdir().unwrap();
    let ckpt = dir.path().join("ckpt");
    let job = write(dir.path(), "twice.toml", &small_job("twice", 20000, Some(&ckpt), "epochs = 1000"));
    let mut first = gradflow().arg("launch").arg(&job).stderr(Stdio::piped()).spawn().unwrap();
    let rx = lines_of(&mut first);
    let mut log = Vec::new();
    let run_line = wait_for(&rx, &mut log, ": run twice-");
    let first_run = run_id_in(&run_line);
    wait_for(&rx, &mut log, "samples/s");

    // Same job file: its output folder is taken.
    let started = Instant::now();
    let out = launch(&job);
    let text = stderr(&out);
    assert!(!out.status.success(), "{text}");
    assert!(
        text.contains("already running")
            && text.contains(&format!("run {first_run}"))
            && text.contains(&format!("pid {}", first.id()))
            && text.contains("since"),
        "{text}"
    );
    assert_nothing_started(&text);
    assert!(
        started.elapsed() < Duration::from_secs(30),
        "refused at once, not after {:?}",
        started.elapsed()
    );

    // Another job (another output folder) with the same checkpoint root: the root is taken.
    let other = write(dir.path(), "other.toml", &small_job("other", 20000, Some(&ckpt), "epochs = 1000"));
    let out = launch(&other);
    let text = stderr(&out);
    assert!(!out.status.success(), "{text}");
    assert!(text.contains("checkpoint root") && text.contains(&format!("run {first_run}")), "{text}");
    assert_nothing_started(&text);

    // The first run is untouched by either: it stops on SIGTERM with a checkpoint that verifies.
    sigterm(&first);
    first.wait().unwrap();
    wait_until_gone("twice");
    rest_of(&rx, &mut log);
    let out = gradflow().args(["checkpoint", "inspect", "--verify"]).arg(&ckpt).output().unwrap();
    assert!(out.status.success(), "{}\nlauncher:\n{}", stderr(&out), log.join("\n"));
}

#[test]
fn a_new_run_into_a_used_checkpoint_root_is_refused_and_fresh_moves_the_old_run_aside() {
    let dir = tempfile::tempdir().unwrap();
    let ckpt = dir.path().join("ckpt");
    let job = write(dir.path(), "rerun.toml", &small_job("rerun", 20000, Some(&ckpt), "max_steps = 40"));
    let out = launch(&job);
    let text = stderr(&out);
    assert!(out.status.success(), "{text}");
    let first_run = run_id_in(&text);
    assert!(ckpt.join("ckpt-000000000040/manifest.json").exists(), "{text}");

    // Again, without restore: refused before anything starts, saying what to do.
    let out = launch(&job);
    let text = stderr(&out);
    assert!(!out.status.success(), "a rerun into a used root must fail:\n{text}");
    assert!(
        text.contains("already holds") && text.contains("restore = \"latest\"") && text.contains("--fresh"),
        "{text}"
    );
    assert_nothing_started(&text);
    assert_eq!(text.matches("already holds").count(), 1, "said once:\n{text}");

    // --fresh: the earlier run's checkpoints move under archive/<its run id>/, the new run
    // writes its own at the root.
    let out = gradflow().args(["launch", "--fresh"]).arg(&job).output().unwrap();
    let text = stderr(&out);
    assert!(out.status.success(), "{text}");
    let archived = ckpt.join("archive").join(&first_run);
    assert!(text.contains(&archived.display().to_string()), "{text}");
    assert!(archived.join("latest").exists() && archived.join("ckpt-000000000040/manifest.json").exists());
    let second_run = run_id_in(&text);
    assert_ne!(first_run, second_run);
    assert!(ckpt.join("ckpt-000000000040/manifest.json").exists(), "the new run's checkpoints: {text}");
    for root in [&archived, &ckpt] {
        let out = gradflow().args(["checkpoint", "inspect", "--verify"]).arg(root).output().unwrap();
        assert!(out.status.success(), "{}: {}", root.display(), stderr(&out));
    }
}

#[test]
fn a_finished_job_without_checkpoints_runs_again() {
    let dir = tempfile::tempdir().unwrap();
    let job = write(dir.path(), "again.toml", &small_job("again", 5000, None, ""));
    for _ in 0..2 {
        let out = launch(&job);
        assert!(out.status.success(), "{}", stderr(&out));
    }
}

fn data_job(dir: &Path, name: &str, train: &str, num_dense: u32) -> PathBuf {
    write(
        dir,
        &format!("{name}.toml"),
        &format!(
            "name = \"{name}\"\n[model]\nkind = \"logistic_regression\"\nnum_dense = {num_dense}\n\
             [data]\ntrain = \"{train}\"\ncategorical = [\"c\"]\n"
        ),
    )
}

#[test]
fn data_that_does_not_fit_the_model_fails_at_once_with_one_message() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::create_dir(dir.path().join("empty")).unwrap();
    let mut rows = String::new();
    for i in 0..200 {
        rows.push_str(&format!("{},{}.5,{}.25,v{}\n", i % 2, i % 7, i % 3, i % 5));
    }
    write(dir.path(), "nolabel.csv", &format!("click,x,y,c\n{rows}"));
    write(dir.path(), "good.csv", &format!("label,x,y,c\n{rows}"));
    for (name, train, num_dense, message) in [
        ("empty", "empty", 2, "holds no data files"),
        ("nolabel", "nolabel.csv", 2, "label"),
        ("dense", "good.csv", 5, "but model.num_dense is 5"),
    ] {
        let job = data_job(dir.path(), name, train, num_dense);
        let started = Instant::now();
        let out = launch(&job);
        let text = stderr(&out);
        assert!(!out.status.success(), "{name}: {text}");
        assert!(text.contains("data: data.train") && text.contains(message), "{name}: {text}");
        assert_eq!(text.matches("data: data.train").count(), 1, "{name}: said once:\n{text}");
        assert_nothing_started(&text);
        assert!(
            started.elapsed() < Duration::from_secs(30),
            "{name}: at once, not after {:?}",
            started.elapsed()
        );
        assert!(processes_of_job(name).is_empty());
    }
    // The same data with the right num_dense trains.
    let out = launch(&data_job(dir.path(), "fits", "good.csv", 2));
    assert!(out.status.success(), "{}", stderr(&out));
}

#[test]
fn more_processes_than_the_machine_runs_well_are_refused_naming_the_numbers() {
    let dir = tempfile::tempdir().unwrap();
    let cpus = std::thread::available_parallelism().unwrap().get();
    let workers = 4 * cpus;
    let job = write(dir.path(), "many.toml", &wide_deep_job("many", workers as u32, "async", ""));
    let out = launch(&job);
    let text = stderr(&out);
    assert!(!out.status.success(), "{text}");
    assert!(
        text.contains(&format!("{} processes", workers + 2))
            && text.contains(&format!("{cpus} CPU(s)"))
            && text.contains("--allow-oversubscribe"),
        "{text}"
    );
    assert_eq!(text.matches("--allow-oversubscribe").count(), 1, "{text}");
    assert!(!dir.path().join("runs/many").exists() && !dir.path().join("data").exists(), "nothing written");
}

#[test]
fn a_bad_log_filter_is_refused_naming_the_key_and_the_directive() {
    let dir = tempfile::tempdir().unwrap();
    let job = write(
        dir.path(),
        "log.toml",
        &small_job("log", 5000, None, "")
            .replace("[train]", "[output]\nlog = \"info,gradflow_ps=chatty\"\n[train]"),
    );
    let out = launch(&job);
    let text = stderr(&out);
    assert!(!out.status.success(), "{text}");
    assert!(text.contains("output.log") && text.contains("`gradflow_ps=chatty`"), "{text}");
}

#[test]
fn the_servers_record_of_a_killed_launcher_is_private_and_removed_by_the_next_reader() {
    use std::os::unix::fs::PermissionsExt;
    let dir = tempfile::tempdir().unwrap();
    // A checkpoint section for `gradflow checkpoint now`, with no checkpoint ever due.
    let ckpt = dir.path().join("ckpt");
    let text = small_job("stale", 20000, Some(&ckpt), "epochs = 1000")
        .replace("every_steps = 20", "every_steps = 100000000\non_shutdown = false");
    let job = write(dir.path(), "stale.toml", &text);
    let record = dir.path().join("runs/stale/servers.json");
    let mut launcher = gradflow().arg("launch").arg(&job).stderr(Stdio::null()).spawn().unwrap();
    let start = Instant::now();
    while !record.exists() {
        assert!(start.elapsed() < Duration::from_secs(120), "{} never appeared", record.display());
        assert!(launcher.try_wait().unwrap().is_none(), "the job ended early");
        std::thread::sleep(Duration::from_millis(20));
    }
    let mode = std::fs::metadata(&record).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o600, "the record holds the token: {mode:o}");
    let left = std::fs::read_to_string(&record).unwrap();
    launcher.kill().unwrap(); // SIGKILL: the launcher cannot remove it
    launcher.wait().unwrap();
    wait_until_gone("stale");
    assert!(record.exists(), "left behind by the killed launcher");

    // A reader finds the launcher gone, removes the record and says so.
    let out = gradflow().args(["checkpoint", "now"]).arg(&job).output().unwrap();
    let err = stderr(&out);
    assert!(!out.status.success() && err.contains("gone") && err.contains("removed it"), "{err}");
    assert!(!record.exists(), "{err}");

    // So does the next launcher.
    std::fs::write(&record, &left).unwrap();
    let short = write(dir.path(), "stale-short.toml", &text.replace("epochs = 1000", "max_steps = 5"));
    let out = launch(&short);
    let err = stderr(&out);
    assert!(out.status.success(), "{err}");
    assert!(err.contains(&format!("removed {}", record.display())), "{err}");
    assert!(!record.exists());
}

#[test]
fn every_process_gets_the_run_id_the_launcher_prints() {
    let dir = tempfile::tempdir().unwrap();
    let job = write(dir.path(), "runid.toml", &small_job("runid", 20000, None, "epochs = 1000"));
    let mut launcher = gradflow().arg("launch").arg(&job).stderr(Stdio::piped()).spawn().unwrap();
    let rx = lines_of(&mut launcher);
    let mut log = Vec::new();
    let run_id = run_id_in(&wait_for(&rx, &mut log, ": run runid-"));
    wait_for(&rx, &mut log, "samples/s");
    let pids = processes_of_job("runid");
    assert_eq!(pids.len(), 2, "one server, one worker");
    for pid in pids {
        let env = std::fs::read(format!("/proc/{pid}/environ")).unwrap();
        let want = format!("GRADFLOW_RUN_ID={run_id}");
        assert!(env.split(|b| *b == 0).any(|v| v == want.as_bytes()), "pid {pid} lacks {want}");
    }
    launcher.kill().unwrap();
    launcher.wait().unwrap();
    wait_until_gone("runid");
}

/// A server whose last checkpoint cannot be written fails the job, with the reason once at
/// the end. The checkpoint root is replaced by a regular file once the job runs.
#[test]
fn a_job_whose_last_checkpoint_fails_exits_non_zero() {
    let dir = tempfile::tempdir().unwrap();
    let ckpt = dir.path().join("ckpt");
    let job = write(
        dir.path(),
        "lost.toml",
        &small_job("lost", 20000, Some(&ckpt), "max_steps = 400")
            .replace("every_steps = 20", "every_steps = 100000"),
    );
    let mut launcher = gradflow().arg("launch").arg(&job).stderr(Stdio::piped()).spawn().unwrap();
    let rx = lines_of(&mut launcher);
    let mut log = Vec::new();
    wait_for(&rx, &mut log, "listening on");
    std::fs::remove_dir_all(&ckpt).unwrap();
    std::fs::write(&ckpt, "not a folder").unwrap();
    let status = launcher.wait().unwrap();
    rest_of(&rx, &mut log);
    let text = log.join("\n");
    assert!(!status.success(), "{text}");
    assert!(text.contains("did not stop cleanly"), "{text}");
}
