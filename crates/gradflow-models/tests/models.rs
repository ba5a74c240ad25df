//! Behaviour of the models apart from gradient values: ids, predictions, chunking, configs and
//! errors.

mod common;

use common::{Rng, random_batch, random_params};
use gradflow_data::Batch;
use gradflow_models::{
    Grads, LogisticRegression, LogisticRegressionConfig, Model, ModelConfig, ModelError, WideDeep,
    WideDeepConfig, build,
};
use proptest::prelude::*;

fn wide_deep(num_fields: usize, num_dense: usize, hash_buckets: u64) -> WideDeep {
    WideDeep::new(WideDeepConfig {
        embedding_dim: 4,
        hidden: vec![8, 4],
        hash_buckets,
        ..WideDeepConfig::new(num_fields, num_dense)
    })
    .unwrap()
}

fn models() -> Vec<Box<dyn Model>> {
    vec![
        Box::new(wide_deep(3, 2, 50)),
        Box::new(wide_deep(0, 2, 0)),
        Box::new(
            LogisticRegression::new(LogisticRegressionConfig { num_dense: 2, ..Default::default() }).unwrap(),
        ),
        Box::new(
            LogisticRegression::new(LogisticRegressionConfig {
                num_dense: 2,
                hash_buckets: 17,
                ..Default::default()
            })
            .unwrap(),
        ),
    ]
}

/// Just the examples `range` of `batch`.
fn slice(batch: &Batch, range: std::ops::Range<usize>) -> Batch {
    let mut out = Batch::new(batch.num_dense);
    for i in range {
        let entries: Vec<_> = batch
            .sparse_range(i)
            .map(|e| (batch.sparse_fields[e], batch.sparse_ids[e], batch.sparse_values[e]))
            .collect();
        out.push(batch.labels[i], batch.dense_row(i), entries);
    }
    out
}

#[test]
fn predict_is_the_sigmoid_of_the_logit_forward_trains_on() {
    // On a one-example batch the loss is -ln p or -ln(1 - p), which pins down p.
    for model in models() {
        let mut rng = Rng::new(3);
        let batch = random_batch(&mut rng, 40, 3, 2, 2, 200);
        let params = random_params(model.as_ref(), &batch, &mut rng, 0.5);
        let mut probs = Vec::new();
        model.predict(&batch, &params, &mut probs).unwrap();
        assert_eq!(probs.len(), batch.len());
        let mut grads = Grads::default();
        let mut mean = 0.0f64;
        for (i, &p) in probs.iter().enumerate() {
            let one = slice(&batch, i..i + 1);
            let loss = model.forward_backward(&one, &params, &mut grads).unwrap();
            let expected = if one.labels[0] > 0.5 { -p.ln() } else { -(1.0 - p).ln() };
            assert!(
                (loss - expected).abs() <= 1e-5 * (1.0 + expected.abs()),
                "example {i}: {loss} vs {expected}"
            );
            mean += loss as f64;
        }
        let loss = model.forward_backward(&batch, &params, &mut grads).unwrap();
        assert!((loss as f64 - mean / batch.len() as f64).abs() < 1e-5);
    }
}

#[test]
fn results_do_not_depend_on_how_the_batch_is_split_across_threads() {
    for model in models() {
        let mut rng = Rng::new(5);
        let batch = random_batch(&mut rng, 6000, 3, 2, 2, 300);
        let params = random_params(model.as_ref(), &batch, &mut rng, 0.3);
        let run = |threads: usize| {
            let pool = rayon::ThreadPoolBuilder::new().num_threads(threads).build().unwrap();
            pool.install(|| {
                let mut grads = Grads::default();
                let loss = model.forward_backward(&batch, &params, &mut grads).unwrap();
                let mut probs = Vec::new();
                model.predict(&batch, &params, &mut probs).unwrap();
                (loss, grads, probs)
            })
        };
        let (loss1, grads1, probs1) = run(1);
        let (loss4, grads4, probs4) = run(4);
        assert!((loss1 - loss4).abs() < 1e-6);
        assert_eq!(probs1, probs4, "each example's forward is the same arithmetic in any chunk");
        let all = |g: &Grads| -> Vec<f32> {
            g.dense.iter().flatten().chain(g.sparse.iter().flat_map(|s| &s.values)).copied().collect()
        };
        for (a, b) in all(&grads1).iter().zip(&all(&grads4)) {
            assert!((a - b).abs() <= 1e-6 + 1e-4 * a.abs().max(b.abs()), "{a} vs {b}");
        }
    }
}

