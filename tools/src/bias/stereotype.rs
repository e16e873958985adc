//! The second design's pieces: where a fill item's pronoun is decided, what
//! the model leans to there, and the stereotype direction fitted on it.
//!
//! The first design took its direction from swapped-gender pairs, which is
//! also the direction of *stated* gender, and erased it toward h·d = 0, a
//! point on the male side of every token: it wrote *she* out of answers.
//! Here the direction is fitted on the model's own states where it chooses
//! a pronoun for an occupation with no gender cue, against its own lean
//! there (log P(he) − log P(she)): what makes it guess a gender from the
//! occupation. The centre is the projection at which that lean is even
//! (affine erasure toward a neutral point, not toward 0), and the direction
//! can be made orthogonal to the stated-gender direction of the factual
//! items, so a sentence that says the referent is a woman keeps *she*.

use super::fill::{fill_blanks, FillItem, Gender, PronounForm, PronounOption};
use super::scoring::sentence_tokens_after;
use anyhow::{ensure, Context, Result};
use bramble_runtime::model::{Logits, Model, RunState, Site};
use bramble_runtime::tokenizer::Tokenizer;

/// A fill item at the point where its pronoun is chosen: the tokens before
/// the first blank, and the first token of each filling there.
#[derive(Debug, Clone, PartialEq)]
pub struct PronounSite {
    /// The item's line in its file.
    pub line: usize,
    /// The tokens before the blank (the start token first, when there is one).
    pub prefix: Vec<u32>,
    /// The first token of the *she* filling at the blank.
    pub she: u32,
    /// The first token of the *he* filling.
    pub he: u32,
    /// The occupation's WinoBias list.
    pub listed: Option<Gender>,
    /// The gender the sentence states (none: cue-free).
    pub gender: Option<Gender>,
    /// The occupation.
    pub occupation: String,
    /// The position in `prefix` of the occupation's last token (its last
    /// mention before the blank), when it is found there.
    pub occupation_at: Option<usize>,
}

/// Which position of a site the states are read at.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SitePosition {
    /// The prefix's last token, whose logits choose the pronoun.
    Pronoun,
    /// The occupation's last token (sites without one read the pronoun's).
    Occupation,
}

/// The pronoun sites of `items`, with the lines of those left out: the two
/// fillings do not part at one token (they part at the first token, or not
/// at all), or the prefix does not fit `context`.
pub fn pronoun_sites(
    tokenizer: &Tokenizer,
    start: Option<u32>,
    items: &[(usize, FillItem)],
    context: usize,
) -> Result<(Vec<PronounSite>, Vec<usize>)> {
    let mut sites = Vec::with_capacity(items.len());
    let mut left_out = Vec::new();
    for (line, item) in items {
        let she = sentence_tokens_after(start, tokenizer, &fill_blanks(&item.text, PronounOption::She)?);
        let he = sentence_tokens_after(start, tokenizer, &fill_blanks(&item.text, PronounOption::He)?);
        let k = she.iter().zip(&he).take_while(|(a, b)| a == b).count();
        if k == 0 || k >= she.len() || k >= he.len() || k > context {
            left_out.push(*line);
            continue;
        }
        // The occupation's last mention before the blank, as the prefix's tokens.
        let blank = item.text.find("[PRONOUN").unwrap_or(item.text.len());
        let occupation_at = (!item.occupation.is_empty())
            .then(|| item.text[..blank].to_lowercase().rfind(&item.occupation.to_lowercase()))
            .flatten()
            .and_then(|at| {
                let upto = sentence_tokens_after(start, tokenizer, &item.text[..at + item.occupation.len()]);
                (!upto.is_empty() && upto.len() <= k && upto[..] == she[..upto.len()]).then(|| upto.len() - 1)
            });
        sites.push(PronounSite {
            occupation_at,
            line: *line,
            prefix: she[..k].to_vec(),
            she: she[k],
            he: he[k],
            listed: item.listed,
            gender: item.gender,
            occupation: item.occupation.clone(),
        });
    }
    Ok((sites, left_out))
}

