//! The command-line contract of `bramble`, as a user and scripts meet it:
//! `convert`, `inspect`, `generate` (plain and `--json`, seeds, greedy,
//! `--chat`, `--threads`), `perplexity`, `bench`, `chat` over standard input,
//! and the error cases (missing, truncated and corrupt inputs): a non-zero
//! exit, a message naming the file, no panic, and no file left behind.
//!
//! Tiny synthetic models keep it fast; the real model is used where only it
//! can show the behaviour (a chat that answers, the benchmark's allocations).

use bramble_runtime::model::Model;
use bramble_runtime::sampler::SamplerConfig;
use bramble_runtime::session::Session;
use bramble_runtime::tokenizer::Tokenizer;
use bramble_runtime::ModelImage;
use bramble_tests::*;
use serde_json::Value;
use std::ffi::OsString;
use std::path::{Path, PathBuf};
use std::process::Output;

/// Arguments of mixed kinds, as `OsString`s.
macro_rules! args {
    ($($arg:expr),* $(,)?) => { [$(OsString::from($arg)),*] };
}

/// A synthetic model written by `bramble synth` and converted by `bramble convert`.
struct Fixture {
    _dir: tempfile::TempDir,
    dir: PathBuf,
    gguf: PathBuf,
}

impl Fixture {
    /// `bramble synth --format gguf --weights WEIGHTS --tokenizer TOKENIZER` (untied, so sampling varies).
    fn new(tokenizer: &str, weights: &str) -> Fixture {
        let temp = tempfile::tempdir().unwrap();
        let dir = temp.path().to_path_buf();
        let gguf = dir.join("model.gguf");
        let out = bramble_ok(&args![
            "synth",
            "--format",
            "gguf",
            "--output",
            &gguf,
            "--tokenizer",
            tokenizer,
            "--weights",
            weights,
            "--seed",
            "11"
        ]);
        assert!(out.contains("wrote"), "synth says what it wrote: {out}");
        Fixture { _dir: temp, dir, gguf }
    }

    /// `bramble convert --input GGUF --output IMG --quant QUANT`; checks the plain report.
    fn image(&self, quant: &str) -> PathBuf {
        let image = self.dir.join(format!("model-{quant}.bramble"));
        if !image.exists() {
            let out = bramble_ok(&args!["convert", "--input", &self.gguf, "--output", &image, "--quant", quant]);
            assert!(out.starts_with("wrote "), "convert's report: {out}");
            assert!(out.contains("carried bit-exact") && out.contains("re-quantized"), "convert's report: {out}");
            assert!(image.is_file(), "convert reported success but wrote no {}", image.display());
        }
        image
    }
}

fn stdout(output: &Output) -> String {
    String::from_utf8_lossy(&output.stdout).into_owned()
}

fn stderr(output: &Output) -> String {
    String::from_utf8_lossy(&output.stderr).into_owned()
}

/// `bramble generate` with the common options.
fn generate(image: &Path, prompt: &str, max_tokens: usize, temperature: &str, seed: u64, extra: &[&str]) -> String {
    let mut arguments = args![
        "generate",
        "--model",
        image,
        "--prompt",
        prompt,
        "--max-tokens",
        max_tokens.to_string(),
        "--temperature",
        temperature,
        "--seed",
        seed.to_string()
    ]
    .to_vec();
    arguments.extend(extra.iter().map(OsString::from));
    bramble_ok(&arguments)
}

/// Files in `dir`, sorted.
fn listing(dir: &Path) -> Vec<String> {
    let mut names: Vec<String> =
        std::fs::read_dir(dir).unwrap().map(|e| e.unwrap().file_name().to_string_lossy().into_owned()).collect();
    names.sort();
    names
}

/// A failed command: non-zero exit, no panic, an error naming `path` on stderr.
fn assert_clean_failure(arguments: &[OsString], output: &Output, path: &Path) {
    let err = stderr(output);
    assert!(!output.status.success(), "`{}` succeeded but should fail", command_line(arguments));
    assert_eq!(
        output.status.code(),
        Some(1),
        "`{}`: exit status {} (expected 1); stderr:\n{err}",
        command_line(arguments),
        output.status
    );
    assert!(!err.contains("panicked"), "`{}` panicked:\n{err}", command_line(arguments));
    let shown = path.display().to_string();
    let name = path.file_name().unwrap().to_string_lossy();
    assert!(
        err.contains(&shown) || err.contains(name.as_ref()),
        "`{}`: the error does not name {shown}:\n{err}",
        command_line(arguments)
    );
    assert!(err.starts_with("bramble: "), "`{}`: errors start with `bramble: `:\n{err}", command_line(arguments));
}