#[test]
fn grads_reuse_buffers_and_are_reset_between_batches() {
    let model = wide_deep(3, 2, 50);
    let mut rng = Rng::new(8);
    let first = random_batch(&mut rng, 30, 3, 2, 2, 200);
    let second = random_batch(&mut rng, 10, 3, 2, 2, 200);
    let p1 = random_params(&model, &first, &mut rng, 0.3);
    let p2 = random_params(&model, &second, &mut rng, 0.3);
    let mut reused = Grads::default();
    model.forward_backward(&first, &p1, &mut reused).unwrap();
    model.forward_backward(&second, &p2, &mut reused).unwrap();
    let mut fresh = Grads::default();
    model.forward_backward(&second, &p2, &mut fresh).unwrap();
    assert_eq!(reused, fresh);
}

#[test]
fn empty_batch_has_zero_loss_and_zero_gradients() {
    for model in models() {
        let batch = Batch::new(2);
        let params = random_params(model.as_ref(), &batch, &mut Rng::new(1), 0.3);
        let mut grads = Grads::default();
        assert_eq!(model.forward_backward(&batch, &params, &mut grads).unwrap(), 0.0);
        assert!(grads.dense.iter().flatten().all(|&g| g == 0.0));
        let mut probs = vec![1.0];
        model.predict(&batch, &params, &mut probs).unwrap();
        assert!(probs.is_empty());
    }
}

proptest! {
    #[test]
    fn sparse_ids_are_the_sorted_unique_bucketed_ids(
        examples in prop::collection::vec(
            prop::collection::vec((0u32..3, any::<u64>(), 0.1f32..2.0), 0..6),
            0..12,
        ),
        buckets in prop_oneof![Just(0u64), 1u64..40],
    ) {
        let mut batch = Batch::new(0);
        for entries in &examples {
            // Small ids too, so that duplicates within and across examples are common.
            let small = |id: u64| if id.is_multiple_of(2) { id % 10 } else { id };
            batch.push(1.0, &[], entries.iter().map(|&(f, id, v)| (f, small(id), v)));
        }
        let lr_config = LogisticRegressionConfig { hash_buckets: buckets, ..Default::default() };
        let lr = LogisticRegression::new(lr_config).unwrap();
        let wd_config = WideDeepConfig { hash_buckets: buckets, ..WideDeepConfig::new(3, 0) };
        let wd = WideDeep::new(wd_config).unwrap();
        let mut expected: Vec<u64> =
            batch.sparse_ids.iter().map(|&id| if buckets == 0 { id } else { id % buckets }).collect();
        expected.sort_unstable();
        expected.dedup();
        let mut out = vec![vec![7, 7, 7]; 5];
        lr.sparse_ids(&batch, &mut out);
        prop_assert_eq!(&out, &vec![expected.clone()]);
        wd.sparse_ids(&batch, &mut out);
        prop_assert_eq!(&out, &vec![expected.clone(), expected]);
    }
}

