//! `LocalTrainer`: it learns, and it applies the optimizers exactly as a parameter server would.

mod common;

use std::collections::HashMap;

use common::Rng;
use gradflow_core::OptimizerConfig;
use gradflow_data::Batch;
use gradflow_data::metrics::auc;
use gradflow_models::{
    Grads, LocalTrainer, LogisticRegression, LogisticRegressionConfig, Model, ModelConfig, WideDeep,
    WideDeepConfig, build,
};

/// A sparse row as the reference server holds it: values, optimizer state, update count.
type ServerRow = (Vec<f32>, Vec<f32>, u64);

/// A separable click problem: each categorical value and dense feature has a hidden weight, and
/// the label says whether their sum is positive. Each categorical value has a random 64-bit id,
/// as hashed categorical data does.
struct Problem {
    num_fields: u32,
    vocab: u64,
    value_weights: Vec<f32>,
    value_ids: Vec<u64>,
    dense_weights: Vec<f32>,
    rng: Rng,
}

impl Problem {
    fn new(num_fields: u32, vocab: u64, num_dense: usize, seed: u64) -> Problem {
        let mut rng = Rng::new(seed);
        let value_weights = (0..num_fields as u64 * vocab).map(|_| rng.normal()).collect();
        let value_ids = (0..num_fields as u64 * vocab).map(|_| rng.next_u64()).collect();
        let dense_weights = (0..num_dense).map(|_| rng.normal()).collect();
        Problem { num_fields, vocab, value_weights, value_ids, dense_weights, rng }
    }

    fn batch(&mut self, n: usize) -> Batch {
        let mut batch = Batch::new(self.dense_weights.len());
        for _ in 0..n {
            let dense: Vec<f32> = self.dense_weights.iter().map(|_| self.rng.normal()).collect();
            let mut logit: f32 = dense.iter().zip(&self.dense_weights).map(|(x, w)| x * w).sum();
            let mut sparse = Vec::new();
            for f in 0..self.num_fields {
                let v = self.rng.below(self.vocab);
                let k = (f as u64 * self.vocab + v) as usize;
                logit += self.value_weights[k];
                sparse.push((f, self.value_ids[k], 1.0));
            }
            batch.push((logit > 0.0) as u32 as f32, &dense, sparse);
        }
        batch
    }
}

/// Trains for `steps` batches of 128 and returns (first loss, last loss, held-out AUC).
fn train(model: Box<dyn Model>, problem: &mut Problem, steps: usize) -> (f32, f32, f64) {
    let mut trainer = LocalTrainer::new(model).unwrap();
    let test = problem.batch(2000);
    let mut losses = Vec::new();
    for _ in 0..steps {
        let batch = problem.batch(128);
        losses.push(trainer.train_step(&batch).unwrap());
    }
    let mut probs = Vec::new();
    trainer.predict(&test, &mut probs).unwrap();
    assert_eq!(trainer.steps(), steps as u64);
    let head: f32 = losses[..10].iter().sum::<f32>() / 10.0;
    let tail: f32 = losses[steps - 10..].iter().sum::<f32>() / 10.0;
    let auc = auc(&test.labels, &probs);
    eprintln!("loss {head:.4} -> {tail:.4}, held-out AUC {auc:.4}");
    (head, tail, auc)
}

#[test]
fn logistic_regression_learns_a_separable_problem() {
    // 180 values in 10007 buckets: a collision or two, as hashing brings.
    for hash_buckets in [0, 10_007] {
        let mut problem = Problem::new(6, 30, 3, 1);
        let config = LogisticRegressionConfig { hash_buckets, num_dense: 3, ..Default::default() };
        let (head, tail, auc) = train(Box::new(LogisticRegression::new(config).unwrap()), &mut problem, 300);
        assert!(tail < head * 0.7, "loss {head} -> {tail}");
        assert!(auc > 0.9, "AUC {auc}");
    }
}

#[test]
fn wide_deep_learns_a_separable_problem() {
    let mut problem = Problem::new(6, 30, 3, 2);
    let config = WideDeepConfig { hash_buckets: 100_000, hidden: vec![16, 8], ..WideDeepConfig::new(6, 3) };
    let (head, tail, auc) = train(build(&ModelConfig::WideDeep(config)).unwrap(), &mut problem, 300);
    assert!(tail < head * 0.7, "loss {head} -> {tail}");
    assert!(auc > 0.9, "AUC {auc}");
}