/// `--layout rows` keeps ggml's row-major blocks; both layouts are the same
/// weights, so greedy generation (here on the host's reference kernels,
/// which do the same arithmetic for both) gives the same tokens.
#[test]
fn both_layouts_convert_and_generate_the_same() {
    let fixture = Fixture::new("spm", "q4_1");
    let interleaved = fixture.image("q4");
    let rows = fixture.dir.join("rows.bramble");
    bramble_ok(&args!["convert", "--input", &fixture.gguf, "--output", &rows, "--quant", "q4", "--layout", "rows"]);
    let summary = bramble_ok(&args!["inspect", &rows]);
    assert!(summary.lines().any(|l| l.trim_start().starts_with("q4:")), "row-major q4 tensors:\n{summary}");
    assert!(!summary.contains("q4x4"), "no interleaved tensors with --layout rows:\n{summary}");
    let generate = |image: &Path| {
        let out = bramble_ok(&args![
            "generate",
            "--model",
            image,
            "--prompt",
            "Hello world",
            "--max-tokens",
            "12",
            "--temperature",
            "0",
            "--json"
        ]);
        first_json_line(&out)["tokens"].clone()
    };
    let (a, b) = (generate(&interleaved), generate(&rows));
    assert!(a.as_array().is_some_and(|t| !t.is_empty()), "generate gave tokens: {a}");
    assert_eq!(a, b, "interleaved vs row-major images");
    let bad = bramble(&args!["convert", "--input", &fixture.gguf, "--output", &rows, "--layout", "columns"]);
    assert!(!bad.status.success() && stderr(&bad).contains("columns"), "{}", stderr(&bad));
}

#[test]
fn convert_then_inspect_every_quantization() {
    let fixture = Fixture::new("bpe", "q8_0");
    for quant in ["q4", "q8", "f16", "q4b"] {
        let image = fixture.image(quant);
        let text = bramble_ok(&args!["inspect", &image]);
        assert!(text.contains(&image.display().to_string()), "inspect names the image:\n{text}");
        assert!(text.contains("llama: dim 64 layers 2"), "inspect shows the config:\n{text}");
        assert!(text.contains("tokenizer: ByteLevelBpe"), "inspect shows the tokenizer:\n{text}");
        // The headline encoding of the matrices appears in the summary
        // (quantized matrices interleaved four rows: `q4x4`, `q8x4`).
        let headline = if quant == "f16" { quant.to_string() } else { format!("{quant}x4") };
        assert!(
            text.lines().any(|l| l.trim_start().starts_with(&format!("{headline}:"))),
            "inspect lists {headline} tensors:\n{text}"
        );
        let listed = bramble_ok(&args!["inspect", &image, "--tensors"]);
        assert!(listed.contains("blk.1.ffn_down.weight"), "inspect --tensors lists tensors:\n{listed}");
        if quant == "q4b" {
            // The mix's embedding and output layer are 5-bit (Q5_1 without
            // --imatrix, ConvertOptions::q4b_head_without_importance); the image runs.
            assert!(text.lines().any(|l| l.trim_start().starts_with("q5x4:")), "q4b's head is q5:\n{text}");
            let out = generate(&image, "Hello world", 8, "0", 1, &["--json"]);
            assert!(first_json_line(&out)["tokens"].as_array().is_some_and(|t| !t.is_empty()), "{out}");
        }
    }
}

#[test]
fn generate_plain_prints_only_the_continuation() {
    let fixture = Fixture::new("spm", "f16");
    let image = fixture.image("q8");
    let plain = generate(&image, "Hello world", 12, "0", 1, &[]);
    let json = first_json_line(&generate(&image, "Hello world", 12, "0", 1, &["--json"]));
    let text = json["text"].as_str().expect("text");
    assert_eq!(plain, format!("{text}\n"), "plain output is the continuation and a newline, nothing else");
    assert!(!plain.contains("Hello world"), "the prompt is not echoed: {plain:?}");
    let keys = ["text", "tokens", "prompt_tokens", "generated_tokens", "prefill_tok_s", "decode_tok_s"];
    for key in keys {
        assert!(json.get(key).is_some(), "generate --json lacks {key}: {json}");
    }
}

