//! ggml's k-quants: super-blocks of 256 values in sub-blocks of 16 or 32, each
//! sub-block with a small integer scale (and minimum) that multiplies the
//! super-block's f16 `d` (and `dmin`).
//!
//! The blocks are ggml's byte for byte (`#[repr(C)]`, alignment 1, so a view
//! can start at any byte), with ggml's `dequantize_row_*` expansion. The
//! quantizers here are simple min/max ones (not ggml's search), enough to
//! write valid test models.

use bytemuck::{Pod, Zeroable};
use half::f16;

/// Values per k-quant super-block.
pub const QK_K: usize = 256;

/// The f16 stored little-endian in `bytes`, as f32 (exact).
pub fn f16_value(bytes: [u8; 2]) -> f32 {
    f16::from_le_bytes(bytes).to_f32()
}

/// `value` rounded to f16, little-endian.
pub fn f16_bytes(value: f32) -> [u8; 2] {
    f16::from_f32(value).to_le_bytes()
}

/// The value of largest magnitude, with its sign (0 for an empty or all-zero slice).
pub fn extreme(values: &[f32]) -> f32 {
    values.iter().fold(0f32, |m, &v| if v.abs() > m.abs() { v } else { m })
}

/// `value / unit` rounded into `0..=top`, or 0 when `unit` is 0.
fn steps(value: f32, unit: f32, top: f32) -> u8 {
    if unit > 0.0 {
        (value / unit).round().clamp(0.0, top) as u8
    } else {
        0
    }
}

/// `value / unit` rounded into `low..=high`, or 0 when `unit` is 0.
fn signed_steps(value: f32, unit: f32, low: f32, high: f32) -> i32 {
    if unit != 0.0 {
        (value / unit).round().clamp(low, high) as i32
    } else {
        0
    }
}

/// Per sub-block of `sub` values: a step and an offset (the negated minimum,
/// clamped to ≥ 0 as ggml's minimums are subtracted) spanning `top` levels.
fn steps_and_offsets<const N: usize>(x: &[f32], top: f32) -> ([f32; N], [f32; N]) {
    let (mut scales, mut offsets) = ([0f32; N], [0f32; N]);
    for (j, sub) in x.chunks_exact(x.len() / N).enumerate() {
        let min = sub.iter().fold(0f32, |m, &v| m.min(v));
        let max = sub.iter().fold(f32::NEG_INFINITY, |m, &v| m.max(v));
        scales[j] = (max - min) / top;
        offsets[j] = -min;
    }
    (scales, offsets)
}

/// Levels in `0..=top` of `x` against the decoded `step` and `shift` (value = step·q − shift).
fn levels_against(x: &[f32], step: f32, shift: f32, top: f32, levels: &mut [u8]) {
    for (level, &value) in levels.iter_mut().zip(x) {
        *level = if step > 0.0 { ((value + shift) / step).round().clamp(0.0, top) as u8 } else { 0 };
    }
}

/// Sub-block `j`'s 6-bit scale and minimum from the 12 packed scale bytes of
/// Q4_K and Q5_K (ggml's `get_scale_min_k4`): sub-blocks 0–3 use the low 6 bits
/// of bytes 0–7; 4–7 take 4 bits from bytes 8–11 and their top 2 bits from the
/// top of bytes 0–7.
pub fn scale_min_k4(j: usize, scales: &[u8; 12]) -> (u8, u8) {
    if j < 4 {
        (scales[j] & 63, scales[j + 4] & 63)
    } else {
        let scale = (scales[j + 4] & 0xF) | ((scales[j - 4] >> 6) << 4);
        let min = (scales[j + 4] >> 4) | ((scales[j] >> 6) << 4);
        (scale, min)
    }
}

/// The walk Q4_K and Q5_K share: per sub-block of 32, `d · scale · level −
/// dmin · min`, where `level(sub, l, low)` completes the 4-bit `low` read from
/// `qs` (sub-blocks 2c and 2c + 1 in the low and high nibbles of
/// `qs[32c..32c + 32]`) with whatever else the format stores.
fn dequantize_k4(
    d: [u8; 2],
    dmin: [u8; 2],
    scales: &[u8; 12],
    qs: &[u8],
    out: &mut [f32],
    level: impl Fn(usize, usize, u8) -> u8,
) {
    let (d, dmin) = (f16_value(d), f16_value(dmin));
    for (sub, y) in out.chunks_exact_mut(32).enumerate() {
        let (chunk, high) = (sub / 2, sub % 2);
        let (scale, min) = scale_min_k4(sub, scales);
        let (step, shift) = (d * scale as f32, dmin * min as f32);
        for (l, (value, &byte)) in y.iter_mut().zip(&qs[32 * chunk..32 * chunk + 32]).enumerate() {
            *value = step * level(sub, l, (byte >> (4 * high)) & 0xF) as f32 - shift;
        }
    }
}

