//! ggml's tensor encodings as numbers: every readable type expanded exactly as
//! ggml's `dequantize_row_*` does, and simple quantizers for writing test
//! models.
//!
//! Q8_0, Q4_0, Q4_1, Q5_0, Q5_1, F16 and F32 are our own encodings byte for byte and go
//! through `bramble_runtime::quant`; BF16 is expanded here. The other block
//! formats live by family, one `#[repr(C)]` struct per block with the C layout
//! in its doc: [`legacy`] (Q5_0 and Q5_1, independent references for the
//! runtime's Q5S and Q5), [`k`] (Q2_K, Q3_K, Q4_K, Q5_K, Q6_K) and [`iq`] (IQ4_NL, IQ4_XS).

mod iq;
mod k;
mod legacy;

pub use k::QK_K;

use super::GgmlType;
use anyhow::{bail, Result};
use bramble_runtime::quant::{dequantize_from, quantize_into};
use bytemuck::Pod;
use iq::{BlockIq4Nl, BlockIq4Xs};
use k::{BlockQ2K, BlockQ3K, BlockQ4K, BlockQ5K, BlockQ6K};
use legacy::{BlockQ5_0, BlockQ5_1};

/// One ggml block format: the block's bytes as a struct (alignment 1, so any
/// byte offset can be viewed as one), how many values it holds, its expansion
/// and a quantizer.
trait Block: Pod {
    /// Values per block.
    const VALUES: usize;
    /// Expands the block into `out` (`VALUES` long), as ggml's `dequantize_row_*`.
    fn dequantize(&self, out: &mut [f32]);
    /// A block holding `values` (`VALUES` long, finite) approximately.
    fn quantize(values: &[f32]) -> Self;
}

use bramble_runtime::kquant::{extreme, f16_bytes, f16_value};

fn dequantize_blocks<B: Block>(bytes: &[u8], out: &mut [f32]) {
    for (raw, values) in bytes.chunks_exact(size_of::<B>()).zip(out.chunks_exact_mut(B::VALUES)) {
        bytemuck::from_bytes::<B>(raw).dequantize(values);
    }
}

fn quantize_blocks<B: Block>(values: &[f32], out: &mut [u8]) {
    for (raw, x) in out.chunks_exact_mut(size_of::<B>()).zip(values.chunks_exact(B::VALUES)) {
        raw.copy_from_slice(bytemuck::bytes_of(&B::quantize(x)));
    }
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
        GgmlType::Q5_0 => dequantize_blocks::<BlockQ5_0>(bytes, out),
        GgmlType::Q5_1 => dequantize_blocks::<BlockQ5_1>(bytes, out),
        GgmlType::Q2_K => dequantize_blocks::<BlockQ2K>(bytes, out),
        GgmlType::Q3_K => dequantize_blocks::<BlockQ3K>(bytes, out),
        GgmlType::Q4_K => dequantize_blocks::<BlockQ4K>(bytes, out),
        GgmlType::Q5_K => dequantize_blocks::<BlockQ5K>(bytes, out),
        GgmlType::Q6_K => dequantize_blocks::<BlockQ6K>(bytes, out),
        GgmlType::IQ4_NL => dequantize_blocks::<BlockIq4Nl>(bytes, out),
        GgmlType::IQ4_XS => dequantize_blocks::<BlockIq4Xs>(bytes, out),
        other => bail!("cannot dequantize {other}"),
    }
    Ok(())
}

