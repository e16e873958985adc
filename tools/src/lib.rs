//! Bramble's host side: reading source models (GGUF, Hugging Face, llama2.c),
//! converting them into packed images, and the `bramble` commands.
#![warn(missing_docs)]

pub mod bias;
pub mod calibrate;
pub mod convert;
pub mod deploy;
pub mod flash;
pub mod fleet;
pub mod generate;
pub mod importance;
pub mod mixed;
pub mod plan;
pub mod profiles;
pub mod rounding;
pub mod source;
pub mod stats;
pub mod synth;
pub mod synth_large;
