//! The fault-injection suite, part 1: processes killed with SIGKILL at random points of a
//! running job (`.ci/faults.sh` runs the whole suite). With dynamic data sharding, every epoch
//! must still put each training example into the model exactly once, and the test AUC must
//! not fall more than 0.01 below an undisturbed run's.
//!
//! The tests run one at a time: each is a multi-process job timed against its own faults, and
//! on a small machine four at once starve each other.

mod common;

use std::io::{BufRead, BufReader};
use std::process::{Child, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use common::*;

const TRAIN_ROWS: u64 = 60_000;

/// Held by each test for its whole run.
fn serial() -> std::sync::MutexGuard<'static, ()> {
    static LOCK: std::sync::Mutex<()> = std::sync::Mutex::new(());
    LOCK.lock().unwrap_or_else(|e| e.into_inner())
}

/// A 2-epoch wide & deep job with dynamic data sharding over small tasks. Its tables and
/// learning rate are sized for 60,000 rows: with the example's 1M buckets the second epoch
/// overfits, and two undisturbed async runs then differ by nearly 0.01 in AUC on their own.
fn job_text(name: &str, mode: &str, extra: &str) -> String {
    let text = wide_deep_job(name, 2, mode, "")
        .replace(
            "num_dense = 13\n",
            "num_dense = 13\nhash_buckets = 10000\n\
             sparse_optimizer = { kind = \"adagrad\", lr = 0.02 }\n\
             dense_optimizer = { kind = \"adagrad\", lr = 0.02 }\n",
        )
        .replace("train_rows = 300000", &format!("train_rows = {TRAIN_ROWS}"))
        .replace("test_rows = 25000", "test_rows = 10000")
        .replace("[data]\n", "[data]\nsharding = \"dynamic\"\ntask_bytes = 200000\n")
        + "[train]\nepochs = 2\nlog_every_steps = 10\n"
        + extra;
    assert!(text.contains("hash_buckets") && text.contains("sharding"), "the base job changed:\n{text}");
    text
}

/// Every epoch's score: (AUC, examples the epoch trained). A worker killed after writing its
/// score but before reporting it has the epoch scored again by another: the last line counts.
fn epochs(dir: &std::path::Path, job: &str) -> Vec<(f64, u64)> {
    let mut by_epoch = std::collections::BTreeMap::new();
    for r in results(dir, job) {
        let score = (r["test_auc"].as_f64().unwrap(), r["epoch_train_examples"].as_u64().unwrap());
        by_epoch.insert(r["epoch"].as_u64().unwrap(), score);
    }
    by_epoch.into_values().collect()
}

/// The launcher's console lines, as they come.
fn lines_of(child: &mut Child) -> mpsc::Receiver<String> {
    let stderr = child.stderr.take().unwrap();
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    rx
}

/// Waits for a console line containing `needle`, collecting every line into `log`.
fn wait_for(rx: &mpsc::Receiver<String>, log: &mut Vec<String>, needle: &str) {
    wait_for_any(rx, log, &[needle]);
}

/// Waits for a console line containing any of `needles`; it is the last line of `log`.
fn wait_for_any(rx: &mpsc::Receiver<String>, log: &mut Vec<String>, needles: &[&str]) {
    let deadline = Instant::now() + Duration::from_secs(120);
    while Instant::now() < deadline {
        if let Ok(line) = rx.recv_timeout(Duration::from_millis(100)) {
            let hit = needles.iter().any(|n| line.contains(n));
            log.push(line);
            if hit {
                return;
            }
        }
    }
    panic!("no line with any of {needles:?} in:\n{}", log.join("\n"));
}

