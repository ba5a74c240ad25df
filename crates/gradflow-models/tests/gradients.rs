//! Finite-difference checks of every gradient the models return.

mod common;

use common::{Rng, check_gradients, random_batch, random_params};
use gradflow_data::Batch;
use gradflow_models::{
    Grads, Kernel, LogisticRegression, LogisticRegressionConfig, Model, WideDeep, WideDeepConfig,
};

const EPS: f32 = 1e-3;
const REL: f32 = 1e-2;
const ABS: f32 = 2e-4;

fn small_wide_deep(num_fields: usize, num_dense: usize, hidden: Vec<usize>, hash_buckets: u64) -> WideDeep {
    WideDeep::new(WideDeepConfig {
        embedding_dim: 3,
        hidden,
        hash_buckets,
        ..WideDeepConfig::new(num_fields, num_dense)
    })
    .unwrap()
}

/// Example 0 has two ids in field 0 and repeats one of them in field 1, and example 1 hits a
/// hash collision (ids 3 and 10 share bucket 3 of 7) across fields; the rest is random.
fn batch_with_duplicates(rng: &mut Rng) -> Batch {
    let mut batch = Batch::new(2);
    batch.push(1.0, &[0.3, -1.2], [(0, 5, 1.0), (0, 6, 1.0), (1, 5, 1.0), (2, 1, 0.7)]);
    batch.push(0.0, &[-0.5, 0.8], [(0, 3, 1.0), (2, 10, 1.0), (2, 3, 1.5)]);
    let more = random_batch(rng, 5, 3, 2, 2, 12);
    for i in 0..more.len() {
        let entries =
            more.sparse_range(i).map(|e| (more.sparse_fields[e], more.sparse_ids[e], more.sparse_values[e]));
        batch.push(more.labels[i], more.dense_row(i), entries.collect::<Vec<_>>());
    }
    batch
}

#[test]
fn wide_deep_gradients_match_finite_differences() {
    for kernel in Kernel::ALL {
        for seed in 0..4 {
            let mut rng = Rng::new(seed);
            let model = small_wide_deep(3, 2, vec![5, 4], 7).with_kernel(kernel);
            let batch = batch_with_duplicates(&mut rng);
            let params = random_params(&model, &batch, &mut rng, 0.5);
            let checked = check_gradients(&model, &batch, &params, EPS, REL, ABS);
            assert!(checked > 100, "{kernel:?}: {checked}");
        }
    }
}

/// The headline shapes (26 fields of 8, 13 dense, MLP 64-32) on a batch of 256, split into
/// chunks as training splits it: both kernels give the same loss and gradients, to float
/// rounding.
#[test]
fn wide_deep_kernels_agree_at_the_headline_shapes() {
    let mut rng = Rng::new(5);
    let config = WideDeepConfig { hash_buckets: 5000, ..WideDeepConfig::new(26, 13) };
    let models = Kernel::ALL.map(|k| WideDeep::new(config.clone()).unwrap().with_kernel(k));
    let batch = random_batch(&mut rng, 256, 26, 13, 2, 5000);
    let params = random_params(&models[0], &batch, &mut rng, 0.5);
    let results = models.map(|m| {
        let mut grads = Grads::default();
        let loss = m.forward_backward(&batch, &params, &mut grads).unwrap();
        (loss, grads)
    });
    let ((l0, g0), (l1, g1)) = (&results[0], &results[1]);
    assert!((l0 - l1).abs() <= 1e-5 * l0.abs().max(1.0), "loss {l0} vs {l1}");
    let pairs = g0
        .dense
        .iter()
        .zip(&g1.dense)
        .chain(g0.sparse.iter().map(|t| &t.values).zip(g1.sparse.iter().map(|t| &t.values)));
    let mut compared = 0;
    for (a, b) in pairs {
        assert_eq!(a.len(), b.len());
        let scale = a.iter().fold(0.0f32, |m, x| m.max(x.abs())).max(1e-6);
        for (x, y) in a.iter().zip(b) {
            assert!((x - y).abs() <= 1e-4 * scale, "{x} vs {y} (largest {scale})");
            compared += 1;
        }
    }
    assert!(compared > 10_000, "{compared}");
}

#[test]
fn wide_deep_without_hidden_layers_or_hashing() {
    let mut rng = Rng::new(11);
    let model = small_wide_deep(2, 3, vec![], 0);
    let batch = random_batch(&mut rng, 6, 2, 3, 3, 1000);
    let params = random_params(&model, &batch, &mut rng, 0.5);
    check_gradients(&model, &batch, &params, EPS, REL, ABS);
}

#[test]
fn wide_deep_dense_only_with_sparse_entries_in_the_wide_part() {
    let mut rng = Rng::new(12);
    let model = small_wide_deep(0, 4, vec![6, 3], 0);
    assert_eq!(model.spec().sparse.len(), 1, "no embedding table without fields");
    // Fields are free when num_fields is 0: every entry only feeds the wide part.
    let batch = random_batch(&mut rng, 7, 5, 4, 2, 9);
    let params = random_params(&model, &batch, &mut rng, 0.5);
    check_gradients(&model, &batch, &params, EPS, REL, ABS);
    let dense_only = random_batch(&mut rng, 7, 0, 4, 0, 1);
    let params = random_params(&model, &dense_only, &mut rng, 0.5);
    check_gradients(&model, &dense_only, &params, EPS, REL, ABS);
}

#[test]
fn wide_deep_with_more_rows_pulled_for_one_table() {
    // A worker may pull a superset of the ids; the extra rows get zero gradients, and the rows
    // of the embedding table are then found through its own ids, not the wide table's.
    let mut rng = Rng::new(13);
    let model = small_wide_deep(3, 2, vec![4], 7);
    let batch = batch_with_duplicates(&mut rng);
    let mut params = random_params(&model, &batch, &mut rng, 0.5);
    let emb = &params.sparse[1];
    let mut rows = emb.clone();
    // Bucketed ids are below 7, so 100 sorts last and is touched by no example.
    rows.ids.push(100);
    rows.values.extend((0..emb.dim).map(|_| rng.normal()));
    params.sparse[1] = rows;
    check_gradients(&model, &batch, &params, EPS, REL, ABS);
    let mut grads = gradflow_models::Grads::default();
    model.forward_backward(&batch, &params, &mut grads).unwrap();
    assert_eq!(grads.sparse[1].ids.last(), Some(&100));
    assert!(grads.sparse[1].row(grads.sparse[1].len() - 1).iter().all(|&g| g == 0.0));
}

#[test]
fn logistic_regression_gradients_match_finite_differences() {
    for (seed, hash_buckets, num_dense) in [(0, 0, 0), (1, 5, 3), (2, 0, 4)] {
        let mut rng = Rng::new(seed);
        let model = LogisticRegression::new(LogisticRegressionConfig {
            hash_buckets,
            num_dense,
            ..LogisticRegressionConfig::default()
        })
        .unwrap();
        let batch = random_batch(&mut rng, 8, 3, num_dense, 3, 20);
        let params = random_params(&model, &batch, &mut rng, 0.5);
        check_gradients(&model, &batch, &params, EPS, REL, ABS);
    }
}
