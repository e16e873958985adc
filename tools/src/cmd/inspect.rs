//! `bramble inspect`: an image's config, tokenizer, sections and tensors.

use anyhow::Result;
use bramble_runtime::ModelImage;
use clap::Args;
use std::path::PathBuf;

#[derive(Args)]
pub struct InspectArgs {
    /// The image.
    image: PathBuf,
    /// List every tensor.
    #[arg(long)]
    tensors: bool,
    /// One JSON object.
    #[arg(long)]
    json: bool,
}

/// The `rsparse` section's summary for `inspect`: modules, target, mean s, α and rank.
fn rsparse_summary(image: &ModelImage) -> Result<Option<serde_json::Value>> {
    let Some(bytes) = image.section(bramble_runtime::rsparse::SECTION) else { return Ok(None) };
    let plan = bramble_runtime::rsparse::Rsparse::from_section(bytes)?;
    let n = plan.modules.len().max(1) as f64;
    let mean = |f: &dyn Fn(&bramble_runtime::rsparse::SparseModule) -> f64| plan.modules.iter().map(f).sum::<f64>() / n;
    Ok(Some(serde_json::json!({
        "modules": plan.modules.len(),
        "target": plan.target,
        "mean_sparsity": mean(&|m| m.sparsity as f64),
        "mean_alpha": mean(&|m| m.alpha as f64),
        "mean_rank": mean(&|m| m.rank as f64),
    })))
}

pub fn run(args: InspectArgs) -> Result<()> {
    let path = &args.image;
    let image = ModelImage::open(path)?;
    let c = image.config();
    let v = image.vocab();
    let source = image.section("source").map(|s| String::from_utf8_lossy(s).into_owned());
    let mut by_encoding = std::collections::BTreeMap::<&str, (usize, usize)>::new();
    for t in image.tensors() {
        let entry = by_encoding.entry(t.encoding.name()).or_default();
        entry.0 += 1;
        entry.1 += t.size;
    }
    let a = image.architecture();
    if args.json {
        let value = serde_json::json!({
            "path": path,
            "file_bytes": image.bytes().len(),
            "layout_version": image.layout_version(),
            "config": {
                "dim": c.dim, "n_layers": c.n_layers, "n_heads": c.n_heads, "n_kv_heads": c.n_kv_heads,
                "head_dim": c.head_dim, "ffn_dim": c.ffn_dim, "vocab_size": c.vocab_size,
                "context_length": c.context_length, "rope_theta": c.rope_theta, "rope_style": c.rope_style,
                "norm_eps": c.norm_eps, "tied_output": c.tied_output != 0,
                "rope_scaling": image.rope_scaling().map(|r| serde_json::json!({"kind": r.kind.name(), "factors": r.factors})),
            },
            "architecture": {
                "family": a.family.name(), "features": a.features.names(), "embedding_scale": a.embedding_scale,
                "attention_scale": a.attention_scale,
                "layers": a.layers.iter().map(|l| serde_json::json!({"window": l.window, "rope_theta": l.rope_theta})).collect::<Vec<_>>(),
            },
            "tokenizer": {
                "kind": format!("{:?}", v.kind), "pre_tokenizer": format!("{:?}", v.pre_tokenizer),
                "tokens": v.len(), "merges": v.merges.len(), "bos": v.bos_id, "eos": v.eos_id, "eot": v.eot_id,
                "add_bos": v.add_bos, "add_space_prefix": v.add_space_prefix,
            },
            "chat_template": image.chat_template(),
            "sections": image.sections().iter().map(|s| serde_json::json!({"name": s.name, "offset": s.offset, "size": s.size})).collect::<Vec<_>>(),
            "encodings": by_encoding.iter().map(|(k, (n, b))| (k.to_string(), serde_json::json!({"tensors": n, "bytes": b}))).collect::<serde_json::Map<_, _>>(),
            "tensors": image.tensors().iter().map(|t| serde_json::json!({"name": t.name, "encoding": t.encoding.name(), "shape": t.shape, "bytes": t.size})).collect::<Vec<_>>(),
            "source": source.as_deref().and_then(|s| serde_json::from_str::<serde_json::Value>(s).ok()),
            "rsparse": rsparse_summary(&image)?,
        });
        outln!("{value}");
        return Ok(());
    }
    outln!(
        "{} — {:.1} MiB, layout version {}",
        path.display(),
        image.bytes().len() as f64 / (1 << 20) as f64,
        image.layout_version()
    );
    outln!(
        "{}: dim {} layers {} heads {} (kv {}) head_dim {} ffn {} vocab {} context {} rope θ {} eps {:e}{}",
        a.family.name(),
        c.dim,
        c.n_layers,
        c.n_heads,
        c.n_kv_heads,
        c.head_dim,
        c.ffn_dim,
        c.vocab_size,
        c.context_length,
        c.rope_theta,
        c.norm_eps,
        if c.tied_output != 0 { ", tied output" } else { "" }
    );
    if a.needs_section(c) {
        outln!("block: {}", a.describe(c));
    }
    if let Some(scaling) = image.rope_scaling() {
        let (low, high) = scaling.factors.iter().fold((f32::INFINITY, 0f32), |(l, h), &f| (l.min(f), h.max(f)));
        outln!(
            "rope scaling: {}, {} pair frequencies divided by {low} to {high}",
            scaling.kind.name(),
            scaling.factors.len()
        );
    }
    let name = |id: Option<u32>| {
        id.map_or("-".to_string(), |i| format!("{i} {:?}", String::from_utf8_lossy(&v.tokens[i as usize])))
    };
    outln!(
        "tokenizer: {:?} ({:?}), {} tokens, {} merges, BOS {}, EOS {}, EOT {}, add BOS {}",
        v.kind,
        v.pre_tokenizer,
        v.len(),
        v.merges.len(),
        name(v.bos_id),
        name(v.eos_id),
        name(v.eot_id),
        v.add_bos
    );
    outln!(
        "chat template: {}",
        image.chat_template().map_or("none (built-in fallback)".to_string(), |t| format!("{} bytes", t.len()))
    );
    for (encoding, (n, bytes)) in &by_encoding {
        outln!("  {encoding:>4}: {n:>4} tensors, {:.1} MiB", *bytes as f64 / (1 << 20) as f64);
    }
    for s in image.sections() {
        outln!("  section {:<14} {:>12} bytes at {}", s.name, s.size, s.offset);
    }
    if let Some(source) = source {
        outln!("source: {source}");
    }
    if let Some(plan) = rsparse_summary(&image)? {
        outln!(
            "rsparse: {} modules, target {}, mean sparsity {:.3}, mean α {:.3}, mean rank {:.1}",
            plan["modules"],
            plan["target"],
            plan["mean_sparsity"].as_f64().unwrap_or(f64::NAN),
            plan["mean_alpha"].as_f64().unwrap_or(f64::NAN),
            plan["mean_rank"].as_f64().unwrap_or(f64::NAN)
        );
    }
    if args.tensors {
        for t in image.tensors() {
            outln!("  {:<32} {:>4} {:?}", t.name, t.encoding.name(), t.shape);
        }
    }
    Ok(())
}
