//! See the table in `main.rs`: images with valid checksums that lie. A
//! configuration whose head products wrap in 32 bits passed every shape check
//! and then asked for petabytes (SIGABRT in both binaries); weights that are
//! NaN gave text instead of an error.

use bramble_runtime::image::{ImageWriter, ModelImage};
use bramble_runtime::ModelConfig;
use bramble_tests::daemon::*;
use bramble_tests::*;
use serde_json::json;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

/// Writes `source` again as `destination` with the config `config` and each
/// tensor's bytes passed through `patch(name, bytes)`, through the ordinary
/// writer: every checksum is valid, only the content lies.
fn rewrite(source: &Path, destination: &Path, config: &ModelConfig, patch: impl Fn(&str, &mut Vec<u8>)) {
    let image = ModelImage::open(source).unwrap();
    let mut writer = ImageWriter::create(destination).unwrap();
    for section in image.sections() {
        if ["tensor_index", "tensor_data"].contains(&section.name.as_str()) {
            continue;
        }
        let bytes = match section.name.as_str() {
            "config" => bytemuck::bytes_of(config),
            _ => image.section(&section.name).unwrap(),
        };
        writer.add_section(&section.name, bytes, section.required).unwrap();
    }
    for tensor in image.tensors() {
        let mut bytes = image.tensor_bytes(tensor).to_vec();
        patch(&tensor.name, &mut bytes);
        writer.add_tensor(&tensor.name, tensor.encoding, &tensor.shape, &bytes).unwrap();
    }
    writer.finish().unwrap();
}

/// The daemon's synthetic model with `n_heads`, `n_kv_heads` and `head_dim`
/// chosen so that `n_heads · head_dim` and `n_kv_heads · head_dim`, taken
/// modulo 2³², are the model's own query and key/value widths: every tensor
/// shape still matches, each field is within its range, and the true
/// key/value width is above 2³².
fn wrapping_heads_image(directory: &Path) -> PathBuf {
    let real = *ModelImage::open(model()).unwrap().config();
    let (q_dim, kv_dim) = (real.n_heads * real.head_dim, real.n_kv_heads * real.head_dim);
    assert_eq!(q_dim, 2 * kv_dim, "the construction below needs two query heads per key/value head");
    // n_kv_heads · head_dim = 2³² + kv_dim, with n_heads = 2 · n_kv_heads under the 2²⁴ field limit.
    let wide = (1u64 << 32) + kv_dim as u64;
    let head_dim = (real.rope_dim as u64..1 << 24)
        .find(|&h| h.is_multiple_of(2) && wide.is_multiple_of(h) && wide / h <= 1 << 23)
        .expect("2^32 + kv_dim has a divisor that fits");
    let mut crafted = real;
    crafted.head_dim = head_dim as u32;
    crafted.n_kv_heads = (wide / head_dim) as u32;
    crafted.n_heads = 2 * crafted.n_kv_heads;
    assert_eq!(crafted.n_heads.wrapping_mul(crafted.head_dim), q_dim, "the query width wraps to the real one");
    assert_eq!(crafted.n_kv_heads.wrapping_mul(crafted.head_dim), kv_dim, "the key/value width wraps to the real one");
    let path = directory.join("wrapping-heads.bramble");
    rewrite(model(), &path, &crafted, |_, _| {});
    path
}

/// The daemon's synthetic model with its output layer's bytes all 0xFF:
/// every f16 scale (and any f32 value) is then NaN, whatever the encoding's
/// layout. (A NaN in a norm would not do: the int8 quantization of the
/// activations turns NaN into zeros before the output layer.)
fn nan_weights_image(directory: &Path) -> PathBuf {
    let image = ModelImage::open(model()).unwrap();
    assert!(image.tensor("output.weight").is_some(), "the daemon's model has its own output layer");
    let path = directory.join("nan-weights.bramble");
    rewrite(model(), &path, image.config(), |name, bytes| {
        if name == "output.weight" {
            bytes.fill(0xFF);
        }
    });
    path
}

/// An exit with a non-zero code (not a signal such as SIGABRT) whose
/// standard error holds every one of `words`.
fn assert_clean_failure(what: &str, output: &Output, words: &[&str]) {
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        matches!(output.status.code(), Some(code) if code != 0),
        "{what}: expected an exit with an error code, got {} (a signal is an abort):\n{stderr}",
        output.status
    );
    for word in words {
        assert!(stderr.contains(word), "{what}: the error does not name {word:?}:\n{stderr}");
    }
}

/// `bramble generate` of a few tokens on one thread, to its exit.
fn generate(image: &str) -> Output {
    run_bounded(
        Command::new(bramble_binary()).args([
            "generate",
            "--model",
            image,
            "--prompt",
            "Hello",
            "--max-tokens",
            "4",
            "--threads",
            "1",
        ]),
        HANG,
    )
}

#[test]
fn wrapping_head_products_are_refused_by_bramble_not_aborted() {
    let directory = tempfile::tempdir().unwrap();
    let image = wrapping_heads_image(directory.path());
    let path = image.to_str().unwrap();
    let output = generate(path);
    assert_clean_failure("bramble generate", &output, &[path, "n_heads", "n_kv_heads", "head_dim"]);
    let output = run_bounded(Command::new(bramble_binary()).args(["inspect", path]), HANG);
    assert_clean_failure("bramble inspect", &output, &[path, "n_heads", "head_dim"]);
}

#[test]
fn wrapping_head_products_are_refused_by_brambled_not_aborted() {
    let directory = tempfile::tempdir().unwrap();
    let image = wrapping_heads_image(directory.path());
    let output = run_bounded(
        Command::new(brambled_binary())
            .args(["--uart", "none", "--http", "127.0.0.1:0", "--ndjson", "none", "--threads", "1", "--model"])
            .arg(&image),
        HANG,
    );
    assert_clean_failure("brambled", &output, &[image.to_str().unwrap(), "n_heads", "n_kv_heads", "head_dim"]);
}

#[test]
fn nan_weights_are_a_server_error_and_the_daemon_keeps_serving() {
    let directory = tempfile::tempdir().unwrap();
    let image = nan_weights_image(directory.path());
    // The later --model wins over the harness's own.
    let mut daemon = Daemon::start(&["--model", image.to_str().unwrap()]);
    let request = json!({"messages": [{"role": "user", "content": "Hello"}], "max_tokens": 4});
    for attempt in 0..2 {
        let response = http(daemon.http(), "POST", "/v1/chat/completions", Some(&request), &[]);
        assert_eq!(response.status, 500, "attempt {attempt}: {}", response.text());
        let body = response.json();
        assert_eq!(body["error"]["type"], "server_error", "{body}");
        let message = body["error"]["message"].as_str().unwrap_or_default();
        assert!(message.contains("the model failed") && message.contains("not finite"), "{body}");
        assert!(message.contains("position"), "the message names where: {body}");
        daemon.assert_alive();
        assert_eq!(http(daemon.http(), "GET", "/health", None, &[]).status, 200);
    }
}

#[test]
fn nan_weights_make_bramble_generate_fail() {
    let directory = tempfile::tempdir().unwrap();
    let image = nan_weights_image(directory.path());
    let path = image.to_str().unwrap();
    let output = generate(path);
    assert_clean_failure("bramble generate", &output, &["not finite", "position"]);
    assert!(output.stdout.iter().all(u8::is_ascii_whitespace), "no text: {}", String::from_utf8_lossy(&output.stdout));
}
