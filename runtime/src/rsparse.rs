//! R-Sparse (Zhang et al., ICLR 2025, "Rank-Aware Activation Sparsity"):
//! the `rsparse` image section and what the forward pass needs of it.
//!
//! For a linear module `y = W x` the input is split by `m_i = |x_i · c_i| > τ`
//! into the few large channels, multiplied exactly, and the many small ones,
//! whose contribution goes through a rank-`r` factorization of `W`:
//! `y = W (x ⊙ m) + U · (SVᵀ · (x ⊙ (1 − m)))`. The byte layout is in
//! `models/FORMAT.md` (section `rsparse`).

use crate::error::{Error, Result};
use crate::image::layout::{fixed_name, read_fixed_name};
use half::f16;
use std::collections::HashMap;

/// Section name.
pub const SECTION: &str = "rsparse";
/// Section version this code reads and writes.
pub const VERSION: u32 = 1;
const HEADER_BYTES: usize = 32;
const MODULE_BYTES: usize = 96;
const ALIGN: usize = 64;

/// One module's sparsity plan and factors.
#[derive(Debug, Clone, PartialEq)]
pub struct SparseModule {
    /// The weight tensor it applies to, e.g. `blk.3.ffn_up.weight`.
    pub name: String,
    /// Outputs.
    pub rows: usize,
    /// Inputs.
    pub cols: usize,
    /// `s`: the module costs `1 − s` of dense.
    pub sparsity: f32,
    /// `α`: the share of the kept budget spent on exact channels.
    pub alpha: f32,
    /// `τ`: channels with `|x_i · c_i| > τ` are computed exactly.
    pub threshold: f32,
    /// `c_i`, the weight columns' norms (all 1 for pure input sparsity).
    pub scores: Vec<f32>,
    /// `r`.
    pub rank: usize,
    /// `S_r V_rᵀ`, `rank × cols`, row by row.
    pub sv: Vec<f16>,
    /// `U_r`, `rows × rank`, row by row.
    pub u: Vec<f16>,
}

impl SparseModule {
    /// The paper's budget: exact channels `⌊cols·(1 − s)·α⌋` and the rank
    /// that spends the rest of `(1 − s)` of the dense cost.
    pub fn budget(rows: usize, cols: usize, sparsity: f32, alpha: f32) -> (usize, usize) {
        let kept = (cols as f64 * (1.0 - sparsity as f64) * alpha as f64).floor() as usize;
        let total = cols as f64 * rows as f64 * (1.0 - sparsity as f64);
        let rank = ((total - (kept * rows) as f64) / (cols + rows) as f64).floor().max(0.0) as usize;
        (kept.min(cols), rank.min(rows.min(cols)))
    }

    fn check(&self) -> Result<()> {
        let bad = |what: String| Err(Error::corrupt(format!("rsparse module {}: {what}", self.name)));
        if self.rows == 0 || self.cols == 0 {
            return bad(format!("shape {} × {}", self.rows, self.cols));
        }
        if self.scores.len() != self.cols
            || self.sv.len() != self.rank * self.cols
            || self.u.len() != self.rows * self.rank
        {
            return bad(format!(
                "{} scores, {} SVᵀ and {} U values for {} × {} at rank {}",
                self.scores.len(),
                self.sv.len(),
                self.u.len(),
                self.rows,
                self.cols,
                self.rank
            ));
        }
        if !(0.0..1.0).contains(&self.sparsity)
            || !(0.0..=1.0).contains(&self.alpha)
            || self.threshold.is_nan()
            || self.threshold < 0.0
        {
            return bad(format!("s {} α {} τ {} out of range", self.sparsity, self.alpha, self.threshold));
        }
        if self.scores.iter().any(|c| !c.is_finite() || *c < 0.0) {
            return bad("a column score is negative or not finite".into());
        }
        Ok(())
    }
}

/// Every module's plan, by tensor name.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Rsparse {
    /// The model-level sparsity it was calibrated for.
    pub target: f32,
    /// The modules, in the order written.
    pub modules: Vec<SparseModule>,
}