/// The sentence two pair sentences share with each differing word blanked,
/// when they differ only in words that are a female and a male pronoun of
/// one form (`she`/`he`, `her`/`him`, …, punctuation after them kept);
/// `None` otherwise.
pub fn blank_pronoun_twins(first: &str, second: &str) -> Option<String> {
    let (a, b): (Vec<&str>, Vec<&str>) = (first.split(' ').collect(), second.split(' ').collect());
    if a.len() != b.len() {
        return None;
    }
    let mut blanked = 0;
    let words: Option<Vec<String>> = a
        .iter()
        .zip(&b)
        .map(|(x, y)| {
            if x == y {
                return Some(x.to_string());
            }
            let core = |w: &str| w.trim_end_matches(|c: char| c.is_ascii_punctuation()).len();
            let (cx, cy) = (core(x), core(y));
            if x[cx..] != y[cy..] {
                return None;
            }
            let (form, _) = PronounForm::of_twins(&x[..cx], &y[..cy])?;
            blanked += 1;
            Some(format!("{}{}", form.blank(), &x[cx..]))
        })
        .collect();
    words.filter(|_| blanked > 0).map(|w| w.join(" "))
}

/// Runs every site's prefix through the model as it is set (constraint and
/// weights of `state`) and returns each site's lean, log P(he) − log P(she)
/// of the two first tokens (a difference of logits). With `states`, each
/// layer's residual stream at the prefix's last position goes there too
/// (`sites × layers × dim`), at the position asked for.
pub fn read_sites(
    model: &Model<'_>,
    state: &mut RunState,
    sites: &[PronounSite],
    mut states: Option<(&mut Vec<f32>, SitePosition)>,
    progress: &mut dyn FnMut(usize, usize),
) -> Result<Vec<f64>> {
    let (layers, dim) = (model.weights.layers.len(), model.config.dim as usize);
    if let Some((states, _)) = states.as_mut() {
        states.clear();
        states.resize(sites.len() * layers * dim, 0.0);
    }
    let mut leans = Vec::with_capacity(sites.len());
    for (i, site) in sites.iter().enumerate() {
        let len = site.prefix.len();
        let read_at = match states.as_ref().map(|s| s.1) {
            Some(SitePosition::Occupation) => site.occupation_at.unwrap_or(len - 1),
            _ => len - 1,
        };
        ensure!(len <= state.context, "a prefix of {len} tokens does not fit the context of {}", state.context);
        let mut pos = 0;
        let mut lean = 0.0;
        while pos < len {
            let n = state.batch.min(len - pos);
            let last_batch = pos + n == len;
            let in_batch = (pos..pos + n).contains(&read_at);
            let mut row = states.as_mut().filter(|_| in_batch).map(|(s, _)| &mut s[i * layers * dim..][..layers * dim]);
            let b = read_at.saturating_sub(pos);
            let mut see = |layer: usize, site: Site, values: &[f32]| {
                if let (Site::Residual, Some(row)) = (site, row.as_deref_mut()) {
                    row[layer * dim..(layer + 1) * dim].copy_from_slice(&values[b * dim..(b + 1) * dim]);
                }
            };
            let logits =
                model.forward_observed(state, &site.prefix[pos..pos + n], pos, Logits::Last, Some(&mut see))?;
            if last_batch {
                lean = f64::from(logits[site.he as usize]) - f64::from(logits[site.she as usize]);
            }
            pos += n;
        }
        ensure!(lean.is_finite(), "line {}: the model's lean at the blank is not finite", site.line);
        leans.push(lean);
        progress(i + 1, sites.len());
    }
    Ok(leans)
}

/// p_f = P(she) / (P(she) + P(he)) of a lean log P(he) − log P(she).
pub fn lean_female_probability(lean: f64) -> f64 {
    1.0 / (1.0 + lean.exp())
}

/// The fill figures read from the first token at the blank alone: fast
/// enough to search candidates with (one prefix a site, against three whole
/// sentences an item); the gates are then measured with the whole-sentence
/// scorer (`bias-eval --fill`).
#[derive(Debug, Clone, Copy, PartialEq, Default, serde::Serialize)]
pub struct QuickFigures {
    /// Mean p_f of cue-free sites of female-listed occupations minus male-listed ones.
    pub occupation_gap: Option<f64>,
    /// Mean p_f − 0.5 over the cue-free sites.
    pub skew: Option<f64>,
    /// √(mean (p_f − 0.5)²) over them.
    pub rms_deviation: Option<f64>,
    /// Share of factual sites whose stated gender's pronoun is strictly the likelier.
    pub factual_accuracy: Option<f64>,
}