#[test]
fn generate_same_seed_same_output_and_temperature_zero_is_greedy() {
    let fixture = Fixture::new("spm", "f32");
    let image = fixture.image("q8");
    let tokens = |temperature: &str, seed: u64| -> Vec<u32> {
        let json = first_json_line(&generate(&image, "Hello world", 24, temperature, seed, &["--json"]));
        ids_of(&json["tokens"])
    };
    // Sampling at 0.8: a seed decides the tokens.
    let (a, b, c) = (tokens("0.8", 5), tokens("0.8", 5), tokens("0.8", 6));
    assert_eq!(a, b, "same seed, same tokens");
    assert_ne!(a, c, "seeds 5 and 6 drew the same 24 tokens; sampling ignores the seed");
    // Temperature 0: greedy, whatever the seed, and equal to the library's greedy decoding.
    let (g1, g2) = (tokens("0", 5), tokens("0", 99));
    assert_eq!(g1, g2, "temperature 0 depends on the seed");
    let opened = ModelImage::open(&image).unwrap();
    let model = Model::new(&opened).unwrap();
    let tokenizer = Tokenizer::new(opened.vocab()).unwrap();
    let mut session = Session::new(&model, &tokenizer, 128, SamplerConfig::greedy());
    session.feed(&tokenizer.encode("Hello world", true, false)).unwrap();
    let mut greedy = Vec::new();
    while greedy.len() < g1.len() {
        let token = session.step().unwrap();
        assert!(!tokenizer.is_end_of_generation(token), "library greedy ended where the CLI did not");
        greedy.push(token);
    }
    assert_eq!(g1, greedy, "--temperature 0 is not the argmax decoding");
}

/// `--follow` scores a given continuation step by step: the model's own greedy
/// tokens are each the greedy choice (rank 0, margin 0); a token swapped for
/// another is ranked below the top by the margin of its logit, and the steps
/// after it still follow the given tokens; bad ids are refused by name.
#[test]
fn generate_follow_scores_a_continuation_step_by_step() {
    let fixture = Fixture::new("spm", "f32");
    let image = fixture.image("q8");
    let greedy = ids_of(&first_json_line(&generate(&image, "Hello world", 10, "0", 0, &["--json"]))["tokens"]);
    assert_eq!(greedy.len(), 10, "the tiny model ended early: {greedy:?}");
    let follow = |ids: &[u32]| -> serde_json::Value {
        let list = ids.iter().map(u32::to_string).collect::<Vec<_>>().join(",");
        bramble_json(&args!["generate", "--model", &image, "--prompt", "Hello world", "--follow", list, "--json"])
    };
    let own = follow(&greedy);
    assert_eq!(own["agree"], 10, "the model's own greedy tokens are its greedy choices: {own}");
    for step in own["steps"].as_array().unwrap() {
        assert_eq!(step["rank"], 0, "{step}");
        assert_eq!(step["token"], step["argmax"], "{step}");
        assert_eq!(step["margin"].as_f64(), Some(0.0), "{step}");
        assert!(step["top_gap"].as_f64().unwrap() >= 0.0, "{step}");
    }
    // Token 4 swapped for another id: that step is not the greedy choice, the others are scored after it.
    let mut swapped = greedy.clone();
    swapped[3] = if greedy[3] == 5 { 6 } else { 5 };
    let other = follow(&swapped);
    let step = &other["steps"][3];
    assert!(step["rank"].as_u64().unwrap() > 0, "a swapped token ranked as the greedy choice: {step}");
    assert_eq!(step["argmax"], greedy[3], "{step}");
    assert!(step["margin"].as_f64().unwrap() > 0.0, "{step}");
    assert_eq!(
        other["steps"].as_array().unwrap()[..3],
        own["steps"].as_array().unwrap()[..3],
        "the steps before the swap changed"
    );
    let tokens: Vec<u32> =
        other["steps"].as_array().unwrap().iter().map(|s| s["token"].as_u64().unwrap() as u32).collect();
    assert_eq!(tokens, swapped, "the steps are not the given tokens");
    // An id past the vocabulary, and a list that is not ids.
    for (bad, named) in [("3,999999", "999999"), ("3,seven", "seven")] {
        let output = bramble(&args!["generate", "--model", &image, "--prompt", "Hello world", "--follow", bad]);
        let err = String::from_utf8_lossy(&output.stderr);
        assert!(!output.status.success() && err.contains(named) && !err.contains("panicked"), "--follow {bad}: {err}");
    }
}

