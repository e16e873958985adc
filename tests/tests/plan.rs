//! `bramble plan`: the memory budget of a model on a board and its verdict.
//! A model that does not fit exits non-zero with the arithmetic in the
//! message; a quantized KV cache makes the same context fit; bad boards,
//! contexts and KV modes are named in their errors.
//!
//! A synthetic model with a long declared context stands in for a large
//! model (the plan never allocates the cache, it only counts it).

use bramble_runtime::vocab::TokenizerKind;
use bramble_tests::*;
use bramble_tools::synth::SyntheticShape;
use std::path::{Path, PathBuf};

/// A synthetic model (2 layers, 2 KV heads of 32 channels) declaring a context of a million positions.
fn long_context_model(dir: &Path, head_dim: usize) -> PathBuf {
    let shape = SyntheticShape {
        dim: 4 * head_dim,
        n_layers: 2,
        n_heads: 4,
        n_kv_heads: 2,
        ffn_dim: 160,
        context_length: 1 << 20,
        tokenizer: TokenizerKind::SentencePiece,
        ..SyntheticShape::default()
    };
    let path = dir.join(format!("long-{head_dim}.bramble"));
    convert_synthetic(&synthetic(shape, 5), &path, "q8");
    path
}

fn stderr(output: &std::process::Output) -> String {
    String::from_utf8_lossy(&output.stderr).into_owned()
}

fn stdout(output: &std::process::Output) -> String {
    String::from_utf8_lossy(&output.stdout).into_owned()
}

#[test]
fn a_million_f32_positions_do_not_fit_a_zero_2w_and_the_refusal_shows_the_arithmetic() {
    let dir = tempfile::tempdir().unwrap();
    let model = long_context_model(dir.path(), 32);
    let args = ["plan", "--model", model.to_str().unwrap(), "--board", "pi-zero-2w", "--ctx", "1000000"];
    let output = bramble(&args);
    assert!(!output.status.success(), "{}: {}", command_line(&args), stdout(&output));
    let (out, err) = (stdout(&output), stderr(&output));
    assert!(out.contains("verdict: does not fit"), "{out}");
    // 2 layers × 2 (keys, values) × 1,000,000 positions × 64 channels × 4 bytes = 0.95 GiB.
    assert!(err.contains("0.95 GiB KV cache (ctx 1000000)"), "{err}");
    assert!(err.contains("> 0.50 GiB on pi-zero-2w"), "{err}");
    assert!(err.contains("does not fit") && err.contains("--kv q8 or q4"), "{err}");
    assert!(!err.contains("panicked"), "{err}");
}

#[test]
fn a_q4_kv_cache_makes_the_same_context_fit_and_the_json_adds_up() {
    let dir = tempfile::tempdir().unwrap();
    let model = long_context_model(dir.path(), 32);
    let model = model.to_str().unwrap();
    let plan =
        bramble_json(&["plan", "--model", model, "--board", "pi-zero-2w", "--ctx", "1000000", "--kv", "q4", "--json"]);
    assert_eq!(plan["fits"], true, "{plan}");
    assert_eq!(plan["verdict"], "fits");
    assert_eq!(plan["kv"], "q4");
    assert_eq!(plan["context"], 1_000_000);
    let term = |name: &str| plan[name].as_u64().unwrap_or_else(|| panic!("{name} missing: {plan}"));
    let total = term("weight_bytes") + term("kv_cache_bytes") + term("buffer_bytes") + term("os_headroom_bytes");
    assert_eq!(total, term("total_bytes"));
    assert!(total <= term("memory_bytes"));
    // q4 at 32 channels a head: (0.5 + 4/32) bytes a key channel, (0.5 + 4/32) a value
    // channel, against 2 + 2 at f16: 0.3125, plus a fixed window of 64 f32 positions.
    let ratio = term("kv_cache_bytes") as f64 / term("kv_f16_bytes") as f64;
    assert!((0.3125..0.32).contains(&ratio), "q4 KV bytes against f16: {ratio}");
    // The plain output lists every term and the verdict.
    let out = bramble_ok(&["plan", "--model", model, "--board", "pi-zero-2w", "--ctx", "1000000", "--kv", "q4"]);
    for line in ["weights", "kv cache", "buffers", "os", "total", "verdict: fits"] {
        assert!(out.contains(line), "{line:?} missing from {out}");
    }
}

#[test]
fn the_default_model_fits_every_board_at_256_positions() {
    let Some(model) = default_image("q4") else { return };
    for board in ["pi4-4gb", "pi4-8gb", "pi5-8gb", "pi-zero-2w"] {
        for kv in ["f32", "q8", "q4"] {
            let plan = bramble_json(&[
                "plan",
                "--model",
                model.to_str().unwrap(),
                "--board",
                board,
                "--ctx",
                "256",
                "--kv",
                kv,
                "--json",
            ]);
            assert_eq!(plan["fits"], true, "{board} {kv}: {plan}");
        }
    }
}

#[test]
fn bad_boards_contexts_and_kv_modes_are_named() {
    let dir = tempfile::tempdir().unwrap();
    let model = long_context_model(dir.path(), 32);
    let model = model.to_str().unwrap();
    let cases: [(&[&str], &str); 4] = [
        (&["--board", "pi3", "--ctx", "256"], "unknown board profile \"pi3\""),
        (&["--board", "pi4-3gb", "--ctx", "256"], "not 3gb"),
        (&["--board", "pi4-4gb", "--ctx", "0"], "--ctx 0"),
        (&["--board", "pi4-4gb", "--ctx", "256", "--kv", "q2"], "q2"),
    ];
    for (extra, expected) in cases {
        let mut args = vec!["plan", "--model", model];
        args.extend_from_slice(extra);
        let output = bramble(&args);
        let err = stderr(&output);
        assert!(!output.status.success() && err.contains(expected), "{}: {err}", command_line(&args));
        assert!(!err.contains("panicked"), "{err}");
    }
    // Quantized KV caches need heads of whole runs of 32 channels.
    let narrow = long_context_model(dir.path(), 16);
    let args = ["plan", "--model", narrow.to_str().unwrap(), "--board", "pi4-4gb", "--ctx", "256", "--kv", "q8"];
    let output = bramble(&args);
    let err = stderr(&output);
    assert!(!output.status.success() && err.contains("head_dim") && err.contains("16"), "{err}");
    // A missing image is named.
    let output = bramble(&["plan", "--model", "/nonexistent.bramble", "--board", "pi4-4gb", "--ctx", "256"]);
    assert!(!output.status.success() && stderr(&output).contains("/nonexistent.bramble"), "{}", stderr(&output));
}
