//! Dynamic data sharding's task queue as shard 0 restores it from a checkpoint
//! (`data_tasks.json` among the checkpoint's extras).

use std::collections::{BTreeSet, HashMap};

use gradflow_ps::PsError;
use gradflow_ps::tasks::{Handout, Piece, SavedEpoch, SavedTasks, TaskPlan, TaskQueue};

/// Workers of the simulated job.
const WORKERS: u32 = 3;
/// Simulate only plans of at most this many tasks over all epochs.
const MAX_TASKS: u64 = 512;

/// `SavedTasks` JSON, restored with `TaskQueue::restore` as `gradflow ps` does on restore. A
/// refused state gets a typed error. A restored queue saves to a state that restores to itself,
/// and drives a small job to its end: with workers that finish every task, each task of each
/// epoch is trained exactly once (none done before the checkpoint is handed out again), every
/// completed epoch is scored once, and the queue says `Finished` after a bounded number of
/// requests. One worker is lost midway: its task goes to another with its progress.
pub fn data_tasks(data: &[u8]) {
    let Ok(saved) = serde_json::from_slice::<SavedTasks>(data) else { return };
    let mut q = match TaskQueue::restore(saved.clone()) {
        Ok(q) => q,
        Err(e) => {
            assert!(matches!(e, PsError::InvalidArgument(_) | PsError::Internal(_)), "{e:?}");
            return;
        }
    };
    let state = q.save();
    let again = TaskQueue::restore(state.clone()).expect("a saved queue restores");
    assert_eq!(again.save(), state, "save(restore(save(q))) == save(q)");

    assert!(!inconsistent(&saved), "restore refuses states no queue can have saved");
    let plan = saved.plan.clone();
    let n = plan.pieces.len() as u64;
    let Some(total) = n.checked_mul(plan.epochs).filter(|&t| t <= MAX_TASKS) else { return };

    // (epoch, piece) finished before the checkpoint, and which epochs were open.
    let done_before: BTreeSet<(u64, u32)> =
        state.epochs.iter().flat_map(|e| e.done.iter().map(move |&p| (e.epoch, p))).collect();
    let mut trained: HashMap<(u64, u32), u32> = HashMap::new();
    let mut scored: HashMap<u64, u32> = HashMap::new();
    let mut holding: Vec<u64> = vec![0; WORKERS as usize];
    let mut scoring: Vec<Option<u64>> = vec![None; WORKERS as usize];
    let mut lost = None;
    let bound = 4 * (total + plan.epochs) + 4 * u64::from(WORKERS) + 16;
    let mut finished = false;
    for round in 0..bound {
        if round == 3 {
            // Worker 1 dies holding whatever it holds; a scoring it was given is the queue's to
            // hand to another, not this simulation's to wait for.
            lost = Some(1);
            scoring[1] = None;
        }
        let mut all_done = true;
        for w in 0..WORKERS {
            if lost == Some(w) {
                continue;
            }
            let live = |x: u32| lost != Some(x);
            let (h, eval) = q.next(w, holding[w as usize], scoring[w as usize].take(), live);
            if let Some((epoch, _)) = eval {
                *scored.entry(epoch).or_default() += 1;
                scoring[w as usize] = Some(epoch);
                all_done = false;
            }
            match h {
                Handout::Task(t) => {
                    all_done = false;
                    assert!(t.epoch < plan.epochs, "task of epoch {} of {}", t.epoch, plan.epochs);
                    assert_eq!(t.piece, plan.pieces[t.piece_index as usize], "the task's piece");
                    let key = (t.epoch, t.piece_index);
                    assert!(!done_before.contains(&key), "piece {key:?} was done before the checkpoint");
                    if holding[w as usize] != t.lease {
                        *trained.entry(key).or_default() += 1;
                    }
                    q.progress(w, t.lease, t.skip_examples + 1).expect("the holder reports progress");
                    holding[w as usize] = t.lease;
                }
                Handout::Wait => {
                    all_done = false;
                    holding[w as usize] = 0;
                }
                Handout::Finished => holding[w as usize] = 0,
            }
        }
        if all_done && scoring.iter().all(Option::is_none) {
            finished = true;
            break;
        }
    }
    assert!(finished, "the job finishes within {bound} rounds");
    // A task taken over from the lost worker counts twice; everything else once.
    let twice = trained.values().filter(|&&c| c == 2).count();
    assert!(trained.values().all(|&c| c == 1 || c == 2) && twice <= 1, "each task trained once: {trained:?}");
    let opened: BTreeSet<u64> = state.epochs.iter().map(|e| e.epoch).collect();
    for e in 0..plan.epochs {
        let before = done_before.iter().filter(|(x, _)| *x == e).count() as u64;
        let now = trained.keys().filter(|(x, _)| *x == e).count() as u64;
        if e >= state.next_epoch || opened.contains(&e) {
            assert_eq!(before + now, n, "every piece of epoch {e} trained");
        }
    }
    assert!(scored.values().all(|&c| c >= 1), "each completed epoch scored");
}

/// Whether `saved` could not have come from `TaskQueue::save`: an open or unscored epoch at or
/// after `next_epoch`, an epoch listed twice, or more epochs opened than planned.
fn inconsistent(saved: &SavedTasks) -> bool {
    let mut epochs: Vec<u64> =
        saved.epochs.iter().map(|e| e.epoch).chain(saved.unscored.iter().map(|u| u.0)).collect();
    let listed = epochs.len();
    epochs.sort_unstable();
    epochs.dedup();
    saved.next_epoch > saved.plan.epochs
        || epochs.len() != listed
        || epochs.last().is_some_and(|&e| e >= saved.next_epoch)
}

pub(crate) fn seeds() -> Vec<(&'static str, String, Vec<u8>)> {
    let plan = TaskPlan {
        pieces: (0..4)
            .map(|i| Piece { path: "train.csv".into(), start: i * 100, end: i * 100 + 100 })
            .collect(),
        epochs: 3,
        seed: 7,
    };
    let fresh = SavedTasks { plan: plan.clone(), next_epoch: 0, epochs: vec![], unscored: vec![] };
    let mid = SavedTasks {
        plan,
        next_epoch: 2,
        epochs: vec![SavedEpoch { epoch: 1, done: vec![0, 2], progress: vec![(1, 17)], examples: 230 }],
        unscored: vec![(0, 400)],
    };
    vec![
        ("data_tasks", "seed-fresh.json".into(), serde_json::to_vec(&fresh).unwrap()),
        ("data_tasks", "seed-mid-epoch.json".into(), serde_json::to_vec(&mid).unwrap()),
    ]
}
