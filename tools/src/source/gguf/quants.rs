//! ggml's block encodings that are not ours: k-quants (Q4_K, Q6_K) and BF16,
//! expanded exactly as ggml's `dequantize_row_*` do, plus simple quantizers for
//! writing test models. Q8_0, Q4_0, Q4_1, F16 and F32 are our own encodings
//! byte for byte and go through `bramble_runtime::quant`.

use super::GgmlType;
use anyhow::{bail, Result};
use bramble_runtime::quant::{dequantize_from, quantize_into};
use half::f16;

/// Values per k-quant super-block.
pub const QK_K: usize = 256;
/// Bytes of a Q4_K super-block: `{ f16 d; f16 dmin; u8 scales[12]; u8 qs[128]; }`.
const Q4_K_BYTES: usize = 144;
/// Bytes of a Q6_K super-block: `{ u8 ql[128]; u8 qh[64]; i8 scales[16]; f16 d; }`.
const Q6_K_BYTES: usize = 210;

fn read_f16(bytes: &[u8]) -> f32 {
    f16::from_le_bytes([bytes[0], bytes[1]]).to_f32()
}

/// Expands `out.len()` values of type `ggml_type` from `bytes`, which must hold
/// exactly that many values ([`GgmlType::bytes_for`]).
pub fn dequantize(ggml_type: GgmlType, bytes: &[u8], out: &mut [f32]) -> Result<()> {
    let (block_values, _) = ggml_type.block_layout();
    if !out.len().is_multiple_of(block_values) || bytes.len() != ggml_type.bytes_for(out.len()) {
        bail!("{} bytes do not hold {} values of {ggml_type} (blocks of {block_values})", bytes.len(), out.len());
    }
    if let Some(encoding) = ggml_type.native_encoding() {
        dequantize_from(encoding, bytes, out);
        return Ok(());
    }
    match ggml_type {
        GgmlType::BF16 => {
            for (value, raw) in out.iter_mut().zip(bytes.chunks_exact(2)) {
                *value = f32::from_bits((u16::from_le_bytes([raw[0], raw[1]]) as u32) << 16);
            }
        }
        GgmlType::Q4_K => {
            for (block, values) in bytes.chunks_exact(Q4_K_BYTES).zip(out.chunks_exact_mut(QK_K)) {
                dequantize_block_q4_k(block, values);
            }
        }
        GgmlType::Q6_K => {
            for (block, values) in bytes.chunks_exact(Q6_K_BYTES).zip(out.chunks_exact_mut(QK_K)) {
                dequantize_block_q6_k(block, values);
            }
        }
        other => bail!("cannot dequantize {other}"),
    }
    Ok(())
}

/// Sub-block `j`'s 6-bit scale and minimum from Q4_K's 12 packed scale bytes
/// (ggml's `get_scale_min_k4`): sub-blocks 0–3 use the low 6 bits of bytes 0–7;
/// 4–7 take 4 bits from bytes 8–11 and their top 2 bits from the top of bytes 0–7.
fn scale_min_k4(j: usize, scales: &[u8]) -> (u8, u8) {
    if j < 4 {
        (scales[j] & 63, scales[j + 4] & 63)
    } else {
        let scale = (scales[j + 4] & 0xF) | ((scales[j - 4] >> 6) << 4);
        let min = (scales[j + 4] >> 4) | ((scales[j] >> 6) << 4);
        (scale, min)
    }
}

/// ggml's `dequantize_row_q4_K` for one super-block: 8 sub-blocks of 32, value
/// `d·scale·n − dmin·min`; each 32 bytes of `qs` hold two sub-blocks, the first
/// in the low nibbles.
fn dequantize_block_q4_k(block: &[u8], out: &mut [f32]) {
    let d = read_f16(&block[0..2]);
    let dmin = read_f16(&block[2..4]);
    let scales = &block[4..16];
    let qs = &block[16..144];
    for (chunk, (q, y)) in qs.chunks_exact(32).zip(out.chunks_exact_mut(64)).enumerate() {
        let (scale, min) = scale_min_k4(2 * chunk, scales);
        let (d1, m1) = (d * scale as f32, dmin * min as f32);
        let (scale, min) = scale_min_k4(2 * chunk + 1, scales);
        let (d2, m2) = (d * scale as f32, dmin * min as f32);
        for l in 0..32 {
            y[l] = d1 * (q[l] & 0xF) as f32 - m1;
            y[l + 32] = d2 * (q[l] >> 4) as f32 - m2;
        }
    }
}

