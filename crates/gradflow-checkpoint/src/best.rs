//! The `best` pointer: which complete checkpoint scored best, by which test score.
//!
//! A job with `[checkpoint] keep_best` scores the model it checkpoints at every evaluation;
//! shard 0 offers each scored checkpoint here once it is complete
//! ([`CheckpointStore::offer_best`]). The pointer moves only to a complete checkpoint that
//! scores strictly better than the one it names (or when it names none that still exists, or
//! one measured by another score), and retention ([`CheckpointStore::finalize`]) never deletes
//! the checkpoint it names. `resolve("best")` reads it, so every `--step` and `restore` takes
//! `best` beside `latest`.
//!
//! ```text
//! <root>/best   {"checkpoint":"ckpt-000000000782","step":782,"metric":"test_auc","score":0.7396,...}
//! ```

use bytes::Bytes;
use gradflow_core::Metric;
use serde::{Deserialize, Serialize};

use crate::manifest::escaped;
use crate::store::MANIFEST;
use crate::{CheckpointError, CheckpointStore, checkpoint_dir_name, parse_checkpoint_dir_name};

/// Name of the pointer object at the root that names the best-scoring checkpoint.
pub const BEST: &str = "best";

/// A checkpoint's score: the job's evaluation of the model it holds.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct Score {
    /// The test score compared.
    pub metric: Metric,
    /// Its value.
    pub value: f64,
    /// The epoch (1-based) whose end the evaluation scored, when known.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub epoch: Option<u64>,
}

/// What the `best` pointer holds (JSON).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct BestPointer {
    /// The checkpoint's directory name (`ckpt-000000000782`).
    pub checkpoint: String,
    /// Its step.
    pub step: u64,
    /// The test score compared.
    pub metric: Metric,
    /// Its value for this checkpoint.
    pub score: f64,
    /// The epoch (1-based) whose end the evaluation scored, when known.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub epoch: Option<u64>,
    /// When the pointer was written.
    pub time: chrono::DateTime<chrono::Utc>,
}

impl CheckpointStore {
    /// What the `best` pointer says; `None` when there is none.
    pub async fn best(&self) -> Result<Option<BestPointer>, CheckpointError> {
        let Some(bytes) = self.get_opt(BEST).await? else { return Ok(None) };
        let pointer: BestPointer = serde_json::from_slice(&bytes).map_err(|e| CheckpointError::Corrupt {
            object: self.child_url(BEST),
            reason: format!("{} is not a best pointer: {e}", escaped(&bytes, 64)),
        })?;
        if parse_checkpoint_dir_name(&pointer.checkpoint) != Some(pointer.step) {
            return Err(CheckpointError::Corrupt {
                object: self.child_url(BEST),
                reason: format!("it names `{}` at step {}", pointer.checkpoint, pointer.step),
            });
        }
        Ok(Some(pointer))
    }

    /// The directory name `best` names, if there is a readable pointer (retention keeps it).
    /// A pointer that cannot be parsed names nothing; a store that cannot be read is an error,
    /// so that retention deletes nothing it might have been asked to keep.
    pub(crate) async fn best_dir(&self) -> Result<Option<String>, CheckpointError> {
        match self.best().await {
            Ok(best) => Ok(best.map(|b| b.checkpoint)),
            Err(CheckpointError::Corrupt { .. }) => Ok(None),
            Err(e) => Err(e),
        }
    }