/// The inverse of [`scale_min_k4`] for sub-block `j` (`packed` starts zeroed).
fn pack_scale_min_k4(j: usize, scale: u8, min: u8, packed: &mut [u8; 12]) {
    if j < 4 {
        packed[j] |= scale;
        packed[j + 4] |= min;
    } else {
        packed[j + 4] = (scale & 0xF) | ((min & 0xF) << 4);
        packed[j - 4] |= (scale >> 4) << 6;
        packed[j] |= (min >> 4) << 6;
    }
}

/// The scales and minimums of a Q4_K / Q5_K super-block.
struct K4Scales {
    d: [u8; 2],
    dmin: [u8; 2],
    /// The 6-bit pairs, packed as [`scale_min_k4`] reads them.
    packed: [u8; 12],
    /// Each sub-block's step and shift as they will be decoded, to quantize against.
    decoded: [(f32, f32); 8],
}

/// Min/max scales and minimums for a Q4_K / Q5_K super-block with `top + 1` levels per value.
fn k4_scales(x: &[f32], top: f32) -> K4Scales {
    let (scales, offsets) = steps_and_offsets::<8>(x, top);
    let d = f16_bytes(scales.iter().fold(0f32, |m, &v| m.max(v)) / 63.0);
    let dmin = f16_bytes(offsets.iter().fold(0f32, |m, &v| m.max(v)) / 63.0);
    let (unit, unit_min) = (f16_value(d), f16_value(dmin));
    let mut packed = [0u8; 12];
    let mut decoded = [(0f32, 0f32); 8];
    for j in 0..8 {
        let (scale, min) = (steps(scales[j], unit, 63.0), steps(offsets[j], unit_min, 63.0));
        pack_scale_min_k4(j, scale, min, &mut packed);
        decoded[j] = (unit * scale as f32, unit_min * min as f32);
    }
    K4Scales { d, dmin, packed, decoded }
}

/// ```c
/// typedef struct {
///     uint8_t   scales[16];  // sub-block j of 16: scale in the low nibble, minimum in the high
///     uint8_t   qs[64];      // 2-bit values, see below
///     ggml_half d;           // unit of the scales
///     ggml_half dmin;        // unit of the minimums
/// } block_q2_K;              // value = d * scale * q - dmin * min
/// ```
/// Value `128n + 32j + 16h + l` is bits `2j..2j+2` of `qs[32n + 16h + l]`.
#[repr(C)]
#[derive(Clone, Copy, Pod, Zeroable)]
pub struct BlockQ2K {
    /// Sub-block scales (and minimums), packed as the C comment above says.
    pub scales: [u8; QK_K / 16],
    /// Low bits of the values.
    pub qs: [u8; QK_K / 4],
    /// f16 unit of the scales, little-endian.
    pub d: [u8; 2],
    /// f16 unit of the minimums, little-endian.
    pub dmin: [u8; 2],
}
const _: () = assert!(size_of::<BlockQ2K>() == 84);

impl BlockQ2K {
    /// Values per block.
    pub const VALUES: usize = QK_K;

    /// ggml's `dequantize_row_q2_K`.
    pub fn dequantize(&self, out: &mut [f32]) {
        let (d, dmin) = (f16_value(self.d), f16_value(self.dmin));
        for (sub, y) in out.chunks_exact_mut(16).enumerate() {
            let (n, j, h) = (sub / 8, sub % 8 / 2, sub % 2);
            let scale = self.scales[sub];
            let (step, shift) = (d * (scale & 0xF) as f32, dmin * (scale >> 4) as f32);
            let q = &self.qs[32 * n + 16 * h..32 * n + 16 * h + 16];
            for (value, &byte) in y.iter_mut().zip(q) {
                *value = step * ((byte >> (2 * j)) & 3) as f32 - shift;
            }
        }
    }