#[test]
fn dense_only_wide_deep_learns() {
    // Shaped like the breast cancer data: 30 dense features and no categorical ones.
    let mut problem = Problem::new(0, 1, 30, 3);
    let config = WideDeepConfig { hidden: vec![16, 8], ..WideDeepConfig::new(0, 30) };
    let (head, tail, auc) = train(Box::new(WideDeep::new(config).unwrap()), &mut problem, 200);
    assert!(tail < head * 0.7, "loss {head} -> {tail}");
    assert!(auc > 0.9, "AUC {auc}");
}

/// Replays a trainer's steps by hand: pull, forward/backward, then the optimizer kernels with
/// per-tensor and per-row step counts, as a parameter server applies them. Small batches, and
/// batches of over a thousand rows, which the trainer updates on two threads.
#[test]
fn trainer_applies_the_optimizers_as_a_server_would() {
    for optimizer in [OptimizerConfig::adam(0.01), OptimizerConfig::ftrl(0.1), OptimizerConfig::adagrad(0.05)]
    {
        replay_against_a_server(optimizer.clone(), 50, 40, 20);
        replay_against_a_server(optimizer, 1_000_000, 5000, 600);
    }
}

fn replay_against_a_server(optimizer: OptimizerConfig, hash_buckets: u64, vocab: u64, batch_size: usize) {
    {
        let config = WideDeepConfig {
            hash_buckets,
            embedding_dim: 4,
            hidden: vec![6],
            sparse_optimizer: optimizer.clone(),
            dense_optimizer: OptimizerConfig::adam(0.02),
            ..WideDeepConfig::new(3, 2)
        };
        let model = WideDeep::new(config.clone()).unwrap();
        let mut trainer = LocalTrainer::new(Box::new(WideDeep::new(config).unwrap())).unwrap();
        let mut problem = Problem::new(3, vocab, 2, 4);

        // The reference: the full state of a tiny "server".
        let mut params = trainer.pull(&Batch::new(2));
        let mut dense_state: Vec<Vec<f32>> = params
            .dense
            .iter()
            .map(|d| {
                let mut s = vec![0.0; OptimizerConfig::adam(0.02).num_slots() * d.len()];
                OptimizerConfig::adam(0.02).init_state(&mut s);
                s
            })
            .collect();
        // Per table: id -> (values, optimizer state, update count).
        let mut rows: Vec<HashMap<u64, ServerRow>> = vec![HashMap::new(); 2];
        let mut grads = Grads::default();
        for step in 1..=5u64 {
            let batch = problem.batch(batch_size);
            let pulled = trainer.pull(&batch);
            // Rows the reference has seen carry their trained values; new ones their initial ones.
            let mut mine = pulled.clone();
            for (t, table) in mine.sparse.iter_mut().enumerate() {
                for k in 0..table.ids.len() {
                    let dim = table.dim;
                    let id = table.ids[k];
                    let entry = rows[t].entry(id).or_insert_with(|| {
                        let mut state = vec![0.0; optimizer.num_slots() * dim];
                        optimizer.init_state(&mut state);
                        (pulled.sparse[t].row(k).to_vec(), state, 0)
                    });
                    table.values[k * dim..(k + 1) * dim].copy_from_slice(&entry.0);
                }
            }
            mine.dense.clone_from(&params.dense);
            assert_eq!(mine, pulled, "trainer and reference hold the same values before step {step}");

            let loss = model.forward_backward(&batch, &mine, &mut grads).unwrap();
            for ((p, g), s) in params.dense.iter_mut().zip(&grads.dense).zip(&mut dense_state) {
                OptimizerConfig::adam(0.02).step(p, g, s, step);
            }
            for (t, table) in grads.sparse.iter().enumerate() {
                for (k, &id) in table.ids.iter().enumerate() {
                    let (values, state, count) = rows[t].get_mut(&id).unwrap();
                    *count += 1;
                    optimizer.step(values, table.row(k), state, *count);
                }
            }
            assert_eq!(trainer.train_step(&batch).unwrap(), loss);
        }
        for (t, name) in ["wide", "embedding"].into_iter().enumerate() {
            assert_eq!(trainer.num_rows(name), rows[t].len());
            for (&id, (values, _, count)) in &rows[t] {
                assert_eq!(trainer.sparse_row(name, id).unwrap(), values.as_slice(), "{name} row {id}");
                assert_eq!(trainer.sparse_row_steps(name, id), *count);
            }
        }
        for (d, values) in model.spec().dense.iter().zip(&params.dense) {
            assert_eq!(trainer.dense(&d.name).unwrap(), values.as_slice(), "{}", d.name);
        }
    }
}

