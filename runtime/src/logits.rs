//! Reading a row of logits as log-probabilities: scoring text (perplexity,
//! the bias pairs) sums many of them, so they are taken in f64.

/// `log softmax(row)[index]` in f64: the log-probability the logits `row`
/// give token `index`. The maximum is subtracted before exponentiating, so
/// large logits do not overflow.
pub fn log_softmax_at(row: &[f32], index: usize) -> f64 {
    let max = row.iter().fold(f32::NEG_INFINITY, |m, &v| m.max(v)) as f64;
    let log_sum = row.iter().map(|&v| (v as f64 - max).exp()).sum::<f64>().ln() + max;
    row[index] as f64 - log_sum
}

#[cfg(test)]
mod tests {
    use super::log_softmax_at;

    #[test]
    fn log_probabilities_match_the_definition() {
        let row = [1.0f32, -2.0, 0.5, 3.0];
        let sum: f64 = row.iter().map(|&v| (v as f64).exp()).sum();
        for (index, &value) in row.iter().enumerate() {
            let expected = ((value as f64).exp() / sum).ln();
            assert!((log_softmax_at(&row, index) - expected).abs() < 1e-12, "token {index}");
        }
        let total: f64 = (0..row.len()).map(|i| log_softmax_at(&row, i).exp()).sum();
        assert!((total - 1.0).abs() < 1e-12);
    }

    #[test]
    fn large_logits_do_not_overflow() {
        // exp(1000) is infinite in f64; shifted by the maximum it is not.
        let row = [1000.0f32, 1000.0, 990.0];
        let expected = (0.5f64 / (1.0 + 0.5 * (-10f64).exp())).ln();
        assert!((log_softmax_at(&row, 0) - expected).abs() < 1e-12);
        assert!(log_softmax_at(&row, 2).is_finite());
    }
}