    /// Min/max per sub-block of 16: 3 steps, 4-bit scale and minimum.
    pub fn quantize(x: &[f32]) -> Self {
        let (scales, offsets) = steps_and_offsets::<16>(x, 3.0);
        let d = f16_bytes(scales.iter().fold(0f32, |m, &v| m.max(v)) / 15.0);
        let dmin = f16_bytes(offsets.iter().fold(0f32, |m, &v| m.max(v)) / 15.0);
        let (unit, unit_min) = (f16_value(d), f16_value(dmin));
        let mut block = BlockQ2K { d, dmin, ..Zeroable::zeroed() };
        let mut levels = [0u8; 16];
        for (sub, values) in x.chunks_exact(16).enumerate() {
            let (scale, min) = (steps(scales[sub], unit, 15.0), steps(offsets[sub], unit_min, 15.0));
            block.scales[sub] = scale | (min << 4);
            levels_against(values, unit * scale as f32, unit_min * min as f32, 3.0, &mut levels);
            let (n, j, h) = (sub / 8, sub % 8 / 2, sub % 2);
            for (byte, &level) in block.qs[32 * n + 16 * h..].iter_mut().zip(&levels) {
                *byte |= level << (2 * j);
            }
        }
        block
    }
}

/// ```c
/// typedef struct {
///     uint8_t   hmask[32];   // high bit of each value, see below
///     uint8_t   qs[64];      // low 2 bits of each value, as block_q2_K
///     uint8_t   scales[12];  // 16 scales of 6 bits, see below
///     ggml_half d;           // unit of the scales
/// } block_q3_K;              // value = d * (scale - 32) * (q - 4), q = low | high << 2
/// ```
/// Value `v = 128n + 32j + 16h + l` takes its high bit from bit `4n + j` of
/// `hmask[16h + l]`. Scale `i` has its low nibble in the low (i < 8) or high
/// (i ≥ 8) nibble of byte `i mod 8`, its top 2 bits at bit `2·(i / 4)` of byte `8 + i mod 4`.
#[repr(C)]
#[derive(Clone, Copy, Pod, Zeroable)]
pub struct BlockQ3K {
    /// High bit of each value.
    pub hmask: [u8; QK_K / 8],
    /// Low bits of the values.
    pub qs: [u8; QK_K / 4],
    /// Sub-block scales (and minimums), packed as the C comment above says.
    pub scales: [u8; 12],
    /// f16 unit of the scales, little-endian.
    pub d: [u8; 2],
}
const _: () = assert!(size_of::<BlockQ3K>() == 110);

impl BlockQ3K {
    /// Scale `i` of 16, in `0..64` (ggml's `kmask` unpacking of `scales`).
    pub fn scale(&self, i: usize) -> u8 {
        let low = if i < 8 { self.scales[i] & 0xF } else { self.scales[i - 8] >> 4 };
        let high = (self.scales[8 + i % 4] >> (2 * (i / 4))) & 3;
        low | (high << 4)
    }

    /// Values per block.
    pub const VALUES: usize = QK_K;

    /// ggml's `dequantize_row_q3_K`.
    pub fn dequantize(&self, out: &mut [f32]) {
        let d = f16_value(self.d);
        for (sub, y) in out.chunks_exact_mut(16).enumerate() {
            let (n, j, h) = (sub / 8, sub % 8 / 2, sub % 2);
            let step = d * (self.scale(sub) as i32 - 32) as f32;
            let q = &self.qs[32 * n + 16 * h..32 * n + 16 * h + 16];
            let high_bits = &self.hmask[16 * h..16 * h + 16];
            let mask = 1u8 << (4 * n + j);
            for ((value, &low), &high) in y.iter_mut().zip(q).zip(high_bits) {
                // A clear high bit means 4 below the low bits.
                let level = ((low >> (2 * j)) & 3) as i32 - if high & mask != 0 { 0 } else { 4 };
                *value = step * level as f32;
            }
        }
    }