fn align(n: usize) -> usize {
    n.div_ceil(ALIGN) * ALIGN
}

impl Rsparse {
    /// The module for a weight tensor, if it has one.
    pub fn module(&self, name: &str) -> Option<&SparseModule> {
        self.modules.iter().find(|m| m.name == name)
    }

    /// Parses the section's bytes, checking every size and checksum.
    pub fn from_section(bytes: &[u8]) -> Result<Self> {
        let corrupt = |what: String| Error::corrupt(format!("section rsparse: {what}"));
        let u32_at = |at: usize| u32::from_le_bytes(bytes[at..at + 4].try_into().unwrap());
        let u64_at = |at: usize| u64::from_le_bytes(bytes[at..at + 8].try_into().unwrap());
        let f32_at = |at: usize| f32::from_bits(u32_at(at));
        if bytes.len() < HEADER_BYTES {
            return Err(corrupt(format!("{} bytes is shorter than its header", bytes.len())));
        }
        if u32_at(0) != VERSION {
            return Err(Error::unsupported(format!(
                "section rsparse version {} (this reader knows {VERSION})",
                u32_at(0)
            )));
        }
        let n = u32_at(4) as usize;
        let target = f32_at(8);
        if bytes.len() < HEADER_BYTES + n * MODULE_BYTES {
            return Err(corrupt(format!("{n} modules do not fit in {} bytes", bytes.len())));
        }
        let mut modules = Vec::with_capacity(n);
        let mut names = HashMap::new();
        for i in 0..n {
            let at = HEADER_BYTES + i * MODULE_BYTES;
            let name = read_fixed_name(&bytes[at..at + 56])
                .ok_or_else(|| corrupt(format!("module {i}: name is not ASCII")))?
                .to_string();
            let (rows, cols, rank) = (u32_at(at + 56) as usize, u32_at(at + 60) as usize, u32_at(at + 72) as usize);
            let (offset, size, checksum) = (u64_at(at + 80), u32_at(at + 88) as usize, u32_at(at + 92));
            let fail = |what: String| corrupt(format!("module {name}: {what}"));
            let scores_end = cols.checked_mul(4).ok_or_else(|| fail("size overflows".into()))?;
            let sv_start = align(scores_end);
            let sv_end = sv_start
                + rank.checked_mul(cols).and_then(|v| v.checked_mul(2)).ok_or_else(|| fail("size overflows".into()))?;
            let u_start = align(sv_end);
            let u_end = u_start
                + rows.checked_mul(rank).and_then(|v| v.checked_mul(2)).ok_or_else(|| fail("size overflows".into()))?;
            let start = usize::try_from(offset).map_err(|_| fail("offset overflows".into()))?;
            if !start.is_multiple_of(ALIGN)
                || size != u_end
                || start.checked_add(size).is_none_or(|end| end > bytes.len())
            {
                return Err(fail(format!(
                    "{size} bytes at {offset} (expected {u_end}, 64-aligned, inside the section)"
                )));
            }
            let data = &bytes[start..start + size];
            if crc32fast::hash(data) != checksum {
                return Err(fail("checksum mismatch (the file is corrupt)".into()));
            }
            let module = SparseModule {
                name: name.clone(),
                rows,
                cols,
                sparsity: f32_at(at + 64),
                alpha: f32_at(at + 68),
                threshold: f32_at(at + 76),
                scores: data[..scores_end].chunks_exact(4).map(|b| f32::from_le_bytes(b.try_into().unwrap())).collect(),
                rank,
                sv: data[sv_start..sv_end].chunks_exact(2).map(|b| f16::from_le_bytes([b[0], b[1]])).collect(),
                u: data[u_start..u_end].chunks_exact(2).map(|b| f16::from_le_bytes([b[0], b[1]])).collect(),
            };
            module.check()?;
            if names.insert(name.clone(), i).is_some() {
                return Err(corrupt(format!("module {name} appears twice")));
            }
            modules.push(module);
        }
        Ok(Self { target, modules })
    }