impl QuickFigures {
    /// The figures of `sites` with their `leans`.
    pub fn of(sites: &[PronounSite], leans: &[f64]) -> Self {
        let mean = |v: &[f64]| (!v.is_empty()).then(|| v.iter().sum::<f64>() / v.len() as f64);
        let p = |listed: Option<Gender>| -> Vec<f64> {
            sites
                .iter()
                .zip(leans)
                .filter(|(s, _)| s.gender.is_none() && (listed.is_none() || s.listed == listed))
                .map(|(_, &lean)| lean_female_probability(lean))
                .collect()
        };
        let all = p(None);
        let correct: Vec<f64> = sites
            .iter()
            .zip(leans)
            .filter_map(|(s, &lean)| {
                s.gender.map(|g| {
                    f64::from(u8::from(match g {
                        Gender::Female => lean < 0.0,
                        Gender::Male => lean > 0.0,
                    }))
                })
            })
            .collect();
        Self {
            occupation_gap: mean(&p(Some(Gender::Female))).zip(mean(&p(Some(Gender::Male)))).map(|(f, m)| f - m),
            skew: mean(&all).map(|m| m - 0.5),
            rms_deviation: mean(&all.iter().map(|v| (v - 0.5) * (v - 0.5)).collect::<Vec<_>>()).map(f64::sqrt),
            factual_accuracy: mean(&correct),
        }
    }
}

/// Per layer, the fitted stereotype direction and what the fit saw.
#[derive(Debug, Clone, PartialEq)]
pub struct StereotypeFit {
    /// `d_l`, unit vectors (`layers × dim`); positive toward *he*.
    pub directions: Vec<f32>,
    /// `r_l` (`layers × dim`, `r_l · d_l = 1`), the whitened read vectors,
    /// when asked for ([`FitInput::whiten`]); the projections below are read
    /// along them.
    pub readouts: Option<Vec<f32>>,
    /// Correlation of the cue-free sites' projections (on `r_l`, else `d_l`) with their lean.
    pub correlation: Vec<f32>,
    /// Cosine between the raw direction and the stated-gender direction
    /// (the factual sites' female minus male mean), removed from it when asked.
    pub factual_cosine: Vec<f32>,
    /// Cosine between the direction (after the factual part) and the
    /// attention sink, removed from it.
    pub sink_cosine: Vec<f32>,
    /// Mean projection of the cue-free sites on `d_l`.
    pub mean: Vec<f32>,
    /// Their standard deviation.
    pub spread: Vec<f32>,
    /// The projection at which the least-squares line of lean on projection
    /// crosses 0: the parity point, kept within three spreads of the mean.
    pub parity: Vec<f32>,
}

/// What [`fit_stereotype`] is given, per site `layers × dim` floats in site order.
pub struct FitInput<'a> {
    /// Layers.
    pub layers: usize,
    /// Width of the residual stream.
    pub dim: usize,
    /// The cue-free sites' states.
    pub cue_free: &'a [f32],
    /// Their leans.
    pub leans: &'a [f64],
    /// What the direction is fitted against, one a site: the leans
    /// themselves, or each site's occupation's mean lean (the lean the
    /// occupation explains, not the template's or the blank's form's).
    pub targets: &'a [f64],
    /// Factual sites' states stating *female* and stating *male*, one pair
    /// a position read (the first gives `factual_cosine`; may be empty).
    pub stated: &'a [(&'a [f32], &'a [f32])],
    /// Remove the stated-gender directions from each direction.
    pub orthogonal_to_stated: bool,
    /// The attention sink's mean residual stream (`layers × dim`), removed from each direction.
    pub sink: Option<&'a [f64]>,
    /// LEACE's whitened form, with this shrinkage `α ∈ (0, 1)` of the
    /// states' covariance toward a multiple of the identity (`None`: the
    /// orthogonal form, read along `d_l`). See [`whitened_readout`].
    pub whiten: Option<f64>,
    /// More states (`layers × dim` each) the whitened form's covariance is
    /// taken over with the cue-free sites': those the constraint should
    /// move least (factual sites, ordinary text).
    pub background: &'a [f32],
}

