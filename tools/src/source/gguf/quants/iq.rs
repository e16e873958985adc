//! ggml's non-linear 4-bit i-quants, IQ4_NL and IQ4_XS: each 4-bit index picks
//! one of 16 fixed levels ([`IQ4_LEVELS`]), denser near zero, times a scale.
//! (The other i-quants index lattice codebooks and are not read.)
//!
//! The quantizers pick the nearest level under a scale that maps each block's
//! value of largest magnitude to the most negative level (not ggml's search).

use super::k::QK_K;
use super::{extreme, f16_bytes, f16_value, Block};
use bytemuck::{Pod, Zeroable};

/// ggml's `kvalues_iq4nl`: the 16 levels a 4-bit index selects.
const IQ4_LEVELS: [i8; 16] = [-127, -104, -83, -65, -49, -35, -22, -10, 1, 13, 25, 38, 53, 69, 89, 113];

/// Values per IQ4_NL block, and per IQ4_XS sub-block.
const QK4_NL: usize = 32;

/// The index of the level nearest `value / step` (0 when `step` is 0).
fn nearest_level(value: f32, step: f32) -> u8 {
    if step == 0.0 {
        return 0;
    }
    let target = value / step;
    let distance = |i: usize| (IQ4_LEVELS[i] as f32 - target).abs();
    (0..16).fold(0, |best, i| if distance(i) < distance(best) { i } else { best }) as u8
}

/// Expands 32 values from 16 bytes of indices (value `j` in the low nibble of
/// byte `j`, value `j + 16` in the high nibble) times `step`.
fn expand(qs: &[u8], step: f32, out: &mut [f32]) {
    for (j, value) in out.iter_mut().enumerate() {
        let index = if j < QK4_NL / 2 { qs[j] & 0xF } else { qs[j - QK4_NL / 2] >> 4 };
        *value = step * IQ4_LEVELS[index as usize] as f32;
    }
}

/// The inverse of [`expand`]: indices of the levels nearest `values / step`.
fn pack(values: &[f32], step: f32, qs: &mut [u8]) {
    for j in 0..QK4_NL / 2 {
        qs[j] = nearest_level(values[j], step) | (nearest_level(values[j + QK4_NL / 2], step) << 4);
    }
}

/// ```c
/// typedef struct {
///     ggml_half d;       // scale
///     uint8_t   qs[16];  // level indices: value j in qs[j] & 15, value j+16 in qs[j] >> 4
/// } block_iq4_nl;        // value = d * kvalues_iq4nl[index]
/// ```
#[repr(C)]
#[derive(Clone, Copy, Pod, Zeroable)]
pub(super) struct BlockIq4Nl {
    d: [u8; 2],
    qs: [u8; QK4_NL / 2],
}
const _: () = assert!(size_of::<BlockIq4Nl>() == 18);

impl Block for BlockIq4Nl {
    const VALUES: usize = QK4_NL;

    /// ggml's `dequantize_row_iq4_nl`.
    fn dequantize(&self, out: &mut [f32]) {
        expand(&self.qs, f16_value(self.d), out);
    }

    fn quantize(values: &[f32]) -> Self {
        let d = f16_bytes(extreme(values) / IQ4_LEVELS[0] as f32);
        let mut block = BlockIq4Nl { d, qs: [0; QK4_NL / 2] };
        pack(values, f16_value(d), &mut block.qs);
        block
    }
}

/// ```c
/// typedef struct {
///     ggml_half d;           // unit of the scales
///     uint16_t  scales_h;    // top 2 bits of sub-block j's scale at bit 2j
///     uint8_t   scales_l[4]; // low 4 bits of sub-block j's scale: nibble j % 2 of byte j / 2
///     uint8_t   qs[128];     // level indices, 16 bytes per sub-block of 32, as block_iq4_nl
/// } block_iq4_xs;            // value = d * (scale - 32) * kvalues_iq4nl[index]
/// ```
#[repr(C)]
#[derive(Clone, Copy, Pod, Zeroable)]
pub(super) struct BlockIq4Xs {
    d: [u8; 2],
    scales_h: [u8; 2],
    scales_l: [u8; QK_K / 64],
    qs: [u8; QK_K / 2],
}
const _: () = assert!(size_of::<BlockIq4Xs>() == 136);

impl Block for BlockIq4Xs {
    const VALUES: usize = QK_K;

    /// ggml's `dequantize_row_iq4_xs`.
    fn dequantize(&self, out: &mut [f32]) {
        let d = f16_value(self.d);
        let scales_h = u16::from_le_bytes(self.scales_h);
        for (sub, y) in out.chunks_exact_mut(QK4_NL).enumerate() {
            let low = (self.scales_l[sub / 2] >> (4 * (sub % 2))) & 0xF;
            let high = ((scales_h >> (2 * sub)) & 3) as u8;
            let scale = (low | (high << 4)) as i32 - 32;
            expand(&self.qs[16 * sub..16 * sub + 16], d * scale as f32, y);
        }
    }

    /// Per sub-block of 32, a scale mapping its extreme to level −127, stored
    /// as a 6-bit signed multiple of `d`.
    fn quantize(x: &[f32]) -> Self {
        let scales: Vec<f32> = x.chunks_exact(QK4_NL).map(|sub| extreme(sub) / IQ4_LEVELS[0] as f32).collect();
        let d = f16_bytes(scales.iter().fold(0f32, |m, &v| m.max(v.abs())) / 31.0);
        let unit = f16_value(d);
        let mut block = BlockIq4Xs { d, ..Zeroable::zeroed() };
        let mut scales_h = 0u16;
        for (sub, values) in x.chunks_exact(QK4_NL).enumerate() {
            let scale = if unit != 0.0 { (scales[sub] / unit).round().clamp(-32.0, 31.0) as i32 } else { 0 };
            let stored = (scale + 32) as u8;
            block.scales_l[sub / 2] |= (stored & 0xF) << (4 * (sub % 2));
            scales_h |= ((stored >> 4) as u16) << (2 * sub);
            pack(values, unit * scale as f32, &mut block.qs[16 * sub..16 * sub + 16]);
        }
        block.scales_h = scales_h.to_le_bytes();
        block
    }
}