    /// The section's bytes.
    pub fn to_section(&self) -> Result<Vec<u8>> {
        let mut out = vec![0u8; align(HEADER_BYTES + self.modules.len() * MODULE_BYTES)];
        out[0..4].copy_from_slice(&VERSION.to_le_bytes());
        out[4..8].copy_from_slice(&(self.modules.len() as u32).to_le_bytes());
        out[8..12].copy_from_slice(&self.target.to_le_bytes());
        for (i, m) in self.modules.iter().enumerate() {
            m.check()?;
            let name = fixed_name::<56>(&m.name).ok_or_else(|| {
                Error::invalid(format!("rsparse module name {:?} is not ASCII of at most 55 bytes", m.name))
            })?;
            let mut data = Vec::new();
            data.extend(m.scores.iter().flat_map(|v| v.to_le_bytes()));
            data.resize(align(data.len()), 0);
            data.extend(m.sv.iter().flat_map(|v| v.to_le_bytes()));
            data.resize(align(data.len()), 0);
            data.extend(m.u.iter().flat_map(|v| v.to_le_bytes()));
            let offset = out.len();
            let at = HEADER_BYTES + i * MODULE_BYTES;
            out[at..at + 56].copy_from_slice(&name);
            for (field, value) in [(56, m.rows as u32), (60, m.cols as u32), (72, m.rank as u32)] {
                out[at + field..at + field + 4].copy_from_slice(&value.to_le_bytes());
            }
            for (field, value) in [(64, m.sparsity), (68, m.alpha), (76, m.threshold)] {
                out[at + field..at + field + 4].copy_from_slice(&value.to_le_bytes());
            }
            out[at + 80..at + 88].copy_from_slice(&(offset as u64).to_le_bytes());
            out[at + 88..at + 92].copy_from_slice(&(data.len() as u32).to_le_bytes());
            out[at + 92..at + 96].copy_from_slice(&crc32fast::hash(&data).to_le_bytes());
            out.extend_from_slice(&data);
            out.resize(align(out.len()), 0);
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn module(name: &str, rows: usize, cols: usize, rank: usize) -> SparseModule {
        SparseModule {
            name: name.into(),
            rows,
            cols,
            sparsity: 0.5,
            alpha: 0.95,
            threshold: 0.25,
            scores: (0..cols).map(|i| i as f32 * 0.5).collect(),
            rank,
            sv: (0..rank * cols).map(|i| f16::from_f32(i as f32 / 7.0)).collect(),
            u: (0..rows * rank).map(|i| f16::from_f32(-(i as f32) / 3.0)).collect(),
        }
    }

    #[test]
    fn round_trips_and_refuses_corruption() {
        let plan = Rsparse {
            target: 0.5,
            modules: vec![module("blk.0.ffn_up.weight", 24, 16, 3), module("blk.0.attn_q.weight", 16, 16, 0)],
        };
        let bytes = plan.to_section().unwrap();
        assert_eq!(Rsparse::from_section(&bytes).unwrap(), plan);
        // A flipped byte in a module's data fails its checksum, naming the module.
        let mut bad = bytes.clone();
        let first_data = u64::from_le_bytes(bytes[HEADER_BYTES + 80..HEADER_BYTES + 88].try_into().unwrap()) as usize;
        bad[first_data + 5] ^= 1;
        let error = Rsparse::from_section(&bad).err().unwrap();
        assert!(error.message().contains("checksum") && error.message().contains("blk.0.ffn_up"), "{error}");
        // Truncation is an error, not a panic.
        for cut in [0, 10, 40, bytes.len() / 2] {
            assert!(Rsparse::from_section(&bytes[..cut]).is_err(), "cut at {cut}");
        }
    }

    #[test]
    fn budget_follows_the_paper() {
        // 50 % of a 576 × 1536 module, α = 0.95: 729 exact channels and rank 13.
        let (kept, rank) = SparseModule::budget(576, 1536, 0.5, 0.95);
        assert_eq!(kept, 729);
        assert_eq!(rank, ((1536.0 * 576.0 * 0.5 - 729.0 * 576.0) / (1536.0 + 576.0)) as usize);
        assert_eq!(SparseModule::budget(64, 64, 0.5, 1.0), (32, 0));
    }
}