/// Fits, per layer, the direction along which the cue-free sites' states
/// covary with the model's lean (or the targets given in its place): `Σ (t_i − t̄)(x_i − x̄)` (the direction a
/// least-squares fit of the lean on one direction of the state uses, and
/// what LEACE erases for one scalar concept before whitening), optionally
/// made orthogonal to the stated-gender direction and to the attention
/// sink, normalized; then the projections' mean, spread and parity point.
pub fn fit_stereotype(input: &FitInput<'_>) -> Result<StereotypeFit> {
    let (layers, dim) = (input.layers, input.dim);
    let row = layers * dim;
    let n = input.leans.len();
    ensure!(n >= 2, "the stereotype direction needs two cue-free sites at the least, found {n}");
    ensure!(input.cue_free.len() == n * row, "{} state values for {n} sites of {row}", input.cue_free.len());
    ensure!(input.targets.len() == n, "{} targets for {n} sites", input.targets.len());
    let y_mean = input.leans.iter().sum::<f64>() / n as f64;
    let t_mean = input.targets.iter().sum::<f64>() / n as f64;
    if let Some(alpha) = input.whiten {
        ensure!(alpha > 0.0 && alpha < 1.0, "the shrinkage {alpha} is outside (0, 1)");
    }
    let mut fit = StereotypeFit {
        directions: vec![0.0; row],
        readouts: input.whiten.map(|_| vec![0.0; row]),
        correlation: vec![0.0; layers],
        factual_cosine: vec![0.0; layers],
        sink_cosine: vec![0.0; layers],
        mean: vec![0.0; layers],
        spread: vec![0.0; layers],
        parity: vec![0.0; layers],
    };
    let mean_of = |states: &[f32], l: usize| -> Vec<f64> {
        let count = states.len() / row;
        let mut m = vec![0f64; dim];
        for s in states.chunks_exact(row) {
            for (m, v) in m.iter_mut().zip(&s[l * dim..(l + 1) * dim]) {
                *m += f64::from(*v) / count as f64;
            }
        }
        m
    };
    let dot = |a: &[f64], b: &[f64]| a.iter().zip(b).map(|(x, y)| x * y).sum::<f64>();
    let norm = |a: &[f64]| dot(a, a).sqrt();
    for l in 0..layers {
        let x_mean = mean_of(input.cue_free, l);
        let mut d = vec![0f64; dim];
        for (s, &t) in input.cue_free.chunks_exact(row).zip(input.targets) {
            for ((d, v), m) in d.iter_mut().zip(&s[l * dim..(l + 1) * dim]).zip(&x_mean) {
                *d += (t - t_mean) * (f64::from(*v) - m);
            }
        }
        ensure!(norm(&d) > 0.0 && norm(&d).is_finite(), "layer {l}: the lean does not vary with the state");
        // The stated-gender directions (one a position read), made
        // orthonormal, then removed from d together.
        let mut basis: Vec<Vec<f64>> = Vec::new();
        for (i, (female, male)) in input.stated.iter().enumerate() {
            if female.is_empty() || male.is_empty() {
                continue;
            }
            let mut g: Vec<f64> = mean_of(female, l).iter().zip(mean_of(male, l)).map(|(a, b)| a - b).collect();
            if i == 0 && norm(&g) > 0.0 {
                fit.factual_cosine[l] = (dot(&d, &g) / (norm(&d) * norm(&g))) as f32;
            }
            for b in &basis {
                let along = dot(&g, b);
                g.iter_mut().zip(b).for_each(|(v, b)| *v -= along * b);
            }
            let g_norm = norm(&g);
            if g_norm > 1e-9 * (1.0 + norm(&d)) {
                g.iter_mut().for_each(|v| *v /= g_norm);
                basis.push(g);
            }
        }
        if input.orthogonal_to_stated {
            for b in &basis {
                let along = dot(&d, b);
                d.iter_mut().zip(b).for_each(|(v, b)| *v -= along * b);
            }
        }
        if let Some(sink) = input.sink {
            let u = &sink[l * dim..(l + 1) * dim];
            let u_norm = norm(u);
            if u_norm > 0.0 {
                let along = dot(&d, u) / u_norm;
                fit.sink_cosine[l] = (along / norm(&d)) as f32;
                d.iter_mut().zip(u).for_each(|(v, s)| *v -= along * s / u_norm);
            }
        }
        let read = match input.whiten {
            None => None,
            Some(alpha) => {
                // The subspace the fit keeps out of: the stated-gender
                // directions (when asked) and the sink, orthonormal together.
                let mut removed: Vec<Vec<f64>> = if input.orthogonal_to_stated { basis.clone() } else { Vec::new() };
                if let Some(sink) = input.sink {
                    let mut u = sink[l * dim..(l + 1) * dim].to_vec();
                    for b in &removed {
                        let along = dot(&u, b);
                        u.iter_mut().zip(b).for_each(|(v, b)| *v -= along * b);
                    }
                    let u_norm = norm(&u);
                    if u_norm > 1e-9 {
                        u.iter_mut().for_each(|v| *v /= u_norm);
                        removed.push(u);
                    }
                }
                let states: Vec<&[f32]> =
                    input.cue_free.chunks_exact(row).map(|s| &s[l * dim..(l + 1) * dim]).collect();
                let background: Vec<&[f32]> =
                    input.background.chunks_exact(row).map(|s| &s[l * dim..(l + 1) * dim]).collect();
                let (write, read) = whitened_readout(&states, input.targets, &background, &removed, alpha)
                    .with_context(|| format!("layer {l}: the whitened read vector"))?;
                d = write;
                Some(read)
            }
        };
        let d_norm = norm(&d);
        ensure!(d_norm > 0.0 && d_norm.is_finite(), "layer {l}: nothing of the direction is left");
        d.iter_mut().for_each(|v| *v /= d_norm);
        // Projections, their line against the lean, and where it crosses 0.
        let along = read.as_deref().unwrap_or(&d);
        let q: Vec<f64> = input
            .cue_free
            .chunks_exact(row)
            .map(|s| s[l * dim..(l + 1) * dim].iter().zip(along).map(|(v, d)| f64::from(*v) * d).sum())
            .collect();
        let q_mean = q.iter().sum::<f64>() / n as f64;
        let sqq: f64 = q.iter().map(|v| (v - q_mean) * (v - q_mean)).sum();
        let sqy: f64 = q.iter().zip(input.leans).map(|(v, y)| (v - q_mean) * (y - y_mean)).sum();
        let syy: f64 = input.leans.iter().map(|y| (y - y_mean) * (y - y_mean)).sum();
        let spread = (sqq / n as f64).sqrt().max(1e-6);
        fit.correlation[l] = if sqq > 0.0 && syy > 0.0 { (sqy / (sqq * syy).sqrt()) as f32 } else { 0.0 };
        let slope = if sqq > 0.0 { sqy / sqq } else { 0.0 };
        let parity = if slope.abs() > 1e-12 { q_mean - y_mean / slope } else { q_mean };
        fit.parity[l] = parity.clamp(q_mean - 3.0 * spread, q_mean + 3.0 * spread) as f32;
        fit.mean[l] = q_mean as f32;
        fit.spread[l] = spread as f32;
        for (o, v) in fit.directions[l * dim..(l + 1) * dim].iter_mut().zip(&d) {
            *o = *v as f32;
        }
        if let (Some(out), Some(read)) = (fit.readouts.as_mut(), &read) {
            for (o, v) in out[l * dim..(l + 1) * dim].iter_mut().zip(read) {
                *o = *v as f32;
            }
        }
    }
    Ok(fit)
}