    /// Per sub-block of 16, a signed scale mapping its value of largest
    /// magnitude to −4 (levels −4..=3), stored as a 6-bit multiple of `d`.
    pub fn quantize(x: &[f32]) -> Self {
        let scales: Vec<f32> = x.chunks_exact(16).map(|sub| extreme(sub) / -4.0).collect();
        let d = f16_bytes(scales.iter().fold(0f32, |m, &v| m.max(v.abs())) / 31.0);
        let unit = f16_value(d);
        let mut block = BlockQ3K { d, ..Zeroable::zeroed() };
        for (sub, values) in x.chunks_exact(16).enumerate() {
            let scale = signed_steps(scales[sub], unit, -32.0, 31.0);
            let stored = (scale + 32) as u8;
            if sub < 8 {
                block.scales[sub] |= stored & 0xF;
            } else {
                block.scales[sub - 8] |= (stored & 0xF) << 4;
            }
            block.scales[8 + sub % 4] |= (stored >> 4) << (2 * (sub / 4));
            let step = unit * scale as f32;
            let (n, j, h) = (sub / 8, sub % 8 / 2, sub % 2);
            for (l, &value) in values.iter().enumerate() {
                let level = (signed_steps(value, step, -4.0, 3.0) + 4) as u8;
                block.qs[32 * n + 16 * h + l] |= (level & 3) << (2 * j);
                block.hmask[16 * h + l] |= (level >> 2) << (4 * n + j);
            }
        }
        block
    }
}

/// ```c
/// typedef struct {
///     ggml_half d;           // unit of the scales
///     ggml_half dmin;        // unit of the minimums
///     uint8_t   scales[12];  // 8 scales and 8 minimums of 6 bits (get_scale_min_k4)
///     uint8_t   qs[128];     // 4-bit values: value 64c + l in qs[32c + l] & 15, 64c + 32 + l in >> 4
/// } block_q4_K;              // value = d * scale * q - dmin * min, sub-blocks of 32
/// ```
#[repr(C)]
#[derive(Clone, Copy, Pod, Zeroable)]
pub struct BlockQ4K {
    /// f16 unit of the scales, little-endian.
    pub d: [u8; 2],
    /// f16 unit of the minimums, little-endian.
    pub dmin: [u8; 2],
    /// Sub-block scales (and minimums), packed as the C comment above says.
    pub scales: [u8; 12],
    /// Low bits of the values.
    pub qs: [u8; QK_K / 2],
}
const _: () = assert!(size_of::<BlockQ4K>() == 144);

impl BlockQ4K {
    /// Values per block.
    pub const VALUES: usize = QK_K;

    /// ggml's `dequantize_row_q4_K`.
    pub fn dequantize(&self, out: &mut [f32]) {
        dequantize_k4(self.d, self.dmin, &self.scales, &self.qs, out, |_, _, low| low);
    }

    /// Min/max per sub-block of 32: 15 steps, 6-bit scale and minimum.
    pub fn quantize(x: &[f32]) -> Self {
        let K4Scales { d, dmin, packed, decoded } = k4_scales(x, 15.0);
        let mut block = BlockQ4K { d, dmin, scales: packed, qs: [0; QK_K / 2] };
        let mut levels = [0u8; 32];
        for (sub, values) in x.chunks_exact(32).enumerate() {
            levels_against(values, decoded[sub].0, decoded[sub].1, 15.0, &mut levels);
            let (chunk, high) = (sub / 2, sub % 2);
            for (byte, &level) in block.qs[32 * chunk..].iter_mut().zip(&levels) {
                *byte |= level << (4 * high);
            }
        }
        block
    }
}

/// ```c
/// typedef struct {
///     ggml_half d;           // unit of the scales
///     ggml_half dmin;        // unit of the minimums
///     uint8_t   scales[12];  // as block_q4_K
///     uint8_t   qh[32];      // fifth bit: value 32s + l in bit s of qh[l]
///     uint8_t   qs[128];     // low 4 bits, as block_q4_K
/// } block_q5_K;              // value = d * scale * q - dmin * min, sub-blocks of 32
/// ```
#[repr(C)]
#[derive(Clone, Copy, Pod, Zeroable)]
pub struct BlockQ5K {
    /// f16 unit of the scales, little-endian.
    pub d: [u8; 2],
    /// f16 unit of the minimums, little-endian.
    pub dmin: [u8; 2],
    /// Sub-block scales (and minimums), packed as the C comment above says.
    pub scales: [u8; 12],
    /// High bits of the values.
    pub qh: [u8; QK_K / 8],
    /// Low bits of the values.
    pub qs: [u8; QK_K / 2],
}
const _: () = assert!(size_of::<BlockQ5K>() == 176);

impl BlockQ5K {
    /// Values per block.
    pub const VALUES: usize = QK_K;

    /// ggml's `dequantize_row_q5_K`.
    pub fn dequantize(&self, out: &mut [f32]) {
        let qh = &self.qh;
        dequantize_k4(self.d, self.dmin, &self.scales, &self.qs, out, |sub, l, low| {
            low + if qh[l] & (1 << sub) != 0 { 16 } else { 0 }
        });
    }

