//! A worker process killed in the middle of sync training does not stop the others: the
//! shards drop it after the heartbeat timeout and the remaining workers finish.

mod common;

use std::io::{BufRead, BufReader};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::*;
use gradflow_core::Mode;

/// The `toy_worker` example, which cargo builds next to the test binaries.
fn toy_worker() -> PathBuf {
    let exe = std::env::current_exe().unwrap();
    let dir = exe.parent().unwrap().parent().unwrap();
    let path = dir.join("examples").join(format!("toy_worker{}", std::env::consts::EXE_SUFFIX));
    assert!(
        path.exists(),
        "{} not built; run the tests with cargo test, which builds examples",
        path.display()
    );
    path
}

fn spawn(servers: &str, worker: u32, steps: u64, delay_ms: u64) -> Child {
    Command::new(toy_worker())
        .args([servers, &worker.to_string(), &steps.to_string(), &delay_ms.to_string()])
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("start toy_worker")
}

fn wait_with_timeout(child: &mut Child, timeout: Duration) -> std::process::ExitStatus {
    let start = Instant::now();
    loop {
        if let Some(status) = child.try_wait().unwrap() {
            return status;
        }
        if start.elapsed() > timeout {
            let _ = child.kill();
            panic!("worker did not finish within {timeout:?}");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killing_a_worker_mid_run_does_not_stop_sync_training() {
    init_tracing();
    const STEPS: u64 = 40;
    let servers = start_shards(2, |s| {
        let mut c = config(s, 2, 3, Mode::Sync);
        c.settings.heartbeat_timeout = Duration::from_millis(800);
        c
    })
    .await;
    let list = addrs(&servers).join(",");
    let mut survivors = vec![spawn(&list, 0, STEPS, 20), spawn(&list, 1, STEPS, 20)];
    let mut victim = spawn(&list, 2, STEPS, 20);

    // Let it train a few steps with all three, then kill -9 the victim.
    let out = victim.stdout.take().unwrap();
    let seen = tokio::task::spawn_blocking(move || {
        let mut lines = BufReader::new(out).lines();
        let mut n = 0;
        while let Some(Ok(line)) = lines.next() {
            if line.starts_with("step ") {
                n += 1;
                if n == 5 {
                    return n;
                }
            }
        }
        n
    })
    .await
    .unwrap();
    assert_eq!(seen, 5, "victim trained 5 steps before being killed");
    victim.kill().unwrap();
    victim.wait().unwrap();
    let version_at_kill = servers[0].shard().coord.version();
    assert!(version_at_kill < STEPS);

    let survivors_done = tokio::task::spawn_blocking(move || {
        survivors.iter_mut().map(|c| wait_with_timeout(c, Duration::from_secs(60))).collect::<Vec<_>>()
    })
    .await
    .unwrap();
    for status in survivors_done {
        assert!(status.success(), "a surviving worker failed: {status}");
    }
    for s in &servers {
        assert_eq!(s.shard().coord.version(), STEPS, "every step completed without the dead worker");
        assert!(!s.shard().coord.live_workers().contains(&2));
    }
}
