//! Metrics against brute-force definitions.

use gradflow_data::metrics::{accuracy, auc, log_loss};
use proptest::prelude::*;

/// The AUC by definition: over all (positive, negative) pairs, 1 if the positive scores
/// higher, 1/2 on a tie.
fn pairwise_auc(labels: &[f32], scores: &[f32]) -> f64 {
    let (mut wins, mut pairs) = (0.0, 0.0);
    for i in 0..labels.len() {
        for j in 0..labels.len() {
            if labels[i] > 0.5 && labels[j] <= 0.5 {
                pairs += 1.0;
                if scores[i] > scores[j] {
                    wins += 1.0;
                } else if scores[i] == scores[j] {
                    wins += 0.5;
                }
            }
        }
    }
    wins / pairs
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(300))]

    /// Scores from a small set, so ties are common.
    #[test]
    fn auc_matches_pairwise_count(data in proptest::collection::vec((any::<bool>(), 0u8..12), 2..120)) {
        let labels: Vec<f32> = data.iter().map(|d| d.0 as u8 as f32).collect();
        let scores: Vec<f32> = data.iter().map(|d| d.1 as f32 / 4.0).collect();
        let both = labels.contains(&0.0) && labels.contains(&1.0);
        let got = auc(&labels, &scores);
        if both {
            prop_assert!((got - pairwise_auc(&labels, &scores)).abs() < 1e-12, "{got}");
        } else {
            prop_assert!(got.is_nan());
        }
    }

    #[test]
    fn accuracy_and_log_loss_by_definition(data in proptest::collection::vec((any::<bool>(), 0.001f32..0.999), 1..50)) {
        let labels: Vec<f32> = data.iter().map(|d| d.0 as u8 as f32).collect();
        let probs: Vec<f32> = data.iter().map(|d| d.1).collect();
        let correct = data.iter().filter(|d| (d.1 > 0.5) == d.0).count();
        prop_assert!((accuracy(&labels, &probs) - correct as f64 / data.len() as f64).abs() < 1e-12);
        let ll: f64 = data.iter().map(|d| -((if d.0 { d.1 } else { 1.0 - d.1 }) as f64).ln()).sum::<f64>() / data.len() as f64;
        prop_assert!((log_loss(&labels, &probs) - ll).abs() < 1e-5);
    }
}