#[test]
fn trainer_starts_from_the_spec_initializers() {
    let model = WideDeep::new(WideDeepConfig::new(2, 1)).unwrap();
    let spec = model.spec().clone();
    let trainer = LocalTrainer::new(Box::new(model)).unwrap();
    for d in &spec.dense {
        let mut expected = vec![0.0; d.numel() as usize];
        d.init.fill_dense(&d.name, &d.shape, 0, &mut expected);
        assert_eq!(trainer.dense(&d.name).unwrap(), expected.as_slice());
    }
    assert!(trainer.dense("deep_w0").unwrap().iter().any(|&w| w != 0.0));
    // Predicting pulls rows as a server would but does not create them.
    let mut batch = Batch::new(1);
    batch.push(1.0, &[0.5], [(0, 7, 1.0), (1, 9, 1.0)]);
    let params = trainer.pull(&batch);
    let mut row = vec![0.0; 8];
    spec.sparse[1].init.fill_row("embedding", 7, &mut row);
    assert_eq!(params.sparse[1].row(0), row.as_slice());
    let mut probs = Vec::new();
    trainer.predict(&batch, &mut probs).unwrap();
    assert_eq!(trainer.num_rows("embedding"), 0);
    assert!(probs[0] > 0.0 && probs[0] < 1.0);
}

/// Wide & deep, except that the embedding table is pulled for one id fewer than the wide table
/// on batches of more than one example, although it says both always share their ids (or
/// whatever `shared_ids` it is given).
struct BrokenPromise(WideDeep, Vec<usize>);

impl Model for BrokenPromise {
    fn spec(&self) -> &gradflow_core::ModelSpec {
        self.0.spec()
    }
    fn num_dense(&self) -> usize {
        self.0.num_dense()
    }
    fn sparse_ids(&self, batch: &Batch, out: &mut Vec<Vec<u64>>) {
        self.0.sparse_ids(batch, out);
        if batch.len() > 1 {
            out[1].pop();
        }
    }
    fn shared_ids(&self) -> Vec<usize> {
        self.1.clone()
    }
    fn forward_backward(
        &self,
        batch: &Batch,
        params: &gradflow_models::Params,
        grads: &mut Grads,
    ) -> Result<f32, gradflow_models::ModelError> {
        self.0.forward_backward(batch, params, grads)
    }
    fn predict(
        &self,
        batch: &Batch,
        params: &gradflow_models::Params,
        out: &mut Vec<f32>,
    ) -> Result<(), gradflow_models::ModelError> {
        self.0.predict(batch, params, out)
    }
}

#[test]
fn tables_said_to_share_ids_share_rows_and_a_batch_that_breaks_that_is_refused() {
    let model = WideDeep::new(WideDeepConfig::new(2, 1)).unwrap();
    assert_eq!(model.shared_ids(), vec![0, 0], "wide & deep pulls its embeddings for the wide ids");
    let shared = model.shared_ids();
    let mut trainer = LocalTrainer::new(Box::new(BrokenPromise(model, shared))).unwrap();
    let mut problem = Problem::new(2, 10, 1, 9);
    trainer.train_step(&problem.batch(1)).unwrap();
    let (wide, embedding) = (trainer.num_rows("wide"), trainer.num_rows("embedding"));
    assert_eq!((wide, embedding), (2, 2));
    let err = trainer.train_step(&problem.batch(8)).unwrap_err();
    assert!(err.to_string().contains("`wide` and `embedding` are always pulled for the same ids"), "{err}");
    assert_eq!(trainer.steps(), 1, "nothing of the refused batch was trained");
    assert_eq!((trainer.num_rows("wide"), trainer.num_rows("embedding")), (2, 2), "nor any row created");

    for nonsense in [vec![0], vec![1, 0], vec![0, 2], vec![0, 0, 0]] {
        let model = BrokenPromise(WideDeep::new(WideDeepConfig::new(2, 1)).unwrap(), nonsense.clone());
        let err = LocalTrainer::new(Box::new(model)).err().expect("refused");
        assert!(err.to_string().contains("itself or a table before it"), "{nonsense:?}: {err}");
    }
    // Tables on their own (the default) are pulled for their own ids: the trainer does not
    // object, the model then misses the row it was not given.
    let model = BrokenPromise(WideDeep::new(WideDeepConfig::new(2, 1)).unwrap(), vec![0, 1]);
    let mut trainer = LocalTrainer::new(Box::new(model)).unwrap();
    let err = trainer.train_step(&problem.batch(8)).unwrap_err();
    assert!(
        matches!(err, gradflow_models::ModelError::MissingRow { ref table, .. } if table == "embedding"),
        "{err}"
    );
    assert_eq!(trainer.num_rows("wide"), trainer.num_rows("embedding") + 1);
}
