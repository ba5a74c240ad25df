//! Checks SGD, Adagrad, Adam and AdamW against trajectories recorded from `torch.optim`.
//!
//! `data/optimizer_reference_torch.json` (copied from the project's shared data) holds, for each
//! case, PyTorch's hyperparameters, an initial parameter vector, the gradient set before each
//! `step()` and the parameters after it, all computed in float64. Our kernels run in f32, so
//! each value must match to 1e-6 relative (absolute below 1).

use gradflow_core::OptimizerConfig;
use serde::Deserialize;
use serde_json::{Map, Value};

#[derive(Deserialize)]
struct Reference {
    source: String,
    cases: Vec<Case>,
}

#[derive(Deserialize)]
struct Case {
    name: String,
    optimizer: String,
    hyperparameters: Map<String, Value>,
    initial: Vec<f64>,
    gradients: Vec<Vec<f64>>,
    after_each_step: Vec<Vec<f64>>,
}

const TOLERANCE: f64 = 1e-6;

fn load() -> Reference {
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/data/optimizer_reference_torch.json");
    let text = std::fs::read_to_string(path).unwrap_or_else(|e| panic!("reading {path}: {e}"));
    serde_json::from_str(&text).unwrap_or_else(|e| panic!("parsing {path}: {e}"))
}

/// The config exactly as a user would write it: `{"kind": ..., ...PyTorch hyperparameters}`.
fn config(case: &Case) -> OptimizerConfig {
    let mut json = case.hyperparameters.clone();
    json.insert("kind".into(), Value::String(case.optimizer.clone()));
    let json = Value::Object(json);
    serde_json::from_value(json.clone())
        .unwrap_or_else(|e| panic!("case `{}`: config {json} does not parse: {e}", case.name))
}

#[test]
fn optimizers_match_pytorch() {
    let reference = load();
    assert!(
        !reference.cases.is_empty(),
        "no cases in the reference file ({}): the test would prove nothing",
        reference.source
    );
    let mut kinds = std::collections::BTreeSet::new();
    let mut max_rel = 0.0f64;
    let mut checked = 0usize;
    for case in &reference.cases {
        let mut case_max = 0.0f64;
        let config = config(case);
        config.validate(&case.name).unwrap();
        kinds.insert(config.kind());
        assert_eq!(case.gradients.len(), case.after_each_step.len(), "case `{}`", case.name);
        assert!(!case.gradients.is_empty(), "case `{}` has no steps", case.name);

        let n = case.initial.len();
        let mut param: Vec<f32> = case.initial.iter().map(|&x| x as f32).collect();
        let mut state = vec![f32::NAN; config.num_slots() * n];
        config.init_state(&mut state);
        let mut grad = vec![0.0f32; n];
        for (t, (g, want)) in case.gradients.iter().zip(&case.after_each_step).enumerate() {
            assert_eq!((g.len(), want.len()), (n, n), "case `{}` step {}", case.name, t + 1);
            for (dst, &src) in grad.iter_mut().zip(g) {
                *dst = src as f32;
            }
            config.step(&mut param, &grad, &mut state, t as u64 + 1);
            for (i, (&got, &want)) in param.iter().zip(want).enumerate() {
                let err = (f64::from(got) - want).abs() / want.abs().max(1.0);
                case_max = case_max.max(err);
                checked += 1;
                assert!(
                    err <= TOLERANCE,
                    "case `{}` ({config:?}), step {}, element {i}: got {got}, PyTorch {want} \
                     (error {err:e})",
                    case.name,
                    t + 1
                );
            }
        }
        println!("case `{}`: max error {case_max:e}", case.name);
        max_rel = max_rel.max(case_max);
    }
    let cases = reference.cases.len();
    println!("{cases} cases, {checked} values, kinds {kinds:?}: max error {max_rel:e}");
    for kind in ["sgd", "adagrad", "adam", "adamw"] {
        assert!(kinds.contains(kind), "the reference file has no `{kind}` case");
    }
}
