//! The maths of the bias directions: which positions of a pair's two
//! sentences differ because of the swapped words, and the top principal
//! component of their hidden states' differences.

use super::evaluation::shared_ends;

/// Tokens after a pair's last differing token whose hidden states still
/// carry the swapped words (through attention) and join the differences.
pub const FOLLOWING_TOKENS: usize = 3;

/// The positions of a pair's two sentences whose hidden states differ
/// because of the swapped words: `(stereo, anti)` position pairs, aligned
/// from the end (so the tokens after the swap line up even when the swap
/// changed the length), from the last differing token through
/// [`FOLLOWING_TOKENS`] after it, and back through the differing tokens
/// while both sentences still differ there. Empty when the two are equal.
pub fn differing_positions(stereo: &[u32], anti: &[u32]) -> Vec<(usize, usize)> {
    let (prefix, suffix) = shared_ends(stereo, anti);
    let shortest = stereo.len().min(anti.len());
    // k counts back from the last token of each sentence.
    let last_differing = suffix; // k of the last differing token
    let first = last_differing.saturating_sub(FOLLOWING_TOKENS);
    (first..shortest - prefix)
        .map(|k| (stereo.len() - 1 - k, anti.len() - 1 - k))
        .filter(|&(s, a)| s >= prefix && a >= prefix)
        .collect()
}

/// The top principal component (uncentred: the difference vectors' sign is
/// arbitrary) of `rows` (`n × dim`), by power iteration on `XᵀX`; with the
/// share of the rows' squared norm along it. The sign is chosen so the
/// rows' mean projects positive.
pub fn principal_direction(rows: &[f32], dim: usize) -> (Vec<f64>, f64) {
    let n = rows.len() / dim;
    // Start from the largest row: not orthogonal to the top component unless the data are degenerate.
    let largest = (0..n)
        .max_by(|&a, &b| {
            let norm = |i: usize| rows[i * dim..(i + 1) * dim].iter().map(|v| (*v as f64).powi(2)).sum::<f64>();
            norm(a).total_cmp(&norm(b))
        })
        .unwrap_or(0);
    let mut v: Vec<f64> = rows[largest * dim..(largest + 1) * dim].iter().map(|&x| x as f64).collect();
    let mut next = vec![0f64; dim];
    let mut eigen = 0.0;
    for _ in 0..200 {
        next.fill(0.0);
        for row in rows.chunks_exact(dim) {
            let p: f64 = row.iter().zip(&v).map(|(a, b)| *a as f64 * b).sum();
            for (o, a) in next.iter_mut().zip(row) {
                *o += p * *a as f64;
            }
        }
        let norm = next.iter().map(|x| x * x).sum::<f64>().sqrt();
        if norm == 0.0 || !norm.is_finite() {
            break;
        }
        let change: f64 = next.iter().zip(&v).map(|(a, b)| (a / norm - b).powi(2)).sum();
        v.iter_mut().zip(&next).for_each(|(o, x)| *o = x / norm);
        eigen = norm;
        if change < 1e-14 {
            break;
        }
    }
    let mean_projection: f64 =
        rows.chunks_exact(dim).map(|r| r.iter().zip(&v).map(|(a, b)| *a as f64 * b).sum::<f64>()).sum();
    if mean_projection < 0.0 {
        v.iter_mut().for_each(|x| *x = -*x);
    }
    let total: f64 = rows.iter().map(|x| (*x as f64).powi(2)).sum();
    (v, if total > 0.0 { eigen / total } else { 0.0 })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn differing_positions_cover_the_swap_and_the_tokens_after_it() {
        // Same length, one token swapped at 2: positions 2..=5 of both.
        let positions = differing_positions(&[1, 2, 7, 3, 4, 5, 6, 8], &[1, 2, 9, 3, 4, 5, 6, 8]);
        assert_eq!(positions, vec![(5, 5), (4, 4), (3, 3), (2, 2)]);
        // The anti side one token longer ("his" → "her own"): aligned from the end.
        let positions = differing_positions(&[1, 7, 3, 4], &[1, 9, 9, 3, 4]);
        assert_eq!(positions, vec![(3, 4), (2, 3), (1, 2)]);
        // Nothing differs, or one sentence is the other's prefix: nothing to compare.
        assert!(differing_positions(&[1, 2, 3], &[1, 2, 3]).is_empty());
        assert!(differing_positions(&[1, 2], &[1, 2, 3]).is_empty());
        // The swap at the very start.
        assert_eq!(differing_positions(&[7, 2], &[9, 2]), vec![(1, 1), (0, 0)]);
    }

    #[test]
    fn the_principal_direction_is_found_whatever_the_signs_of_the_rows() {
        // Rows ±3·axis + small noise: the axis, though the rows' signs cancel in a mean.
        let dim = 8;
        let axis: Vec<f64> = (0..dim).map(|i| if i % 2 == 0 { 0.5 } else { -0.5 }).collect();
        let mut rows = Vec::new();
        let mut noise = 0x2545_f491_u32;
        for r in 0..40 {
            let sign = if r % 2 == 0 { 3.0 } else { -3.0 };
            for a in &axis {
                noise ^= noise << 13;
                noise ^= noise >> 17;
                noise ^= noise << 5;
                rows.push((sign * a + (noise as f64 / u32::MAX as f64 - 0.5) * 0.2) as f32);
            }
        }
        let mean: f64 = (0..dim).map(|i| rows.iter().skip(i).step_by(dim).map(|v| *v as f64).sum::<f64>().abs()).sum();
        assert!(mean / 40.0 < 0.5, "the mean difference has almost nothing left of the axis");
        let (d, share) = principal_direction(&rows, dim);
        let cosine: f64 = d.iter().zip(&axis).map(|(a, b)| a * b).sum::<f64>().abs();
        assert!(cosine > 0.999, "cosine {cosine}");
        assert!(share > 0.95 && share <= 1.0, "share {share}");
        let norm: f64 = d.iter().map(|v| v * v).sum::<f64>().sqrt();
        assert!((norm - 1.0).abs() < 1e-9);
    }
}
