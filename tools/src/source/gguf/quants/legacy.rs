//! ggml's 5-bit block formats Q5_0 and Q5_1, blocks of 32 with the fifth bit
//! of every value packed in one `u32`, written here independently of the
//! runtime's Q5S and Q5 (which are the same bytes), as their reference.
//! (Q4_0, Q4_1 and Q8_0 are our own Q4S, Q4 and Q8 byte for byte.)

use super::{f16_bytes, f16_value, Block};
use bytemuck::{Pod, Zeroable};

/// Values per Q5_0 / Q5_1 block.
const QK5: usize = 32;

/// Value `j` of a 5-bit block: the low nibble of `qs[j]` (values 0–15) or the
/// high nibble of `qs[j − 16]` (16–31), with bit `j` of `qh` on top.
fn level(qs: &[u8; 16], qh: u32, j: usize) -> u8 {
    let low = if j < QK5 / 2 { qs[j] & 0xF } else { qs[j - QK5 / 2] >> 4 };
    low | ((((qh >> j) & 1) as u8) << 4)
}

/// Packs 32 levels of 0–31 into `qs` and `qh` (the inverse of [`level`]).
fn pack_levels(levels: &[u8; QK5], qs: &mut [u8; 16], qh: &mut [u8; 4]) {
    let mut high = 0u32;
    for j in 0..QK5 / 2 {
        qs[j] = (levels[j] & 0xF) | ((levels[j + QK5 / 2] & 0xF) << 4);
    }
    for (j, &l) in levels.iter().enumerate() {
        high |= ((l as u32 >> 4) & 1) << j;
    }
    *qh = high.to_le_bytes();
}

/// ```c
/// typedef struct {
///     ggml_half d;       // scale
///     uint8_t   qh[4];   // fifth bit of each value, value j in bit j
///     uint8_t   qs[16];  // low nibbles: value j in qs[j] & 15, value j+16 in qs[j] >> 4
/// } block_q5_0;          // value = d * (q - 16)
/// ```
#[repr(C)]
#[derive(Clone, Copy, Pod, Zeroable)]
pub(super) struct BlockQ5_0 {
    d: [u8; 2],
    qh: [u8; 4],
    qs: [u8; 16],
}
const _: () = assert!(size_of::<BlockQ5_0>() == 22);

impl Block for BlockQ5_0 {
    const VALUES: usize = QK5;

    /// ggml's `dequantize_row_q5_0`.
    fn dequantize(&self, out: &mut [f32]) {
        let d = f16_value(self.d);
        let qh = u32::from_le_bytes(self.qh);
        for (j, value) in out.iter_mut().enumerate() {
            *value = (level(&self.qs, qh, j) as i32 - 16) as f32 * d;
        }
    }

    /// ggml's `quantize_row_q5_0_ref`: the value of largest magnitude maps to −16.
    fn quantize(values: &[f32]) -> Self {
        let extreme = values.iter().fold(0f32, |m, &v| if v.abs() > m.abs() { v } else { m });
        let d = extreme / -16.0;
        let inverse = if d != 0.0 { 1.0 / d } else { 0.0 };
        let mut levels = [0u8; QK5];
        for (level, &x) in levels.iter_mut().zip(values) {
            // ggml truncates to int8 after adding 16.5, then caps at 31.
            *level = ((x * inverse + 16.5) as i8).clamp(0, 31) as u8;
        }
        let mut block = BlockQ5_0 { d: f16_bytes(d), ..Zeroable::zeroed() };
        pack_levels(&levels, &mut block.qs, &mut block.qh);
        block
    }
}

/// ```c
/// typedef struct {
///     ggml_half d;       // scale
///     ggml_half m;       // minimum
///     uint8_t   qh[4];   // fifth bit of each value, value j in bit j
///     uint8_t   qs[16];  // low nibbles, as block_q5_0
/// } block_q5_1;          // value = d * q + m
/// ```
#[repr(C)]
#[derive(Clone, Copy, Pod, Zeroable)]
pub(super) struct BlockQ5_1 {
    d: [u8; 2],
    m: [u8; 2],
    qh: [u8; 4],
    qs: [u8; 16],
}
const _: () = assert!(size_of::<BlockQ5_1>() == 24);

impl Block for BlockQ5_1 {
    const VALUES: usize = QK5;

    /// ggml's `dequantize_row_q5_1`.
    fn dequantize(&self, out: &mut [f32]) {
        let (d, m) = (f16_value(self.d), f16_value(self.m));
        let qh = u32::from_le_bytes(self.qh);
        for (j, value) in out.iter_mut().enumerate() {
            *value = level(&self.qs, qh, j) as f32 * d + m;
        }
    }

    /// ggml's `quantize_row_q5_1_ref`: 31 steps from the minimum to the
    /// maximum, each level truncated to `uint8` after adding 0.5 (no cap; its
    /// low five bits are stored).
    fn quantize(values: &[f32]) -> Self {
        let min = values.iter().fold(f32::INFINITY, |m, &v| m.min(v));
        let max = values.iter().fold(f32::NEG_INFINITY, |m, &v| m.max(v));
        let d = (max - min) / 31.0;
        let inverse = if d != 0.0 { 1.0 / d } else { 0.0 };
        let mut levels = [0u8; QK5];
        for (level, &x) in levels.iter_mut().zip(values) {
            *level = ((x - min) * inverse + 0.5) as u8;
        }
        let mut block = BlockQ5_1 { d: f16_bytes(d), m: f16_bytes(min), ..Zeroable::zeroed() };
        pack_levels(&levels, &mut block.qs, &mut block.qh);
        block
    }
}