/// Waits for the launcher to exit, collecting its lines; kills it (and fails, with the log)
/// if the job hangs.
fn finish(
    launcher: &mut Child,
    rx: &mpsc::Receiver<String>,
    log: &mut Vec<String>,
) -> std::process::ExitStatus {
    let deadline = Instant::now() + Duration::from_secs(240);
    loop {
        log.extend(rx.try_iter());
        if let Some(status) = launcher.try_wait().unwrap() {
            rest_of(rx, log);
            return status;
        }
        if Instant::now() > deadline {
            let _ = launcher.kill();
            let _ = launcher.wait();
            panic!("the job hung; its console:\n{}", log.join("\n"));
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// The pid of the job's process whose command line has `role` and `index`.
fn pid_of(job: &str, role: &str, index: u32) -> u32 {
    for pid in processes_of_job(job) {
        let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
        let args: Vec<String> =
            cmdline.split(|b| *b == 0).map(|a| String::from_utf8_lossy(a).into_owned()).collect();
        let env = std::fs::read(format!("/proc/{pid}/environ")).unwrap_or_default();
        let index_var = format!("GRADFLOW_INDEX={index}\0");
        let is_index = env.windows(index_var.len()).any(|w| w == index_var.as_bytes());
        if args.iter().any(|a| a == role) && is_index {
            return pid;
        }
    }
    panic!("no {role} {index} of job {job} is running");
}

/// The address of ps-0's metrics endpoint, from its `listening on` line (the last in `log`).
fn metrics_addr(log: &[String]) -> String {
    log.last()
        .unwrap()
        .split("metrics at http://")
        .nth(1)
        .and_then(|s| s.split('/').next())
        .expect("ps-0 serves metrics")
        .to_string()
}

/// `gradflow_ps_model_version` from a shard's `/metrics` endpoint at `addr`; `None` when the
/// shard does not answer (the job has ended, or the shard is restarting).
fn model_version(addr: &str) -> Option<u64> {
    use std::io::{Read, Write};
    let mut conn = std::net::TcpStream::connect(addr).ok()?;
    write!(conn, "GET /metrics HTTP/1.0\r\nHost: {addr}\r\n\r\n").ok()?;
    let mut body = String::new();
    conn.read_to_string(&mut body).ok()?;
    let version = body
        .lines()
        .find(|l| l.starts_with("gradflow_ps_model_version "))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse::<f64>().ok())
        .unwrap_or_else(|| panic!("no model version in:\n{body}"));
    Some(version as u64)
}

fn sigkill(pid: u32) {
    let ok = std::process::Command::new("kill").arg("-9").arg(pid.to_string()).status().unwrap();
    assert!(ok.success());
}

/// `n` numbers in `lo..hi` from `GRADFLOW_FAULT_SEED` (printed, so a failure can be replayed),
/// or from the clock.
fn random_numbers(n: usize, lo: u64, hi: u64) -> Vec<u64> {
    let seed = std::env::var("GRADFLOW_FAULT_SEED").ok().and_then(|s| s.parse().ok()).unwrap_or_else(|| {
        std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().subsec_nanos() as u64
    });
    eprintln!("fault delays from GRADFLOW_FAULT_SEED={seed}");
    let mut rng = gradflow_data::SplitMix64::new(seed);
    (0..n).map(|_| lo + rng.below(hi - lo)).collect()
}

/// The job of [`job_text`] on `data/train.parquet` (see [`parquet_data`]) instead of its CSV.
fn parquet_job_text(name: &str, mode: &str) -> String {
    let text = job_text(name, mode, "");
    let start = text.find("[data.synth]").expect("the base job has a [data.synth]");
    let end = start + text[start..].find("seed = 5\n").expect("and a seed") + "seed = 5\n".len();
    let text = format!("{}{}", &text[..start], &text[end..]);
    let categorical: Vec<String> = (0..26).map(|i| format!("\"c{i}\"")).collect();
    let text = text.replace(
        "train = \"data/train.csv\"",
        &format!("train = \"data/train.parquet\"\ncategorical = [{}]", categorical.join(", ")),
    );
    assert!(text.contains("train.parquet") && !text.contains("[data.synth]"), "{text}");
    text
}

/// The base job's data, with its training rows as Parquet in row groups of 2000 rows (30
/// groups: dynamic sharding's tasks).
fn parquet_data(dir: &std::path::Path) {
    std::fs::create_dir_all(dir.join("data")).unwrap();
    synth_train_test(dir, TRAIN_ROWS as usize, 10_000);
    let mut c = gradflow();
    c.args(["data", "convert"])
        .arg(dir.join("data/train.csv"))
        .arg("--out")
        .arg(dir.join("data/train.parquet"));
    c.args(["--row-group-rows", "2000"]);
    for i in 0..26 {
        c.args(["--categorical", &format!("c{i}")]);
    }
    let o = c.output().unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    std::fs::remove_file(dir.join("data/train.csv")).unwrap();
}

fn text_of(name: &str, mode: &str, parquet: bool) -> String {
    if parquet { parquet_job_text(name, mode) } else { job_text(name, mode, "") }
}

fn undisturbed(dir: &std::path::Path, name: &str, mode: &str, parquet: bool) -> Vec<(f64, u64)> {
    let job = write(dir, &format!("{name}.toml"), &text_of(name, mode, parquet));
    let out = launch(&job);
    assert!(out.status.success(), "{name}: {}", String::from_utf8_lossy(&out.stderr));
    epochs(dir, name)
}

fn workers_killed_at_random_points(mode: &str, parquet: bool) {
    let dir = tempfile::tempdir().unwrap();
    if parquet {
        parquet_data(dir.path());
    }
    let reference = undisturbed(dir.path(), &format!("calm-{mode}"), mode, parquet);
    assert_eq!(reference.len(), 2);
    for (_, examples) in &reference {
        assert_eq!(*examples, TRAIN_ROWS, "an undisturbed epoch trains every example once");
    }

    let name = format!("kill-{mode}");
    let job = write(dir.path(), &format!("{name}.toml"), &text_of(&name, mode, parquet));
    let mut launcher = gradflow().arg("launch").arg(&job).stderr(Stdio::piped()).spawn().unwrap();
    let rx = lines_of(&mut launcher);
    let mut log = Vec::new();
    wait_for(&rx, &mut log, "ps-0 listening on");
    let metrics = metrics_addr(&log);
    let started = Instant::now();
    let mut kills = 0;
    // Kills land at random model steps (not after random times, which a fast machine could
    // outrun): both well inside the job's first epoch.
    let mut targets = random_numbers(2, 10, 100);
    targets.sort();
    for (i, target) in targets.into_iter().enumerate() {
        let deadline = Instant::now() + Duration::from_secs(120);
        while launcher.try_wait().unwrap().is_none()
            && Instant::now() < deadline
            && model_version(&metrics).unwrap_or(0) < target
        {
            log.extend(rx.try_iter());
            std::thread::sleep(Duration::from_millis(5));
        }
        if launcher.try_wait().unwrap().is_some() {
            break;
        }
        let worker = (i % 2) as u32;
        // The previous kill's restart may still be under way.
        let deadline = Instant::now() + Duration::from_secs(10);
        let pid = loop {
            match std::panic::catch_unwind(|| pid_of(&name, "worker", worker)) {
                Ok(pid) => break Some(pid),
                Err(_) if Instant::now() < deadline => std::thread::sleep(Duration::from_millis(50)),
                Err(_) => break None,
            }
        };
        if let Some(pid) = pid {
            eprintln!("SIGKILL worker-{worker} (pid {pid}) at step {target}, {:?} in", started.elapsed());
            sigkill(pid);
            kills += 1;
        }
    }
    let status = finish(&mut launcher, &rx, &mut log);
    let log = log.join("\n");
    assert!(status.success(), "the job survives its workers being killed:\n{log}");
    assert!(kills > 0, "the job ended before any worker could be killed; make it longer");
    assert!(log.contains("restart"), "the launcher restarted the killed worker(s):\n{log}");

    let disturbed = epochs(dir.path(), &name);
    assert_eq!(disturbed.len(), 2, "{log}");
    for (epoch, ((auc, examples), (ref_auc, _))) in disturbed.iter().zip(&reference).enumerate() {
        assert_eq!(*examples, TRAIN_ROWS, "epoch {epoch}: every example in the model exactly once");
        // Async runs differ from run to run (the order of pushes), in either direction; what must
        // not happen is a loss of accuracy.
        assert!(*auc > ref_auc - 0.01, "epoch {epoch}: AUC {auc} vs {ref_auc} undisturbed");
        eprintln!("{mode} epoch {epoch}: AUC {auc:.4} vs {ref_auc:.4} undisturbed, {kills} worker kill(s)");
    }
}

#[test]
fn sync_workers_killed_at_random_points_lose_no_example_and_no_accuracy() {
    let _serial = serial();
    workers_killed_at_random_points("sync", false);
}

/// The same over Parquet, whose row groups are dynamic sharding's tasks.
#[test]
fn workers_killed_while_reading_parquet_row_groups_lose_no_example() {
    let _serial = serial();
    workers_killed_at_random_points("sync", true);
}

#[test]
fn async_workers_killed_at_random_points_lose_no_example_and_no_accuracy() {
    let _serial = serial();
    workers_killed_at_random_points("async", false);
}

/// Kills a server at a random point: the launcher restarts the job from the latest checkpoint,
/// the task progress comes back with it, and at most one checkpoint interval is redone.
#[test]
fn a_killed_server_costs_at_most_one_checkpoint_interval_and_no_example() {
    let _serial = serial();
    let dir = tempfile::tempdir().unwrap();
    let every = 40;
    let ckpt = dir.path().join("ckpt");
    let extra = format!("[checkpoint]\nurl = \"{}\"\nevery_steps = {every}\n", ckpt.display());
    let name = "kill-ps";
    let job = write(dir.path(), "kill-ps.toml", &job_text(name, "sync", &extra));
    let mut launcher = gradflow().arg("launch").arg(&job).stderr(Stdio::piped()).spawn().unwrap();
    let rx = lines_of(&mut launcher);
    let mut log = Vec::new();
    wait_for(&rx, &mut log, "ps-0 listening on");
    let metrics = metrics_addr(&log);
    // The kill lands at a random step, not after a random time: how long the job runs
    // depends on the machine, and a kill after the job's end would test nothing.
    let target = random_numbers(1, every + 5, 3 * every)[0];
    // On a loaded machine the first checkpoint may still be uploading at the target; the kill
    // waits for it, since a job killed before any checkpoint simply starts over.
    let deadline = Instant::now() + Duration::from_secs(120);
    while model_version(&metrics).unwrap_or(0) < target || latest_complete_checkpoint(&ckpt).is_none() {
        log.extend(rx.try_iter());
        assert!(
            Instant::now() < deadline,
            "the job never reached step {target} with a complete checkpoint:\n{}",
            log.join("\n")
        );
        std::thread::sleep(Duration::from_millis(5));
    }
    let pid = pid_of(name, "ps", 1);
    // The model's step just before the kill: what the restore goes back from; and the latest
    // checkpoint complete at the kill, the one the restore must use.
    let reached = model_version(&metrics).expect("ps-0 answers while ps-1 is killed");
    let complete = latest_complete_checkpoint(&ckpt);
    let killed_at = Instant::now();
    sigkill(pid);
    eprintln!("SIGKILL ps-1 (pid {pid}) at step {reached} (target {target})");
    wait_for_any(&rx, &mut log, &["restoring checkpoint step", "no checkpoint was written yet"]);
    let restored_line = log.last().unwrap().clone();
    let restored: u64 = restored_line
        .split("restoring checkpoint step ")
        .nth(1)
        .and_then(|s| s.split_whitespace().next())
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("a step in `{restored_line}`"));
    let recovered = killed_at.elapsed();
    let status = finish(&mut launcher, &rx, &mut log);
    let log = log.join("\n");
    assert!(status.success(), "{log}");

    assert!(restored % every == 0, "restored step {restored} is a checkpoint step");
    assert!(
        restored >= complete.unwrap_or(0),
        "checkpoint {complete:?} was complete at the kill, but the job restored {restored}"
    );
    // A step or two may complete between reading the version and the kill. One more interval
    // is lost only when the kill lands while the last interval's checkpoint is being written.
    let redone = (reached + 2).saturating_sub(restored);
    let writing = complete.is_none_or(|c| c + every <= reached);
    let allowed = if writing { 2 * every + 2 } else { every + 2 };
    assert!(
        redone <= allowed,
        "killed at step {reached}, restored {restored} (complete at the kill: {complete:?}): more than {allowed} steps redone"
    );
    eprintln!(
        "ps-1 killed at step {reached}; restored step {restored} ({} steps redone); every process restarted {recovered:?} after the kill",
        reached.saturating_sub(restored)
    );
    for (epoch, (_, examples)) in epochs(dir.path(), name).iter().enumerate() {
        assert_eq!(*examples, TRAIN_ROWS, "epoch {epoch}: task progress restored with the model");
    }
}

/// The step of the newest checkpoint under `root` whose top-level manifest is written (a
/// checkpoint is complete once it is).
fn latest_complete_checkpoint(root: &std::path::Path) -> Option<u64> {
    fn walk(dir: &std::path::Path, best: &mut Option<u64>) {
        let Ok(entries) = std::fs::read_dir(dir) else { return };
        for e in entries.flatten() {
            let path = e.path();
            let name = e.file_name().to_string_lossy().into_owned();
            match name.strip_prefix("ckpt-").and_then(|n| n.parse::<u64>().ok()) {
                Some(step) if path.join("manifest.json").is_file() => {
                    *best = Some(best.map_or(step, |b| b.max(step)))
                }
                Some(_) => {}
                None if path.is_dir() => walk(&path, best),
                None => {}
            }
        }
    }
    let mut best = None;
    walk(root, &mut best);
    best
}

fn send(signal: &str, pid: u32) {
    let ok =
        std::process::Command::new("kill").arg(format!("-{signal}")).arg(pid.to_string()).status().unwrap();
    assert!(ok.success());
}

/// Starts `job`, stops worker 1 (SIGSTOP) for two seconds once training runs, and returns how
/// many model versions ps-0 advanced meanwhile; then lets the job finish and checks every
/// epoch trained each example once.
fn versions_while_worker_1_is_stopped(dir: &std::path::Path, name: &str, mode: &str, extra: &str) -> u64 {
    let job = write(dir, &format!("{name}.toml"), &job_text(name, mode, extra));
    let mut launcher = gradflow().arg("launch").arg(&job).stderr(Stdio::piped()).spawn().unwrap();
    let rx = lines_of(&mut launcher);
    let mut log = Vec::new();
    wait_for(&rx, &mut log, "ps-0 listening on");
    let metrics = metrics_addr(&log);
    wait_for(&rx, &mut log, "samples/s");
    let pid = pid_of(name, "worker", 1);
    send("STOP", pid);
    let before = model_version(&metrics).expect("ps-0 answers");
    std::thread::sleep(Duration::from_secs(2));
    // The stopped worker holds a task, so the job cannot have ended.
    let after = model_version(&metrics).expect("ps-0 answers while a worker is stopped");
    send("CONT", pid);
    let status = finish(&mut launcher, &rx, &mut log);
    assert!(status.success(), "{name}:\n{}", log.join("\n"));
    for (epoch, (_, examples)) in epochs(dir, name).iter().enumerate() {
        assert_eq!(*examples, TRAIN_ROWS, "{name} epoch {epoch}: every example in the model exactly once");
    }
    after - before
}

/// A straggler (a worker stopped for 2 s, shorter than the heartbeat timeout): sync mode
/// waits for it unless the job has a backup worker; async mode never waits.
#[test]
fn a_straggler_holds_back_sync_steps_only_without_backup_workers() {
    let _serial = serial();
    let dir = tempfile::tempdir().unwrap();
    let waiting = versions_while_worker_1_is_stopped(dir.path(), "strag-sync", "sync", "");
    let backup = "[server]\nbackup_workers = 1\n";
    let with_backup = versions_while_worker_1_is_stopped(dir.path(), "strag-backup", "sync", backup);
    let asynch = versions_while_worker_1_is_stopped(dir.path(), "strag-async", "async", "");
    eprintln!(
        "model versions during a 2 s straggler: sync {waiting}, sync + 1 backup {with_backup}, async {asynch}"
    );
    assert!(waiting <= 1, "sync without backups waits for the stopped worker ({waiting} steps)");
    assert!(with_backup >= 10, "a backup worker keeps sync steps going ({with_backup} steps in 2 s)");
    assert!(asynch >= 10, "async does not wait for the straggler ({asynch} pushes in 2 s)");
}