/// Quantizes `values` (a multiple of the block size long) to `ggml_type`,
/// returning the blocks. Q8_0, Q4_0, Q4_1, Q5_0 and Q5_1 use ggml's reference
/// quantizers; the k-quants and IQ4 a simple one each (not ggml's search, but
/// valid blocks).
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
        GgmlType::Q5_0 => quantize_blocks::<BlockQ5_0>(values, &mut out),
        GgmlType::Q5_1 => quantize_blocks::<BlockQ5_1>(values, &mut out),
        GgmlType::Q2_K => quantize_blocks::<BlockQ2K>(values, &mut out),
        GgmlType::Q3_K => quantize_blocks::<BlockQ3K>(values, &mut out),
        GgmlType::Q4_K => quantize_blocks::<BlockQ4K>(values, &mut out),
        GgmlType::Q5_K => quantize_blocks::<BlockQ5K>(values, &mut out),
        GgmlType::Q6_K => quantize_blocks::<BlockQ6K>(values, &mut out),
        GgmlType::IQ4_NL => quantize_blocks::<BlockIq4Nl>(values, &mut out),
        GgmlType::IQ4_XS => quantize_blocks::<BlockIq4Xs>(values, &mut out),
        other => bail!("cannot quantize to {other}"),
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The block-format types: everything readable but the element types
    /// (F32, F16, BF16), whose blocks are one value.
    fn block_types() -> impl Iterator<Item = GgmlType> {
        GgmlType::READABLE.into_iter().filter(|t| t.block_layout().0 > 1)
    }

    fn wave(n: usize) -> Vec<f32> {
        (0..n).map(|i| ((i * 37 % 101) as f32 - 50.0) / 17.0 + (i as f32 * 0.01).sin()).collect()
    }

    /// Each block struct is the size ggml's type traits give.
    #[test]
    fn block_structs_match_the_type_table() {
        let sizes = [
            (GgmlType::Q5_0, size_of::<BlockQ5_0>(), BlockQ5_0::VALUES),
            (GgmlType::Q5_1, size_of::<BlockQ5_1>(), BlockQ5_1::VALUES),
            (GgmlType::Q2_K, size_of::<BlockQ2K>(), BlockQ2K::VALUES),
            (GgmlType::Q3_K, size_of::<BlockQ3K>(), BlockQ3K::VALUES),
            (GgmlType::Q4_K, size_of::<BlockQ4K>(), BlockQ4K::VALUES),
            (GgmlType::Q5_K, size_of::<BlockQ5K>(), BlockQ5K::VALUES),
            (GgmlType::Q6_K, size_of::<BlockQ6K>(), BlockQ6K::VALUES),
            (GgmlType::IQ4_NL, size_of::<BlockIq4Nl>(), BlockIq4Nl::VALUES),
            (GgmlType::IQ4_XS, size_of::<BlockIq4Xs>(), BlockIq4Xs::VALUES),
        ];
        for (ggml_type, bytes, values) in sizes {
            assert_eq!(ggml_type.block_layout(), (values, bytes), "{ggml_type}");
        }
    }

    /// Quantizing and expanding again errs by at most about one step of the
    /// type's level spacing, a fraction of the block's range.
    #[test]
    fn round_trips_within_a_step() {
        let x = wave(QK_K * 3);
        let range = x.iter().fold(0f32, |m, v| m.max(v.abs())) * 2.0;
        // Levels across the range; IQ4's non-linear grid is widest (24 of 240)
        // at its ends, like 10 even levels. Rounding the sub-block scales to
        // 4–8 bits stretches a step a little, hence whole steps, not halves.
        let levels = |t: GgmlType| match t {
            GgmlType::Q8_0 => 255.0,
            GgmlType::Q6_K => 63.0,
            GgmlType::Q5_0 | GgmlType::Q5_1 | GgmlType::Q5_K => 31.0,
            GgmlType::Q4_0 | GgmlType::Q4_1 | GgmlType::Q4_K => 15.0,
            GgmlType::IQ4_NL | GgmlType::IQ4_XS => 10.0,
            GgmlType::Q3_K => 7.0,
            GgmlType::Q2_K => 3.0,
            other => panic!("no level count for {other}"),
        };
        for ggml_type in block_types() {
            let bytes = quantize(ggml_type, &x).unwrap();
            let mut y = vec![0f32; x.len()];
            dequantize(ggml_type, &bytes, &mut y).unwrap();
            let tolerance = range / levels(ggml_type);
            for (i, (a, b)) in x.iter().zip(&y).enumerate() {
                assert!((a - b).abs() <= tolerance, "{ggml_type} [{i}]: {a} vs {b} (tolerance {tolerance})");
            }
        }
    }

    #[test]
    fn zero_blocks_stay_zero() {
        let x = vec![0f32; QK_K];
        for ggml_type in block_types() {
            let bytes = quantize(ggml_type, &x).unwrap();
            let mut y = vec![1f32; QK_K];
            dequantize(ggml_type, &bytes, &mut y).unwrap();
            assert!(y.iter().all(|&v| v == 0.0), "{ggml_type}: {y:?}");
        }
    }

    /// Q5_0's quantizer is ggml's reference: the most negative value of the
    /// block is −16 steps exactly, and the fifth bits land in `qh`.
    #[test]
    fn q5_0_puts_the_extreme_on_level_0() {
        let mut x: Vec<f32> = (0..32).map(|i| i as f32 / 8.0).collect();
        x[17] = -4.0;
        let bytes = quantize(GgmlType::Q5_0, &x).unwrap();
        assert_eq!(f16_value([bytes[0], bytes[1]]), 0.25);
        let qh = u32::from_le_bytes([bytes[2], bytes[3], bytes[4], bytes[5]]);
        assert_eq!(qh & (1 << 17), 0, "value 17 is level 0");
        let mut y = vec![0f32; 32];
        dequantize(GgmlType::Q5_0, &bytes, &mut y).unwrap();
        assert_eq!(y[17], -4.0);
    }

    /// The runtime's Q5S (what GGUF Q5_0 tensors are read and quantized as)
    /// is the separately written ggml Q5_0 here, bit for bit: any block's
    /// bytes expand to the same values, and values quantize to the same bytes.
    #[test]
    fn runtime_q5s_is_ggml_q5_0() {
        let mut seed = 0x0005_0005u32;
        let mut bytes: Vec<u8> = (0..22 * 64)
            .map(|_| {
                seed = seed.wrapping_mul(1664525).wrapping_add(1013904223);
                (seed >> 24) as u8
            })
            .collect();
        for block in bytes.chunks_exact_mut(22) {
            block[1] &= 0xBB; // a finite scale
        }
        let (mut ours, mut theirs) = (vec![0f32; 64 * 32], vec![0f32; 64 * 32]);
        dequantize(GgmlType::Q5_0, &bytes, &mut ours).unwrap();
        dequantize_blocks::<BlockQ5_0>(&bytes, &mut theirs);
        assert_eq!(
            ours.iter().map(|v| v.to_bits()).collect::<Vec<_>>(),
            theirs.iter().map(|v| v.to_bits()).collect::<Vec<_>>()
        );
        let x = wave(QK_K * 3);
        let mut reference = vec![0u8; GgmlType::Q5_0.bytes_for(x.len())];
        quantize_blocks::<BlockQ5_0>(&x, &mut reference);
        assert_eq!(quantize(GgmlType::Q5_0, &x).unwrap(), reference);
    }

    /// The runtime's Q5 (what GGUF Q5_1 tensors are read and quantized as)
    /// is the separately written ggml Q5_1 here, bit for bit: any block's
    /// bytes expand to the same values, and values quantize to the same bytes.
    #[test]
    fn runtime_q5_is_ggml_q5_1() {
        let mut seed = 0x0005_0001u32;
        let mut bytes: Vec<u8> = (0..24 * 64)
            .map(|_| {
                seed = seed.wrapping_mul(1664525).wrapping_add(1013904223);
                (seed >> 24) as u8
            })
            .collect();
        for block in bytes.chunks_exact_mut(24) {
            block[1] &= 0xBB; // a finite scale
            block[3] &= 0xBB; // and minimum
        }
        let (mut ours, mut theirs) = (vec![0f32; 64 * 32], vec![0f32; 64 * 32]);
        dequantize(GgmlType::Q5_1, &bytes, &mut ours).unwrap();
        dequantize_blocks::<BlockQ5_1>(&bytes, &mut theirs);
        assert_eq!(
            ours.iter().map(|v| v.to_bits()).collect::<Vec<_>>(),
            theirs.iter().map(|v| v.to_bits()).collect::<Vec<_>>()
        );
        let x = wave(QK_K * 3);
        let mut reference = vec![0u8; GgmlType::Q5_1.bytes_for(x.len())];
        quantize_blocks::<BlockQ5_1>(&x, &mut reference);
        assert_eq!(quantize(GgmlType::Q5_1, &x).unwrap(), reference);
    }

    #[test]
    fn wrong_lengths_are_errors() {
        let mut out = vec![0f32; 256];
        let error = dequantize(GgmlType::Q5_K, &[0u8; 100], &mut out).unwrap_err().to_string();
        assert!(error.contains("100 bytes do not hold 256 values of Q5_K"), "{error}");
        assert!(quantize(GgmlType::IQ4_XS, &[0.0; 32]).is_err());
        assert!(dequantize(GgmlType::IQ2_XXS, &[0u8; 66], &mut out).is_err());
    }
}