#[test]
fn generate_chat_and_threads_options() {
    let fixture = Fixture::new("bpe", "f16");
    let image = fixture.image("q4");
    let plain = first_json_line(&generate(&image, "Hello world", 4, "0", 0, &["--json", "--threads", "2"]));
    let chat = first_json_line(&generate(&image, "Hello world", 4, "0", 0, &["--json", "--chat"]));
    let single = first_json_line(&generate(&image, "Hello world", 4, "0", 0, &["--json", "--threads", "1"]));
    assert_eq!(plain["tokens"], single["tokens"], "--threads changes the result");
    // ChatML wraps the prompt: <|im_start|>user\n ... <|im_end|>\n<|im_start|>assistant\n.
    let (p, c) = (plain["prompt_tokens"].as_u64().unwrap(), chat["prompt_tokens"].as_u64().unwrap());
    assert!(c >= p + 6, "--chat did not wrap the prompt in the template: {p} plain vs {c} chat prompt tokens");
}

#[test]
fn perplexity_prints_its_last_line_and_json() {
    let fixture = Fixture::new("spm", "q4_0");
    let image = fixture.image("q4");
    let text = fixture.dir.join("text.txt");
    std::fs::write(&text, "the hat and the dish, on the sand! Hello world. ".repeat(20)).unwrap();
    let parse_last = |out: &str| -> f64 {
        let last = out.lines().last().expect("output");
        let value =
            last.strip_prefix("perplexity: ").unwrap_or_else(|| panic!("last line is not `perplexity: X`: {last:?}"));
        value.parse().unwrap_or_else(|_| panic!("not a number: {last:?}"))
    };
    let plain = bramble_ok(&args!["perplexity", "--model", &image, "--file", &text, "--ctx", "32"]);
    let value = parse_last(&plain);
    assert!(value.is_finite() && value > 1.0, "perplexity {value}");
    assert_eq!(plain.lines().count(), 1, "without --json only the perplexity line: {plain:?}");
    let with_json = bramble_ok(&args!["perplexity", "--model", &image, "--file", &text, "--ctx", "32", "--json"]);
    let json = first_json_line(&with_json);
    assert!((parse_last(&with_json) - value).abs() < 1e-9, "--json changes the result");
    let from_json = json["perplexity"].as_f64().expect("perplexity in the JSON");
    assert!((from_json - value).abs() <= 5e-5 * value, "JSON {from_json} vs last line {value}");
    assert!(
        json["chunks"].as_u64().is_some_and(|n| n >= 1) && json["scored"].as_u64().is_some_and(|n| n >= 1),
        "{json}"
    );
}

