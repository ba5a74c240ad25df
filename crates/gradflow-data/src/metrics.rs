//! Evaluation metrics for binary classifiers: AUC, log loss, accuracy.
//!
//! Labels above 0.5 count as positive, so 0/1 labels and soft labels both work. All sums are
//! in `f64`: an `f32` running sum over millions of examples loses the digits being compared.

/// Area under the ROC curve: the probability that a random positive scores above a random
/// negative, ties counting one half (computed from average ranks, O(n log n)).
///
/// Returns NaN when all labels are of one class, since the AUC is then undefined.
///
/// # Panics
/// If `labels` and `scores` differ in length or a score is NaN.
pub fn auc(labels: &[f32], scores: &[f32]) -> f64 {
    assert_eq!(labels.len(), scores.len(), "auc: labels and scores differ in length");
    let mut order: Vec<usize> = (0..scores.len()).collect();
    order.sort_unstable_by(|&a, &b| scores[a].partial_cmp(&scores[b]).expect("auc: a score is NaN"));
    // Sum of the (1-based, tie-averaged) ranks of the positives.
    let mut positive_rank_sum = 0.0f64;
    let mut positives = 0u64;
    let mut i = 0;
    while i < order.len() {
        let mut j = i;
        while j + 1 < order.len() && scores[order[j + 1]] == scores[order[i]] {
            j += 1;
        }
        let average_rank = (i + j) as f64 / 2.0 + 1.0;
        for &k in &order[i..=j] {
            if labels[k] > 0.5 {
                positive_rank_sum += average_rank;
                positives += 1;
            }
        }
        i = j + 1;
    }
    let negatives = labels.len() as u64 - positives;
    if positives == 0 || negatives == 0 {
        return f64::NAN;
    }
    let p = positives as f64;
    (positive_rank_sum - p * (p + 1.0) / 2.0) / (p * negatives as f64)
}

/// Probabilities are clipped to `[EPS, 1 - EPS]` so one confident mistake gives a large but
/// finite loss.
const EPS: f64 = 1e-7;

/// Mean binary cross-entropy of predicted probabilities `probs` (natural log).
///
/// Labels may be soft (any value in `[0, 1]`). Returns NaN for empty input.
///
/// # Panics
/// If `labels` and `probs` differ in length.
pub fn log_loss(labels: &[f32], probs: &[f32]) -> f64 {
    assert_eq!(labels.len(), probs.len(), "log_loss: labels and probs differ in length");
    let sum: f64 = labels
        .iter()
        .zip(probs)
        .map(|(&y, &p)| {
            let (y, p) = (y as f64, (p as f64).clamp(EPS, 1.0 - EPS));
            -(y * p.ln() + (1.0 - y) * (1.0 - p).ln())
        })
        .sum();
    sum / labels.len() as f64
}

/// Mean binary cross-entropy computed from logits, exact even where the sigmoid would round
/// to 0 or 1 (no clipping).
///
/// # Panics
/// If `labels` and `logits` differ in length.
pub fn log_loss_from_logits(labels: &[f32], logits: &[f32]) -> f64 {
    assert_eq!(labels.len(), logits.len(), "log_loss_from_logits: lengths differ");
    let sum: f64 = labels
        .iter()
        .zip(logits)
        .map(|(&y, &z)| {
            let (y, z) = (y as f64, z as f64);
            // log(1 + e^z) - y z, written to not overflow for large |z|.
            z.max(0.0) - y * z + (-z.abs()).exp().ln_1p()
        })
        .sum();
    sum / labels.len() as f64
}

/// Fraction of examples where `prob > 0.5` agrees with `label > 0.5`. NaN for empty input.
///
/// # Panics
/// If `labels` and `probs` differ in length.
pub fn accuracy(labels: &[f32], probs: &[f32]) -> f64 {
    assert_eq!(labels.len(), probs.len(), "accuracy: labels and probs differ in length");
    let correct = labels.iter().zip(probs).filter(|&(&y, &p)| (p > 0.5) == (y > 0.5)).count();
    correct as f64 / labels.len() as f64
}

/// The logistic function, the map from logits to probabilities.
pub fn sigmoid(z: f32) -> f32 {
    1.0 / (1.0 + (-z).exp())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn small_cases() {
        assert_eq!(auc(&[0.0, 0.0, 1.0, 1.0], &[0.1, 0.2, 0.3, 0.4]), 1.0);
        assert_eq!(auc(&[1.0, 1.0, 0.0, 0.0], &[0.1, 0.2, 0.3, 0.4]), 0.0);
        assert_eq!(auc(&[0.0, 1.0], &[0.5, 0.5]), 0.5);
        assert_eq!(auc(&[0.0, 1.0, 0.0, 1.0], &[0.1, 0.3, 0.35, 0.8]), 0.75);
        assert!(auc(&[1.0, 1.0], &[0.1, 0.2]).is_nan());
        assert!((accuracy(&[1.0, 0.0, 1.0], &[0.9, 0.6, 0.2]) - 1.0 / 3.0).abs() < 1e-12);
        let l = log_loss(&[1.0, 0.0], &[0.8, 0.3]);
        assert!((l - (-(0.8f64.ln()) - 0.7f64.ln()) / 2.0).abs() < 1e-6);
    }

    #[test]
    fn logits_and_probs_agree() {
        let labels = [1.0, 0.0, 1.0, 0.0];
        let logits = [2.0f32, -1.0, -0.5, 3.0];
        let probs: Vec<f32> = logits.iter().map(|&z| sigmoid(z)).collect();
        assert!((log_loss(&labels, &probs) - log_loss_from_logits(&labels, &logits)).abs() < 1e-6);
        assert!(log_loss_from_logits(&[1.0], &[-1000.0]).is_finite());
    }
}
