//! `bramble bench`: prefill and decode speed, allocations and memory.

use super::model_args::ModelArgs;
use anyhow::Result;
use bramble_runtime::kv::{KvCache, KvMode};
use bramble_runtime::model::SparseMode;
use bramble_runtime::sampler::SamplerConfig;
use bramble_runtime::session::Session;
use bramble_tools::stats;
use clap::Args;
use std::time::Instant;

#[derive(Args)]
pub struct BenchArgs {
    #[command(flatten)]
    model: ModelArgs,
    /// Prompt length.
    #[arg(long, default_value_t = 32)]
    prompt_tokens: usize,
    /// Tokens to generate.
    #[arg(long, default_value_t = 32)]
    gen_tokens: usize,
    /// Print JSON.
    #[arg(long)]
    json: bool,
}

pub fn run(args: BenchArgs) -> Result<()> {
    let (loaded, context) = args.model.load()?;
    let model = args.model.build_model(&loaded, SparseMode::DecodeOnly)?;
    let tokenizer = &loaded.tokenizer;
    anyhow::ensure!(
        args.prompt_tokens >= 1 && args.gen_tokens >= 1,
        "--prompt-tokens and --gen-tokens must be at least 1"
    );
    anyhow::ensure!(
        args.prompt_tokens + args.gen_tokens <= context,
        "{} + {} tokens do not fit the context of {context}",
        args.prompt_tokens,
        args.gen_tokens
    );
    // A prompt of ordinary text tokens, repeated to length.
    let text = tokenizer.encode("The quick brown fox jumps over the lazy dog. ", false, false);
    anyhow::ensure!(!text.is_empty(), "the tokenizer produced no tokens for the benchmark text");
    let prompt: Vec<u32> = text.iter().copied().cycle().take(args.prompt_tokens).collect();
    let mut session = Session::try_new(&model, tokenizer, context, SamplerConfig::greedy())?;
    let kv_bytes = session.kv_bytes();
    // The whole run state, KV cache included: RunState::bytes_for, the count
    // `plan`, `flash` and brambled's memory_limit check use too.
    let state_bytes = session.state_bytes();
    // The whole state resident, as brambled holds it: peak_rss_bytes is then
    // the footprint at the full context, not at the positions this run fills.
    session.commit_memory();

    let started = Instant::now();
    session.feed(&prompt)?;
    let prefill_seconds = started.elapsed().as_secs_f64();
    session.take_measured_sparsity();
    session.take_sparse_bytes();
    let allocations_before = stats::allocations();
    let decode_started = Instant::now();
    session.step()?;
    // What a user waits for: the prompt, then the first token sampled.
    let first_token_seconds = prefill_seconds + decode_started.elapsed().as_secs_f64();
    for _ in 1..args.gen_tokens {
        session.step()?;
    }
    let decode_seconds = decode_started.elapsed().as_secs_f64();
    let allocations = stats::allocations() - allocations_before;
    let measured_sparsity = session.take_measured_sparsity();
    // Weight bytes a decoded token read: the dense figure, with the sparse
    // modules' dense bytes replaced by what their kernels read.
    let (sparse_read, sparse_dense) = session.take_sparse_bytes();
    let dense_bytes = model.weight_bytes_per_token() as f64;
    let read_bytes = dense_bytes + (sparse_read as f64 - sparse_dense as f64) / args.gen_tokens as f64;

    let value = serde_json::json!({
        "model": args.model.model,
        "kernels": model.kernels.name,
        "threads": model.pool.threads(),
        "prompt_tokens": args.prompt_tokens,
        "gen_tokens": args.gen_tokens,
        "context": context,
        "prefill_tok_s": args.prompt_tokens as f64 / prefill_seconds,
        "time_to_first_token_ms": first_token_seconds * 1e3,
        "decode_tok_s": args.gen_tokens as f64 / decode_seconds,
        "allocations_per_token": allocations as f64 / args.gen_tokens as f64,
        // Weights read per decoded token, measured (R-Sparse reads only the
        // active channels of channel-major modules, plus its low-rank
        // factors), and what the dense products read.
        "weight_bytes_per_token": read_bytes.round() as u64,
        "dense_weight_bytes_per_token": model.weight_bytes_per_token(),
        "weight_bytes_ratio": read_bytes / dense_bytes,
        // The share of linear-layer input channels the decode steps sent to
        // R-Sparse's low-rank part (null: dense).
        "measured_sparsity": measured_sparsity,
        // The KV cache as allocated for the context, and what an f16 cache would take.
        "kv": model.kv_mode().name(),
        "kv_bytes": kv_bytes,
        "kv_f16_bytes": KvCache::bytes_for(KvMode::F16, &model.config, context, &model.architecture.layers)?,
        "state_bytes": state_bytes,
        "peak_rss_bytes": stats::peak_rss_bytes(),
        "guest_instructions": "aarch64 cost: scripts/insn-count.sh IMAGE [cortex-a72 cortex-a76] runs this bench under qemu with ../shared/tools/qemu-insn-count for 8 and 24 generated tokens; per token = Δcount / 16; scripts/insn-profile.sh IMAGE CPU splits it by function",
    });
    if args.json {
        outln!("{value}");
    } else {
        outln!("{}", serde_json::to_string_pretty(&value)?);
    }
    Ok(())
}