/// LEACE (Belrose et al. 2023) for one scalar concept `t`, kept out of the
/// span of `removed` (orthonormal vectors): with `P` the projection onto
/// their complement, `Σ` the covariance of the states `P x` and `σ = Σᵢ (tᵢ
/// − t̄) P(xᵢ − x̄)` their covariance with `t`, the erasure `x ← x − ((x −
/// μ) · r) d` with `d = σ / |σ|` and `r ∝ Σ⁻¹ σ`, `r · d = 1`, leaves no
/// direction of the states covarying with `t` (the whitened closed form
/// `W⁺ P_{WΣ_xz} W`, `W = Σ^−½`, for a rank-one `Σ_xz`, needs no square root).
///
/// Any `r` with `r · d = 1` erases `t` as well; this one moves the states
/// least in mean square, `rᵀ Σ r`. The states the constraint should move
/// least are not only those `t` is measured on, so `Σ` is taken over
/// `states` and `background` together (about their pooled mean), while `σ`
/// comes from `states` alone. With fewer states than dimensions `Σ` is
/// singular, and its smallest directions are noise: it is shrunk toward
/// `τ I` (`τ` its mean eigenvalue on the complement) by `alpha`, `(1 − α) Σ
/// + α τ I`, which also keeps `r` in the complement. Returns `(d, r)`.
pub fn whitened_readout(
    states: &[&[f32]],
    targets: &[f64],
    background: &[&[f32]],
    removed: &[Vec<f64>],
    alpha: f64,
) -> Result<(Vec<f64>, Vec<f64>)> {
    let n = states.len();
    ensure!(n >= 2 && targets.len() == n, "{n} states for {} targets", targets.len());
    let dim = states[0].len();
    ensure!(removed.len() < dim, "{} removed directions leave nothing of {dim}", removed.len());
    let mean_t = targets.iter().sum::<f64>() / n as f64;
    let mut mean_x = vec![0f64; dim];
    for s in states {
        mean_x.iter_mut().zip(s.iter()).for_each(|(m, v)| *m += f64::from(*v) / n as f64);
    }
    let keep_out = |v: &mut [f64]| {
        for b in removed {
            let along: f64 = v.iter().zip(b).map(|(a, b)| a * b).sum();
            v.iter_mut().zip(b).for_each(|(x, b)| *x -= along * b);
        }
    };
    let mut sigma = vec![0f64; dim];
    for (s, t) in states.iter().zip(targets) {
        sigma.iter_mut().zip(s.iter().zip(&mean_x)).for_each(|(o, (v, m))| *o += (t - mean_t) * (f64::from(*v) - m));
    }
    keep_out(&mut sigma);
    // Every state, centred on the pooled mean and projected: one row each.
    let all: Vec<&[f32]> = states.iter().chain(background).copied().collect();
    ensure!(all.iter().all(|s| s.len() == dim), "states of differing widths");
    let mut pooled = vec![0f64; dim];
    for s in &all {
        pooled.iter_mut().zip(s.iter()).for_each(|(m, v)| *m += f64::from(*v) / all.len() as f64);
    }
    let mut centred = faer::Mat::<f64>::zeros(all.len(), dim);
    let mut row = vec![0f64; dim];
    for (i, s) in all.iter().enumerate() {
        row.iter_mut().zip(s.iter().zip(&pooled)).for_each(|(r, (v, m))| *r = f64::from(*v) - m);
        keep_out(&mut row);
        row.iter().enumerate().for_each(|(j, v)| centred[(i, j)] = *v);
    }
    let sigma_norm = sigma.iter().map(|v| v * v).sum::<f64>().sqrt();
    ensure!(sigma_norm > 0.0 && sigma_norm.is_finite(), "the targets do not covary with the states");
    let covariance = centred.transpose() * &centred * faer::Scale(1.0 / all.len() as f64);
    let trace: f64 = (0..dim).map(|j| covariance[(j, j)]).sum();
    let tau = trace / (dim - removed.len()) as f64;
    ensure!(tau > 0.0 && tau.is_finite(), "the states do not vary");
    let mut shrunk = covariance * faer::Scale(1.0 - alpha);
    (0..dim).for_each(|j| shrunk[(j, j)] += alpha * tau);
    let rhs = faer::Mat::<f64>::from_fn(dim, 1, |j, _| sigma[j]);
    let solved = {
        use faer::linalg::solvers::Solve;
        let factor = shrunk.llt(faer::Side::Lower).map_err(|e| {
            anyhow::anyhow!("the shrunk covariance is not positive definite ({e:?}); raise the shrinkage")
        })?;
        factor.solve(&rhs)
    };
    let mut read: Vec<f64> = (0..dim).map(|j| solved[(j, 0)]).collect();
    keep_out(&mut read);
    let d: Vec<f64> = sigma.iter().map(|v| v / sigma_norm).collect();
    let along: f64 = read.iter().zip(&d).map(|(a, b)| a * b).sum();
    ensure!(along > 0.0 && along.is_finite(), "the read vector is orthogonal to the direction");
    read.iter_mut().for_each(|v| *v /= along);
    Ok((d, read))
}

