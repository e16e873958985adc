//! ggml's k-quants as [`Block`]s: the block structs, their expansion and
//! their simple quantizers live in `bramble_runtime::kquant`, where the
//! runtime also runs Q3_K–Q6_K natively.

use super::Block;
pub use bramble_runtime::kquant::{BlockQ2K, BlockQ3K, BlockQ4K, BlockQ5K, BlockQ6K, QK_K};

macro_rules! k_block {
    ($($block:ty),*) => {$(
        impl Block for $block {
            const VALUES: usize = QK_K;
            fn dequantize(&self, out: &mut [f32]) {
                <$block>::dequantize(self, out)
            }
            fn quantize(values: &[f32]) -> Self {
                <$block>::quantize(values)
            }
        }
    )*};
}
k_block!(BlockQ2K, BlockQ3K, BlockQ4K, BlockQ5K, BlockQ6K);
