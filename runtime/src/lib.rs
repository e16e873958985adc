//! Bramble's inference core.
//!
//! Opens a packed model image ([`image`], spec in `models/FORMAT.md`) with
//! memmap2 and runs Llama forward passes ([`model`]) on quantized weights
//! with int8 activations, through kernels chosen once at load ([`kernels`]).
//! Every buffer is allocated when a [`model::RunState`] is made; a decode step
//! allocates nothing.
#![warn(missing_docs)]

pub mod allocations;
pub mod architecture;
pub mod bias;
pub mod buffers;
pub mod chat;
pub mod config;
pub mod error;
pub mod image;
pub mod kernels;
pub mod kquant;
pub mod kv;
pub mod logits;
pub mod model;
pub mod quant;
pub mod rng;
pub mod rope;
pub mod rsparse;
pub mod sampler;
pub mod session;
pub mod tokenizer;
pub mod vocab;

pub use config::ModelConfig;
pub use error::{Error, ErrorKind, Result};
pub use image::ModelImage;
pub use model::{Model, RunState};
pub use quant::Encoding;
pub use vocab::Vocab;