#[test]
fn inputs_that_do_not_fit_the_model_are_typed_errors() {
    let model = wide_deep(3, 2, 50);
    let mut rng = Rng::new(2);
    let batch = random_batch(&mut rng, 5, 3, 2, 2, 200);
    let params = random_params(&model, &batch, &mut rng, 0.3);
    let mut grads = Grads::default();

    let mut bad_field = batch.clone();
    bad_field.push(1.0, &[0.0, 0.0], [(3, 1, 1.0)]);
    let p = random_params(&model, &bad_field, &mut rng, 0.3);
    assert_eq!(
        model.forward_backward(&bad_field, &p, &mut grads),
        Err(ModelError::FieldOutOfRange { field: 3, num_fields: 3 })
    );

    let wrong_width = random_batch(&mut rng, 5, 3, 4, 2, 200);
    assert_eq!(
        model.forward_backward(&wrong_width, &params, &mut grads),
        Err(ModelError::DenseFeatureCount { expected: 2, got: 4 })
    );

    let mut missing = params.clone();
    let id = missing.sparse[0].ids.remove(0);
    missing.sparse[0].values.remove(0);
    assert_eq!(
        model.forward_backward(&batch, &missing, &mut grads),
        Err(ModelError::MissingRow { table: "wide".into(), id })
    );

    let mut unsorted = params.clone();
    unsorted.sparse[1].ids.reverse();
    assert!(matches!(
        model.forward_backward(&batch, &unsorted, &mut grads),
        Err(ModelError::ParamsMismatch(_))
    ));
    let mut short = params.clone();
    short.dense[1].pop();
    let err = model.predict(&batch, &short, &mut Vec::new());
    assert!(matches!(err, Err(ModelError::ParamsMismatch(m)) if m.contains("deep_w0")));

    let mut malformed = batch.clone();
    malformed.sparse_values.pop();
    assert!(matches!(
        model.forward_backward(&malformed, &params, &mut grads),
        Err(ModelError::MalformedBatch(_))
    ));
}

#[test]
fn configs_parse_with_defaults_and_refuse_unknown_fields() {
    let config: ModelConfig =
        serde_json::from_str(r#"{"kind": "wide_deep", "num_fields": 26, "num_dense": 13}"#).unwrap();
    let ModelConfig::WideDeep(wd) = &config else { panic!("{config:?}") };
    assert_eq!(wd, &WideDeepConfig::new(26, 13));
    assert_eq!(wd.hash_buckets, 1_000_000);
    assert_eq!(wd.hidden, vec![64, 32]);
    let model = build(&config).unwrap();
    let names: Vec<&str> = model.spec().dense.iter().map(|d| d.name.as_str()).collect();
    assert_eq!(names, ["wide_bias", "deep_w0", "deep_b0", "deep_w1", "deep_b1", "deep_w2", "deep_b2"]);
    assert_eq!(model.spec().dense[1].shape, vec![26 * 8 + 13, 64]);
    assert_eq!(model.spec().sparse.iter().map(|s| s.dim).collect::<Vec<_>>(), [1, 8]);

    let lr: ModelConfig = serde_json::from_str(
        r#"{"kind": "logistic_regression", "num_dense": 3, "optimizer": {"kind": "ftrl", "lr": 0.1}}"#,
    )
    .unwrap();
    let model = build(&lr).unwrap();
    assert_eq!(model.num_dense(), 3);
    assert_eq!(model.spec().sparse[0].optimizer.kind(), "ftrl");
    assert_eq!(model.spec().dense[0].optimizer.kind(), "ftrl", "dense optimizer defaults to the sparse one");

    for bad in [
        r#"{"kind": "wide_deep", "num_fields": 26, "num_dense": 13, "hiden": [3]}"#,
        r#"{"kind": "logistic_regression", "buckets": 3}"#,
        r#"{"kind": "mlp"}"#,
        r#"{"kind": "wide_deep", "num_dense": 13}"#,
    ] {
        assert!(serde_json::from_str::<ModelConfig>(bad).is_err(), "{bad}");
    }
    let round_trip: ModelConfig = serde_json::from_str(&serde_json::to_string(&lr).unwrap()).unwrap();
    assert_eq!(round_trip, lr);
}

#[test]
fn invalid_configs_are_refused() {
    let bad = |c: WideDeepConfig| matches!(WideDeep::new(c), Err(ModelError::InvalidConfig(_)));
    assert!(bad(WideDeepConfig::new(0, 0)));
    assert!(bad(WideDeepConfig { hidden: vec![8, 0], ..WideDeepConfig::new(2, 2) }));
    assert!(bad(WideDeepConfig { embedding_dim: 0, ..WideDeepConfig::new(2, 2) }));
    let lr = LogisticRegressionConfig {
        optimizer: gradflow_core::OptimizerConfig::adagrad(-1.0),
        ..Default::default()
    };
    assert!(matches!(LogisticRegression::new(lr), Err(ModelError::Spec(_))));
}
