//! Reading a model's residual stream for calibration: per-layer hidden
//! states of one sentence, their means, and the attention sink's.

use anyhow::{ensure, Result};
use bramble_runtime::model::{Logits, Model, RunState, Site};

/// Mean of each layer's residual stream over `tokens` (one sentence),
/// into `means` (`layers × dim`).
pub(super) fn residual_means(model: &Model<'_>, state: &mut RunState, tokens: &[u32], means: &mut [f64]) -> Result<()> {
    let dim = model.config.dim as usize;
    means.fill(0.0);
    let mut pos = 0;
    while pos < tokens.len() {
        let n = state.batch.min(tokens.len() - pos);
        let mut see = |layer: usize, site: Site, values: &[f32]| {
            if site == Site::Residual {
                for h in values.chunks_exact(dim) {
                    for (m, v) in means[layer * dim..(layer + 1) * dim].iter_mut().zip(h) {
                        *m += *v as f64;
                    }
                }
            }
        };
        model.forward_observed(state, &tokens[pos..pos + n], pos, Logits::Last, Some(&mut see))?;
        pos += n;
    }
    means.iter_mut().for_each(|m| *m /= tokens.len() as f64);
    Ok(())
}

/// Runs `tokens` (one sentence, from position 0) through the model, a batch at a time.
pub(super) fn forward_sentence(model: &Model<'_>, state: &mut RunState, tokens: &[u32]) -> Result<()> {
    let mut pos = 0;
    while pos < tokens.len() {
        let n = state.batch.min(tokens.len() - pos);
        model.forward(state, &tokens[pos..pos + n], pos, Logits::Last)?;
        pos += n;
    }
    Ok(())
}

/// Each layer's residual stream at position 0 (the attention sink), the
/// mean over sequences of one token each, `first_tokens`, into `layers × dim`.
pub(super) fn first_position_means(model: &Model<'_>, state: &mut RunState, first_tokens: &[u32]) -> Result<Vec<f64>> {
    let (layers, dim) = (model.weights.layers.len(), model.config.dim as usize);
    let mut means = vec![0f64; layers * dim];
    for &token in first_tokens {
        let mut see = |layer: usize, site: Site, values: &[f32]| {
            if site == Site::Residual {
                for (m, v) in means[layer * dim..(layer + 1) * dim].iter_mut().zip(&values[..dim]) {
                    *m += *v as f64 / first_tokens.len() as f64;
                }
            }
        };
        model.forward_observed(state, &[token], 0, Logits::Last, Some(&mut see))?;
    }
    Ok(means)
}

/// Each layer's residual stream at every position of `tokens` (one
/// sentence), into `rows` (`layers × tokens × dim`).
pub(super) fn residual_rows(
    model: &Model<'_>,
    state: &mut RunState,
    tokens: &[u32],
    rows: &mut Vec<f32>,
) -> Result<()> {
    let (layers, dim, len) = (model.weights.layers.len(), model.config.dim as usize, tokens.len());
    rows.clear();
    rows.resize(layers * len * dim, 0.0);
    let mut pos = 0;
    while pos < len {
        let n = state.batch.min(len - pos);
        let mut see = |layer: usize, site: Site, values: &[f32]| {
            if site == Site::Residual {
                let at = (layer * len + pos) * dim;
                rows[at..at + n * dim].copy_from_slice(&values[..n * dim]);
            }
        };
        model.forward_observed(state, &tokens[pos..pos + n], pos, Logits::Last, Some(&mut see))?;
        pos += n;
    }
    Ok(())
}

/// Per layer, the mean and standard deviation (at least 1e-6) of the
/// projections `h · d_l` over every token of `responses`, run from position
/// 0 each under the state's constraint; an error when fewer than two tokens ran.
pub(super) fn projection_statistics(
    model: &Model<'_>,
    state: &mut RunState,
    responses: &[Vec<u32>],
) -> Result<Vec<(f32, f32)>> {
    state.reset_projections();
    for response in responses {
        forward_sentence(model, state, response)?;
    }
    let stats = state.projections();
    ensure!(stats.tokens > 1, "no baseline sentence fits the context of {} tokens", state.context);
    Ok((0..model.weights.layers.len())
        .map(|l| {
            let mean = stats.mean(l);
            let variance = (stats.sum_squares[l] / stats.tokens as f64 - mean * mean).max(0.0);
            (mean as f32, (variance.sqrt() as f32).max(1e-6))
        })
        .collect())
}