/// ggml's `dequantize_row_q6_K` for one super-block: 16 sub-blocks of 16,
/// value `d·scale·(q − 32)` with `q` 6 bits, the low 4 in `ql`, the high 2 in `qh`.
fn dequantize_block_q6_k(block: &[u8], out: &mut [f32]) {
    let d = read_f16(&block[208..210]);
    // Each half of 128 values uses 64 bytes of ql, 32 of qh and 8 scales.
    for half in 0..2 {
        let ql = &block[64 * half..64 * half + 64];
        let qh = &block[128 + 32 * half..128 + 32 * half + 32];
        let scales = &block[192 + 8 * half..192 + 8 * half + 8];
        let y = &mut out[128 * half..128 * half + 128];
        for l in 0..32 {
            let is = l / 16;
            let q1 = ((ql[l] & 0xF) | ((qh[l] & 3) << 4)) as i32 - 32;
            let q2 = ((ql[l + 32] & 0xF) | (((qh[l] >> 2) & 3) << 4)) as i32 - 32;
            let q3 = ((ql[l] >> 4) | (((qh[l] >> 4) & 3) << 4)) as i32 - 32;
            let q4 = ((ql[l + 32] >> 4) | (((qh[l] >> 6) & 3) << 4)) as i32 - 32;
            let scale = |i: usize| scales[i] as i8 as f32;
            y[l] = d * scale(is) * q1 as f32;
            y[l + 32] = d * scale(is + 2) * q2 as f32;
            y[l + 64] = d * scale(is + 4) * q3 as f32;
            y[l + 96] = d * scale(is + 6) * q4 as f32;
        }
    }
}

/// Quantizes `values` (a multiple of the block size long) to `ggml_type`,
/// returning the blocks. Q8_0, Q4_0 and Q4_1 use ggml's reference quantizers;
/// Q4_K and Q6_K a simple min/max one (not ggml's search, but valid blocks).
pub fn quantize(ggml_type: GgmlType, values: &[f32]) -> Result<Vec<u8>> {
    let (block_values, _) = ggml_type.block_layout();
    if !values.len().is_multiple_of(block_values) {
        bail!("{} values are not a whole number of {ggml_type} blocks of {block_values}", values.len());
    }
    let mut out = vec![0u8; ggml_type.bytes_for(values.len())];
    if let Some(encoding) = ggml_type.native_encoding() {
        // Our quantizers view the buffer as 2-byte-aligned blocks; a Vec<u8> may
        // not be, so quantize into a u16 buffer and copy.
        let mut aligned = vec![0u16; out.len().div_ceil(2)];
        let bytes: &mut [u8] = &mut bytemuck::cast_slice_mut(&mut aligned)[..out.len()];
        quantize_into(encoding, values, bytes);
        out.copy_from_slice(bytes);
        return Ok(out);
    }
    match ggml_type {
        GgmlType::BF16 => {
            for (raw, &value) in out.chunks_exact_mut(2).zip(values) {
                raw.copy_from_slice(&half::bf16::from_f32(value).to_le_bytes());
            }
        }
        GgmlType::Q4_K => {
            for (block, x) in out.chunks_exact_mut(Q4_K_BYTES).zip(values.chunks_exact(QK_K)) {
                quantize_block_q4_k(x, block);
            }
        }
        GgmlType::Q6_K => {
            for (block, x) in out.chunks_exact_mut(Q6_K_BYTES).zip(values.chunks_exact(QK_K)) {
                quantize_block_q6_k(x, block);
            }
        }
        other => bail!("cannot quantize to {other}"),
    }
    Ok(out)
}

/// One Q4_K super-block: each sub-block of 32 gets `scale = (max − min)/15` and
/// `offset = −min` (min clamped to ≤ 0, as ggml's offsets are subtracted);
/// both are stored as 6-bit multiples of the super-block's `d` and `dmin`.
fn quantize_block_q4_k(x: &[f32], block: &mut [u8]) {
    let mut scales = [0f32; 8];
    let mut offsets = [0f32; 8];
    for (j, sub) in x.chunks_exact(32).enumerate() {
        let min = sub.iter().fold(0f32, |m, &v| m.min(v));
        let max = sub.iter().fold(f32::NEG_INFINITY, |m, &v| m.max(v));
        scales[j] = (max - min) / 15.0;
        offsets[j] = -min;
    }
    let max_scale = scales.iter().fold(0f32, |m, &v| m.max(v));
    let max_offset = offsets.iter().fold(0f32, |m, &v| m.max(v));
    let d = f16::from_f32(max_scale / 63.0);
    let dmin = f16::from_f32(max_offset / 63.0);
    block[0..2].copy_from_slice(&d.to_le_bytes());
    block[2..4].copy_from_slice(&dmin.to_le_bytes());
    let (d, dmin) = (d.to_f32(), dmin.to_f32());
    let to_6_bits = |value: f32, unit: f32| {
        if unit > 0.0 {
            (value / unit).round().clamp(0.0, 63.0) as u8
        } else {
            0
        }
    };
    let mut levels = [0u8; QK_K];
    let packed = &mut block[4..16];
    packed.fill(0);
    for j in 0..8 {
        let scale = to_6_bits(scales[j], d);
        let offset = to_6_bits(offsets[j], dmin);
        // The inverse of `scale_min_k4`.
        if j < 4 {
            packed[j] |= scale;
            packed[j + 4] |= offset;
        } else {
            packed[j + 4] = (scale & 0xF) | ((offset & 0xF) << 4);
            packed[j - 4] |= (scale >> 4) << 6;
            packed[j] |= (offset >> 4) << 6;
        }
        // Quantize against the scale and offset as they will be decoded.
        let (step, shift) = (d * scale as f32, dmin * offset as f32);
        for (level, &value) in levels[32 * j..32 * j + 32].iter_mut().zip(&x[32 * j..32 * j + 32]) {
            *level = if step > 0.0 { ((value + shift) / step).round().clamp(0.0, 15.0) as u8 } else { 0 };
        }
    }
    let qs = &mut block[16..144];
    for chunk in 0..4 {
        for l in 0..32 {
            qs[32 * chunk + l] = levels[64 * chunk + l] | (levels[64 * chunk + 32 + l] << 4);
        }
    }
}