    /// Min/max per sub-block of 32: 31 steps, 6-bit scale and minimum.
    pub fn quantize(x: &[f32]) -> Self {
        let K4Scales { d, dmin, packed, decoded } = k4_scales(x, 31.0);
        let mut block = BlockQ5K { d, dmin, scales: packed, ..Zeroable::zeroed() };
        let mut levels = [0u8; 32];
        for (sub, values) in x.chunks_exact(32).enumerate() {
            levels_against(values, decoded[sub].0, decoded[sub].1, 31.0, &mut levels);
            let (chunk, high) = (sub / 2, sub % 2);
            for (l, &level) in levels.iter().enumerate() {
                block.qs[32 * chunk + l] |= (level & 0xF) << (4 * high);
                block.qh[l] |= (level >> 4) << sub;
            }
        }
        block
    }
}

/// ```c
/// typedef struct {
///     uint8_t   ql[128];     // low 4 bits, see below
///     uint8_t   qh[64];      // high 2 bits, see below
///     int8_t    scales[16];  // one per sub-block of 16
///     ggml_half d;           // unit of the scales
/// } block_q6_K;              // value = d * scale * (q - 32)
/// ```
/// In each half `s` of 128 values, value `32k + l` (k < 4) has its low bits in
/// the low (k < 2) or high nibble of `ql[64s + 32·(k mod 2) + l]` and its high
/// bits at bit `2k` of `qh[32s + l]`.
#[repr(C)]
#[derive(Clone, Copy, Pod, Zeroable)]
pub struct BlockQ6K {
    /// Low 4 bits of the values.
    pub ql: [u8; QK_K / 2],
    /// High bits of the values.
    pub qh: [u8; QK_K / 4],
    /// Sub-block scales (and minimums), packed as the C comment above says.
    pub scales: [u8; QK_K / 16],
    /// f16 unit of the scales, little-endian.
    pub d: [u8; 2],
}
const _: () = assert!(size_of::<BlockQ6K>() == 210);

impl BlockQ6K {
    /// Values per block.
    pub const VALUES: usize = QK_K;

    /// ggml's `dequantize_row_q6_K`.
    pub fn dequantize(&self, out: &mut [f32]) {
        let d = f16_value(self.d);
        for (quarter, y) in out.chunks_exact_mut(32).enumerate() {
            let (half, k) = (quarter / 4, quarter % 4);
            let low_bits = &self.ql[64 * half + 32 * (k % 2)..][..32];
            let high_bits = &self.qh[32 * half..32 * half + 32];
            for (l, ((value, &low), &high)) in y.iter_mut().zip(low_bits).zip(high_bits).enumerate() {
                let level = ((low >> (4 * (k / 2))) & 0xF) | (((high >> (2 * k)) & 3) << 4);
                let scale = self.scales[8 * half + 2 * k + l / 16] as i8;
                *value = d * scale as f32 * (level as i32 - 32) as f32;
            }
        }
    }

    /// Per sub-block of 16, a signed scale mapping its value of largest
    /// magnitude to −32 (so 6 bits cover [−32, 31] of it), stored as an 8-bit
    /// multiple of `d`.
    pub fn quantize(x: &[f32]) -> Self {
        let scales: Vec<f32> = x.chunks_exact(16).map(|sub| extreme(sub) / -32.0).collect();
        let d = f16_bytes(scales.iter().fold(0f32, |m, &v| m.max(v.abs())) / 127.0);
        let unit = f16_value(d);
        let mut block = BlockQ6K { d, ..Zeroable::zeroed() };
        for (sub, values) in x.chunks_exact(16).enumerate() {
            let scale = signed_steps(scales[sub], unit, -127.0, 127.0);
            block.scales[sub] = scale as i8 as u8;
            let step = unit * scale as f32;
            for (i, &value) in values.iter().enumerate() {
                let level = (signed_steps(value, step, -32.0, 31.0) + 32) as u8;
                let index = 16 * sub + i;
                let (half, k, l) = (index / 128, index % 128 / 32, index % 32);
                block.ql[64 * half + 32 * (k % 2) + l] |= (level & 0xF) << (4 * (k / 2));
                block.qh[32 * half + l] |= (level >> 4) << (2 * k);
            }
        }
        block
    }
}