    /// Offers checkpoint `step`, scored `score`, as the best one: points `best` at it when it
    /// is complete and scores strictly better than the checkpoint `best` names (or `best`
    /// names none, one that no longer exists, or one measured by another metric); then, with
    /// `keep` above 0, deletes the checkpoint `best` named before if the newest `keep` no
    /// longer hold it. Returns whether the pointer moved. A checkpoint that is not complete
    /// (yet) is not pointed at: offer it again once it is.
    pub async fn offer_best(&self, step: u64, score: Score, keep: usize) -> Result<bool, CheckpointError> {
        let dir = checkpoint_dir_name(step);
        if !self.exists(&format!("{dir}/{MANIFEST}")).await? {
            return Ok(false);
        }
        let current = match self.best().await {
            Ok(current) => current,
            // A pointer nobody can read is replaced, not trusted.
            Err(CheckpointError::Corrupt { .. }) => None,
            Err(e) => return Err(e),
        };
        if let Some(c) = &current {
            let alive = self.exists(&format!("{}/{MANIFEST}", c.checkpoint)).await?;
            if alive
                && c.metric == score.metric
                && (c.step == step || !score.metric.better(score.value, c.score))
            {
                return Ok(false);
            }
        }
        let pointer = BestPointer {
            checkpoint: dir,
            step,
            metric: score.metric,
            score: score.value,
            epoch: score.epoch,
            time: chrono::Utc::now(),
        };
        let json = serde_json::to_vec(&pointer).expect("a best pointer serializes");
        self.put_small(BEST, Bytes::from(json)).await?;
        if keep > 0 {
            self.prune(keep).await?;
        }
        Ok(true)
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    async fn checkpoint(store: &CheckpointStore, step: u64, keep: usize) {
        let mut snap = crate::snapshot::tiny();
        snap.version = step;
        store.write_shard(step, &snap).await.unwrap();
        store.finalize(step, 1, keep, Duration::ZERO).await.unwrap();
    }

    fn auc(value: f64) -> Score {
        Score { metric: Metric::TestAuc, value, epoch: None }
    }

    async fn steps(store: &CheckpointStore) -> Vec<u64> {
        store.list().await.unwrap().iter().map(|c| c.step).collect()
    }

    #[tokio::test]
    async fn retention_keeps_the_best_checkpoint_and_the_pointer_moves_only_to_a_better_one() {
        let store = CheckpointStore::open("memory://best-unit-retention").unwrap();
        assert_eq!(store.best().await.unwrap(), None);
        checkpoint(&store, 1, 2).await;
        assert!(store.offer_best(1, auc(0.74), 2).await.unwrap());
        for (step, score) in [(2, 0.71), (3, 0.66), (4, 0.65)] {
            checkpoint(&store, step, 2).await;
            assert!(!store.offer_best(step, auc(score), 2).await.unwrap());
        }
        // The newest 2 and the best.
        assert_eq!(steps(&store).await, vec![1, 3, 4]);
        let best = store.best().await.unwrap().unwrap();
        assert_eq!((best.step, best.checkpoint.as_str(), best.score), (1, "ckpt-000000000001", 0.74));
        assert_eq!(store.resolve(BEST).await.unwrap().step, 1);
        // A better one takes its place; the old best is then pruned like any other.
        checkpoint(&store, 5, 2).await;
        assert!(store.offer_best(5, auc(0.80), 2).await.unwrap());
        assert_eq!(steps(&store).await, vec![4, 5]);
        assert_eq!(store.resolve(BEST).await.unwrap().step, 5);
    }

    #[tokio::test]
    async fn only_complete_checkpoints_are_pointed_at_and_lower_loss_is_better() {
        let store = CheckpointStore::open("memory://best-unit-loss").unwrap();
        let loss = |value| Score { metric: Metric::TestLoss, value, epoch: Some(1) };
        // Files written, not finalized: not a checkpoint yet.
        let mut snap = crate::snapshot::tiny();
        snap.version = 3;
        store.write_shard(3, &snap).await.unwrap();
        assert!(!store.offer_best(3, loss(0.5), 0).await.unwrap());
        assert_eq!(store.best().await.unwrap(), None);
        store.finalize(3, 1, 0, Duration::ZERO).await.unwrap();
        assert!(store.offer_best(3, loss(0.5), 0).await.unwrap());
        checkpoint(&store, 4, 0).await;
        assert!(!store.offer_best(4, loss(0.6), 0).await.unwrap());
        checkpoint(&store, 5, 0).await;
        assert!(store.offer_best(5, loss(0.4), 0).await.unwrap());
        let best = store.best().await.unwrap().unwrap();
        assert_eq!((best.step, best.metric, best.epoch), (5, Metric::TestLoss, Some(1)));
        // A score by another metric replaces one by the old metric.
        assert!(store.offer_best(4, auc(0.1), 0).await.unwrap());
        assert_eq!(store.best().await.unwrap().unwrap().metric, Metric::TestAuc);
    }
}