/// `bramble bench --json` on `threads` threads. The binary's allocator counts
/// the allocations of every thread of the process, the pool's workers included.
fn check_bench(image: &Path, prompt_tokens: usize, gen_tokens: usize, threads: usize) -> Value {
    let json = bramble_json(&args![
        "bench",
        "--model",
        image,
        "--prompt-tokens",
        prompt_tokens.to_string(),
        "--gen-tokens",
        gen_tokens.to_string(),
        "--threads",
        threads.to_string(),
        "--json"
    ]);
    assert_eq!(json["threads"].as_u64(), Some(threads as u64), "bench threads: {json}");
    for key in ["prefill_tok_s", "decode_tok_s", "weight_bytes_per_token"] {
        assert!(json[key].as_f64().is_some_and(|v| v.is_finite() && v > 0.0), "bench {key}: {json}");
    }
    // The first token comes after the whole prompt: no sooner than the prompt's own time.
    let prompt_ms = prompt_tokens as f64 / json["prefill_tok_s"].as_f64().unwrap() * 1e3;
    let first_ms = json["time_to_first_token_ms"].as_f64().unwrap_or(f64::NAN);
    assert!(first_ms.is_finite() && first_ms >= prompt_ms * 0.999, "bench time_to_first_token_ms: {json}");
    assert_eq!(json["allocations_per_token"].as_f64(), Some(0.0), "bench: a decode step allocated: {json}");
    if cfg!(target_os = "linux") {
        assert!(json["peak_rss_bytes"].as_u64().is_some_and(|b| b > 0), "bench peak_rss_bytes: {json}");
    } else {
        assert!(json.get("peak_rss_bytes").is_some(), "bench peak_rss_bytes: {json}");
    }
    // The weight traffic is what the library computes for the model.
    let opened = ModelImage::open(image).unwrap();
    let model = Model::new(&opened).unwrap();
    assert_eq!(json["weight_bytes_per_token"].as_u64(), Some(model.weight_bytes_per_token() as u64), "{json}");
    // So is the run state's size, the count memory limits are checked against.
    let context = json["context"].as_u64().expect("bench context") as usize;
    let state = model.state_bytes(context, bramble_runtime::session::DEFAULT_BATCH).unwrap();
    assert_eq!(json["state_bytes"].as_u64(), Some(state as u64), "{json}");
    assert!(state as u64 > json["kv_bytes"].as_u64().unwrap(), "the state holds the KV cache and more: {json}");
    json
}

#[test]
fn bench_reports_speed_memory_and_zero_allocations() {
    let fixture = Fixture::new("bpe", "q4_1");
    for quant in ["q4", "q8", "f16"] {
        for threads in [1, 2] {
            check_bench(&fixture.image(quant), 8, 16, threads);
        }
    }
    if let Some(image) = default_image("q4") {
        check_bench(&image, 8, 8, 2);
        let json = check_bench(&image, 8, 8, 1);
        eprintln!("bench SmolLM2 q4: {json}");
        // SmolLM2-135M at 4 bits reads tens of megabytes per token, not kilobytes or gigabytes.
        let bytes = json["weight_bytes_per_token"].as_f64().unwrap();
        assert!((2e7..3e8).contains(&bytes), "SmolLM2 q4 weight bytes per token {bytes}");
    }
}

#[test]
fn chat_answers_lines_from_stdin_and_resets() {
    // Synthetic: the loop runs, /reset is acknowledged, EOF ends it with status 0.
    let fixture = Fixture::new("bpe", "f16");
    let image = fixture.image("q8");
    let arguments = args!["chat", "--model", &image, "--temperature", "0", "--max-tokens", "6"];
    let output = bramble_with_input(&arguments, "Hello there\nthe world\n/reset\nHello again\n");
    assert_success(&arguments, &output);
    assert!(stderr(&output).contains("(conversation cleared)"), "/reset is not acknowledged:\n{}", stderr(&output));
    // Each reply ends with a line end (a reply may hold line ends of its own).
    assert!(stdout(&output).matches('\n').count() >= 3, "three replies, each ending a line:\n{:?}", stdout(&output));

    // The real model answers, and after /reset the same question gets the same (greedy) answer.
    // Germany, not France: for "What is the capital of France?" the reference's two best first
    // tokens ("The" and "L") are 0.08 apart, and the int8 activations of the q4 image tip it to
    // a French ramble; for Germany the gap is 0.66 and every image answers "Berlin".
    let Some(image) = default_image("q4") else {
        return;
    };
    let arguments = args!["chat", "--model", &image, "--temperature", "0", "--max-tokens", "24"];
    let question = "What is the capital of Germany?";
    let output = bramble_with_input(&arguments, &format!("{question}\nAnd of France?\n/reset\n{question}\n"));
    assert_success(&arguments, &output);
    let replies = stdout(&output);
    eprintln!("SmolLM2 chat:\n{replies}");
    assert!(
        replies.matches("Berlin").count() >= 2,
        "the model should answer Berlin twice (before and after /reset):\n{replies}"
    );
    let first_line = replies.lines().next().unwrap();
    assert!(
        replies[first_line.len()..].contains(first_line),
        "after /reset the first answer should repeat:\n{replies}"
    );
}