/// One Q6_K super-block: each sub-block of 16 gets a signed scale mapping its
/// value of largest magnitude to −32 (so 6 bits cover [−32, 31] of it), stored as
/// an 8-bit multiple of the super-block's `d`.
fn quantize_block_q6_k(x: &[f32], block: &mut [u8]) {
    let mut scales = [0f32; 16];
    for (j, sub) in x.chunks_exact(16).enumerate() {
        let extreme = sub.iter().fold(0f32, |m, &v| if v.abs() > m.abs() { v } else { m });
        scales[j] = extreme / -32.0;
    }
    let max_scale = scales.iter().fold(0f32, |m, &v| m.max(v.abs()));
    let d = f16::from_f32(max_scale / 127.0);
    block[208..210].copy_from_slice(&d.to_le_bytes());
    let d = d.to_f32();
    let mut levels = [0u8; QK_K];
    for j in 0..16 {
        let scale = if d > 0.0 { (scales[j] / d).round().clamp(-127.0, 127.0) as i8 } else { 0 };
        block[192 + j] = scale as u8;
        let step = d * scale as f32;
        for (level, &value) in levels[16 * j..16 * j + 16].iter_mut().zip(&x[16 * j..16 * j + 16]) {
            let q = if step != 0.0 { (value / step).round().clamp(-32.0, 31.0) as i32 } else { 0 };
            *level = (q + 32) as u8;
        }
    }
    // The inverse of `dequantize_block_q6_k`'s unpacking.
    for half in 0..2 {
        let levels = &levels[128 * half..128 * half + 128];
        for l in 0..32 {
            let (a, b, c, e) = (levels[l], levels[l + 32], levels[l + 64], levels[l + 96]);
            block[64 * half + l] = (a & 0xF) | ((c & 0xF) << 4);
            block[64 * half + l + 32] = (b & 0xF) | ((e & 0xF) << 4);
            block[128 + 32 * half + l] = (a >> 4) | ((b >> 4) << 2) | ((c >> 4) << 4) | ((e >> 4) << 6);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn wave(n: usize) -> Vec<f32> {
        (0..n).map(|i| ((i * 37 % 101) as f32 - 50.0) / 17.0 + (i as f32 * 0.01).sin()).collect()
    }

    #[test]
    fn k_quants_round_trip_within_a_step() {
        let x = wave(QK_K * 3);
        for (ggml_type, levels) in [(GgmlType::Q4_K, 15.0), (GgmlType::Q6_K, 63.0)] {
            let bytes = quantize(ggml_type, &x).unwrap();
            let mut y = vec![0f32; x.len()];
            dequantize(ggml_type, &bytes, &mut y).unwrap();
            let range = x.iter().fold(0f32, |m, v| m.max(v.abs())) * 2.0;
            // Rounding the sub-block scales to 6/8 bits can stretch a step a little.
            let tolerance = range / levels;
            for (a, b) in x.iter().zip(&y) {
                assert!((a - b).abs() <= tolerance, "{ggml_type}: {a} vs {b}");
            }
        }
    }

    #[test]
    fn zero_blocks_stay_zero() {
        let x = vec![0f32; QK_K];
        for ggml_type in [GgmlType::Q4_K, GgmlType::Q6_K] {
            let bytes = quantize(ggml_type, &x).unwrap();
            let mut y = vec![1f32; QK_K];
            dequantize(ggml_type, &bytes, &mut y).unwrap();
            assert!(y.iter().all(|&v| v == 0.0), "{ggml_type}");
        }
    }
}