/// Each value replaced by the mean of the values of its group (`groups[i]` is value `i`'s).
pub fn group_means(values: &[f64], groups: &[usize]) -> Vec<f64> {
    let count = groups.iter().max().map_or(0, |g| g + 1);
    let mut sums = vec![(0.0, 0usize); count];
    for (&v, &g) in values.iter().zip(groups) {
        sums[g].0 += v;
        sums[g].1 += 1;
    }
    groups.iter().map(|&g| sums[g].0 / sums[g].1 as f64).collect()
}

/// The pronoun words the feedback loop counts in the model's own answers,
/// as the tokens of `tokenizer` that spell one whole (with and without a
/// leading space, lower case and capitalized): (*she* side, *he* side).
pub fn pronoun_tokens(tokenizer: &Tokenizer) -> (Vec<u32>, Vec<u32>) {
    let side = |words: [&str; 4]| {
        let mut ids: Vec<u32> = words
            .iter()
            .flat_map(|w| {
                let capital = format!("{}{}", w[..1].to_uppercase(), &w[1..]);
                [w.to_string(), format!(" {w}"), capital.clone(), format!(" {capital}")]
            })
            .filter_map(|text| match tokenizer.encode(&text, false, false).as_slice() {
                [id] => Some(*id),
                _ => None,
            })
            .collect();
        ids.sort_unstable();
        ids.dedup();
        ids
    };
    (side(["she", "her", "hers", "herself"]), side(["he", "him", "his", "himself"]))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn site(gender: Option<Gender>, listed: Option<Gender>) -> PronounSite {
        PronounSite {
            line: 1,
            prefix: vec![1],
            she: 2,
            he: 3,
            listed,
            gender,
            occupation: "x".into(),
            occupation_at: None,
        }
    }

    #[test]
    fn pairs_that_differ_in_a_pronoun_become_blanks() {
        assert_eq!(
            blank_pronoun_twins(
                "The nurse said he was late, and thanked him.",
                "The nurse said she was late, and thanked her."
            ),
            Some("The nurse said [PRONOUN] was late, and thanked [PRONOUN:object].".into())
        );
        assert_eq!(blank_pronoun_twins("He left.", "She left."), Some("[PRONOUN] left.".into()));
        assert_eq!(blank_pronoun_twins("The man left.", "The woman left."), None, "not pronouns");
        assert_eq!(blank_pronoun_twins("his car", "her cars"), None, "more than the pronoun differs");
        assert_eq!(blank_pronoun_twins("same", "same"), None, "nothing differs");
        assert_eq!(blank_pronoun_twins("a b", "a"), None);
    }

    #[test]
    fn group_means_replace_each_value() {
        assert_eq!(group_means(&[1.0, 2.0, 4.0, 8.0], &[0, 1, 0, 1]), vec![2.5, 5.0, 2.5, 5.0]);
        assert!(group_means(&[], &[]).is_empty());
    }

    #[test]
    fn quick_figures_read_the_first_token_lean() {
        use Gender::{Female, Male};
        let sites = [
            site(None, Some(Female)),
            site(None, Some(Male)),
            site(Some(Female), Some(Male)),
            site(Some(Male), Some(Female)),
        ];
        // ln 3: P(he) = 3 P(she), p_f = 0.25; −ln 3: p_f = 0.75.
        let l3 = 3f64.ln();
        let figures = QuickFigures::of(&sites, &[-l3, l3, -1.0, -1.0]);
        assert!((figures.occupation_gap.unwrap() - 0.5).abs() < 1e-12);
        assert!(figures.skew.unwrap().abs() < 1e-12);
        assert!((figures.rms_deviation.unwrap() - 0.25).abs() < 1e-12);
        assert_eq!(figures.factual_accuracy, Some(0.5));
        let none = QuickFigures::of(&sites[2..], &[0.0, 0.0]);
        assert_eq!((none.skew, none.factual_accuracy), (None, Some(0.0)), "a tie is not correct");
    }

    /// States along a planted axis `v` whose position sets the lean, plus
    /// noise along `u`; the stated-gender direction is `v + w`.
    #[test]
    fn the_fit_finds_the_planted_axis_and_its_parity_point() {
        let (layers, dim) = (2, 4);
        let (mut cue_free, mut leans) = (Vec::new(), Vec::new());
        for i in 0..200 {
            // Positions along the axis on a grid, each twice, with noise of
            // opposite signs: uncorrelated with the position exactly.
            let t = (i / 2) as f64 / 25.0 - 1.5;
            let noise = if i % 2 == 0 { 0.3 } else { -0.3 };
            // Lean = 2 (t − 0.5): even at t = 0.5.
            leans.push(2.0 * (t - 0.5));
            for _ in 0..layers {
                cue_free.extend([t as f32, noise as f32, 1.0, 0.0]);
            }
        }
        let stated = |sign: f32| -> Vec<f32> { (0..layers).flat_map(|_| [sign, 0.0, 0.0, sign]).collect() };
        let (female, male) = (stated(-1.0), stated(1.0));
        let mut input = FitInput {
            layers,
            dim,
            cue_free: &cue_free,
            leans: &leans,
            targets: &leans,
            stated: &[(&female, &male)],
            orthogonal_to_stated: false,
            sink: None,
            whiten: None,
            background: &[],
        };
        let fit = fit_stereotype(&input).unwrap();
        for l in 0..layers {
            let d = &fit.directions[l * dim..(l + 1) * dim];
            assert!((d[0] - 1.0).abs() < 1e-6 && d[1].abs() < 1e-6, "{d:?}");
            assert!((fit.correlation[l] - 1.0).abs() < 1e-5);
            assert!((fit.parity[l] - 0.5).abs() < 1e-5, "{:?}", fit.parity);
            // The stated-gender direction (−2, 0, 0, −2) against (1, 0, 0, 0).
            assert!((fit.factual_cosine[l] + std::f32::consts::FRAC_1_SQRT_2).abs() < 1e-5);
        }
        input.orthogonal_to_stated = true;
        let fit = fit_stereotype(&input).unwrap();
        let d = &fit.directions[..dim];
        let h = std::f32::consts::FRAC_1_SQRT_2;
        assert!((d[0] - h).abs() < 1e-5 && (d[3] + h).abs() < 1e-5, "orthogonal to (1, 0, 0, 1): {d:?}");
        // Whitened: the states' spread is along the axes, so the read vector
        // is the axis too, and the parity point the same; α = 0 is refused.
        input.orthogonal_to_stated = false;
        input.whiten = Some(0.1);
        let fit = fit_stereotype(&input).unwrap();
        let readouts = fit.readouts.as_ref().expect("read vectors");
        for l in 0..layers {
            let r = &readouts[l * dim..(l + 1) * dim];
            assert!((r[0] - 1.0).abs() < 1e-5 && r[1..].iter().all(|v| v.abs() < 1e-5), "{r:?}");
            assert!((fit.parity[l] - 0.5).abs() < 1e-4, "{:?}", fit.parity);
        }
        input.whiten = Some(0.0);
        assert!(fit_stereotype(&input).unwrap_err().to_string().contains("shrinkage 0"));
        input.whiten = None;
        // Constant leans carry no direction.
        let flat = vec![0.5; leans.len()];
        input.targets = &flat;
        assert!(fit_stereotype(&input).unwrap_err().to_string().contains("does not vary"));
    }

    /// States `(t + u, 3u, v)`, `u` and `v` uncorrelated with `t`: the
    /// covariance with `t` is along the first axis, but the state moves
    /// least when read along `(1, −1/3, 0)`, which gives `t` alone.
    #[test]
    fn the_whitened_read_vector_removes_the_concept_with_the_least_change() {
        let (mut states, mut targets) = (Vec::new(), Vec::new());
        for i in 0..400 {
            let t = (i / 4) as f64 / 50.0 - 1.0;
            let u = if i % 2 == 0 { 0.5 } else { -0.5 };
            let v = if (i / 2) % 2 == 0 { 0.7 } else { -0.7 };
            states.push([(t + u) as f32, (3.0 * u) as f32, v as f32]);
            targets.push(t);
        }
        let rows: Vec<&[f32]> = states.iter().map(|s| &s[..]).collect();
        let (d, r) = whitened_readout(&rows, &targets, &[], &[], 1e-6).unwrap();
        assert!((d[0] - 1.0).abs() < 1e-9 && d[1].abs() < 1e-9 && d[2].abs() < 1e-9, "{d:?}");
        assert!((r[0] - 1.0).abs() < 1e-4 && (r[1] + 1.0 / 3.0).abs() < 1e-4 && r[2].abs() < 1e-4, "{r:?}");
        // Erased (w = 1 toward the mean): nothing covaries with t, and each
        // state moves by t − t̄ only, where the orthogonal form moves it by t − t̄ + u.
        let mean_t = targets.iter().sum::<f64>() / targets.len() as f64;
        let project = |s: &[f32], v: &[f64]| s.iter().zip(v).map(|(a, b)| f64::from(*a) * b).sum::<f64>();
        let centre = rows.iter().map(|s| project(s, &r)).sum::<f64>() / rows.len() as f64;
        let (mut moved, mut moved_orthogonal, mut covariance) = (0.0, 0.0, [0.0; 3]);
        let centre_d = rows.iter().map(|s| project(s, &d)).sum::<f64>() / rows.len() as f64;
        for (s, t) in rows.iter().zip(&targets) {
            let shift = project(s, &r) - centre;
            moved += shift * shift;
            moved_orthogonal += (project(s, &d) - centre_d).powi(2);
            for (j, c) in covariance.iter_mut().enumerate() {
                *c += (t - mean_t) * (f64::from(s[j]) - shift * d[j]);
            }
        }
        assert!(covariance.iter().all(|c| c.abs() < 1e-3), "{covariance:?}");
        assert!(moved < 0.6 * moved_orthogonal, "{moved} against {moved_orthogonal}");
        // States it should also move little, spread along the second axis:
        // the read vector leaves that axis nearly alone.
        let loud: Vec<[f32; 3]> = (0..400).map(|i| [0.0, if i % 2 == 0 { 10.0 } else { -10.0 }, 0.0]).collect();
        let loud: Vec<&[f32]> = loud.iter().map(|s| &s[..]).collect();
        let (d_loud, r_loud) = whitened_readout(&rows, &targets, &loud, &[], 1e-6).unwrap();
        assert_eq!(d_loud, d, "the direction comes from the states alone");
        assert!(r_loud[1].abs() < 0.01 && (r_loud[0] - 1.0).abs() < 1e-9, "{r_loud:?}");
        // Kept out of a removed direction: the read vector has nothing along it.
        let (_, r) = whitened_readout(&rows, &targets, &[], &[vec![0.0, 1.0, 0.0]], 0.1).unwrap();
        assert!(r[1].abs() < 1e-12 && (r[0] - 1.0).abs() < 1e-12, "{r:?}");
        // Shrinkage must be in (0, 1); flat targets carry nothing.
        let flat = vec![0.5; targets.len()];
        assert!(whitened_readout(&rows, &flat, &[], &[], 0.1).unwrap_err().to_string().contains("do not covary"));
    }
}