#[test]
fn convert_of_a_missing_file_fails_naming_it_and_writes_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let missing = dir.path().join("no-such-model.gguf");
    let output_image = dir.path().join("out.bramble");
    let arguments = args!["convert", "--input", &missing, "--output", &output_image, "--quant", "q4"];
    let output = bramble(&arguments);
    assert_clean_failure(&arguments, &output, &missing);
    assert!(listing(dir.path()).is_empty(), "files left behind: {:?}", listing(dir.path()));
}

#[test]
fn convert_of_a_truncated_or_corrupt_gguf_fails_naming_it_and_writes_nothing() {
    let fixture = Fixture::new("spm", "q4_1");
    let good = std::fs::read(&fixture.gguf).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let mut cases: Vec<(String, Vec<u8>)> = Vec::new();
    // Truncated: inside the header, inside the metadata, inside the tensor data, and one byte
    // short of the last tensor's end (the file's tail past it is alignment padding, which a
    // reader may do without, so cutting only padding is not an error).
    let data_end = {
        let file = bramble_tools::source::gguf::GgufFile::open(&fixture.gguf).unwrap();
        file.tensors().iter().map(|t| t.offset + t.size).max().unwrap()
    };
    for length in [10, 200, good.len() / 2, data_end - 1] {
        cases.push((format!("truncated-{length}.gguf"), good[..length].to_vec()));
    }
    // An unknown version.
    let mut bad_version = good.clone();
    bad_version[4..8].copy_from_slice(&99u32.to_le_bytes());
    cases.push(("version-99.gguf".to_string(), bad_version));
    // An absurd tensor count.
    let mut many_tensors = good.clone();
    many_tensors[8..16].copy_from_slice(&u64::MAX.to_le_bytes());
    cases.push(("tensor-count.gguf".to_string(), many_tensors));
    // An absurd metadata count.
    let mut many_keys = good.clone();
    many_keys[16..24].copy_from_slice(&(1u64 << 40).to_le_bytes());
    cases.push(("metadata-count.gguf".to_string(), many_keys));
    // The magic of GGUF, then garbage: read as GGUF, not as llama.2c.
    let mut garbage = b"GGUF".to_vec();
    garbage.extend((0..4096u32).map(|i| (i.wrapping_mul(2654435761) >> 13) as u8));
    cases.push(("garbage.gguf".to_string(), garbage));

    for (name, bytes) in cases {
        let case_dir = dir.path().join(name.trim_end_matches(".gguf"));
        std::fs::create_dir(&case_dir).unwrap();
        let input = case_dir.join(&name);
        std::fs::write(&input, bytes).unwrap();
        let output_image = case_dir.join("out.bramble");
        let arguments = args!["convert", "--input", &input, "--output", &output_image, "--quant", "q4"];
        let output = bramble(&arguments);
        assert_clean_failure(&arguments, &output, &input);
        assert_eq!(listing(&case_dir), vec![name.clone()], "{name}: files left behind");
    }
}

#[test]
fn a_truncated_or_corrupt_image_is_a_clear_error() {
    let fixture = Fixture::new("bpe", "q8_0");
    let image = fixture.image("q8");
    let good = std::fs::read(&image).unwrap();
    let mut cases: Vec<(&str, Vec<u8>)> = vec![
        ("empty", Vec::new()),
        ("header-only", good[..64].to_vec()),
        ("half", good[..good.len() / 2].to_vec()),
        ("one-byte-short", good[..good.len() - 1].to_vec()),
    ];
    // A flipped bit in the middle of the tensor data: the checksum catches it.
    let mut flipped = good.clone();
    let middle = flipped.len() / 2;
    flipped[middle] ^= 0x10;
    cases.push(("flipped-bit", flipped));
    for (name, bytes) in cases {
        let path = fixture.dir.join(format!("{name}.bramble"));
        std::fs::write(&path, bytes).unwrap();
        for command in [
            args!["generate", "--model", &path, "--prompt", "Hello", "--max-tokens", "2"].to_vec(),
            args!["inspect", &path].to_vec(),
        ] {
            let output = bramble(&command);
            assert_clean_failure(&command, &output, &path);
            assert!(stdout(&output).is_empty(), "{name}: `{}` printed {:?}", command_line(&command), stdout(&output));
        }
    }
    // A missing image too.
    let missing = fixture.dir.join("missing.bramble");
    let command = args!["generate", "--model", &missing, "--prompt", "Hello"];
    assert_clean_failure(&command, &bramble(&command), &missing);
}
