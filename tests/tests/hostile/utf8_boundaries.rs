//! See the table in `main.rs`: a reply that `max_tokens` cuts between the
//! byte tokens of one character ends before that character, with no U+FFFD
//! the model never produced, in `bramble generate` and in `brambled`'s
//! NDJSON and HTTP answers, streamed or whole.
//!
//! The synthetic model has a token for every byte, so a seeded, wide-open
//! sampler soon ends a short reply on the first byte of a multi-byte
//! character; `bramble generate --json` names the tokens, so the test knows
//! the cut is real, and the daemon (same image, sampler, seed, one thread)
//! gives the same reply.

use bramble_runtime::tokenizer::Tokenizer;
use bramble_runtime::ModelImage;
use bramble_tests::bramble_json;
use bramble_tests::daemon::*;
use serde_json::{json, Value};

const PROMPT: &str = "Once upon a time";
const MAX_TOKENS: usize = 3;
/// Seeds tried before giving up on finding a cut reply.
const SEEDS: u64 = 200;

/// A reply cut inside a character: its seed and the text before the cut.
struct CutReply {
    seed: u64,
    text: String,
}

/// The first seed whose reply (by `bramble generate`) ends in an incomplete character.
fn cut_reply() -> CutReply {
    let image = ModelImage::open(model()).expect("the synthetic image opens");
    let tokenizer = Tokenizer::new(image.vocab()).expect("its tokenizer");
    let model = model().to_str().expect("a UTF-8 path");
    for seed in 0..SEEDS {
        let seed_text = seed.to_string();
        let max_tokens = MAX_TOKENS.to_string();
        let args = [
            "generate",
            "--model",
            model,
            "--prompt",
            PROMPT,
            "--max-tokens",
            &max_tokens,
            "--seed",
            &seed_text,
            "--temperature",
            "1",
            "--top-k",
            "0",
            "--top-p",
            "1",
            "--min-p",
            "0",
            "--threads",
            "1",
            "--json",
        ];
        let result = bramble_json(&args);
        let tokens: Vec<u32> = serde_json::from_value(result["tokens"].clone()).expect("tokens");
        if tokens.len() != MAX_TOKENS {
            continue;
        }
        let bytes: Vec<u8> = tokens.iter().flat_map(|&token| tokenizer.token_bytes(token).to_vec()).collect();
        // Only the end is wrong: every byte before it is whole UTF-8, the end begins a character.
        let Err(error) = std::str::from_utf8(&bytes) else { continue };
        if error.error_len().is_some() {
            continue;
        }
        let text = std::str::from_utf8(&bytes[..error.valid_up_to()]).expect("valid up to the cut").to_string();
        assert_eq!(result["text"].as_str(), Some(text.as_str()), "bramble generate, seed {seed}: {result}");
        return CutReply { seed, text };
    }
    panic!("none of {SEEDS} seeds ended a {MAX_TOKENS}-token reply inside a character");
}

fn request(cut: &CutReply, stream: bool) -> Value {
    json!({
        "prompt": PROMPT, "max_tokens": MAX_TOKENS, "seed": cut.seed, "stream": stream,
        "temperature": 1, "top_k": 0, "top_p": 1, "min_p": 0,
    })
}

#[test]
fn a_reply_cut_inside_a_character_ends_before_it() {
    let cut = cut_reply();
    assert!(!cut.text.contains('\u{FFFD}'), "seed {}: {:?}", cut.seed, cut.text);
    let daemon = Daemon::start(&[]);

    let whole = ndjson(daemon.ndjson(), &request(&cut, false));
    let done = whole.last().expect("a done line");
    assert_eq!(done["done_reason"], "length", "{done}");
    assert_eq!(done["eval_count"].as_u64(), Some(MAX_TOKENS as u64), "{done}");
    assert_eq!(done["response"].as_str(), Some(cut.text.as_str()), "NDJSON, seed {}: {done}", cut.seed);

    let streamed = ndjson(daemon.ndjson(), &request(&cut, true));
    assert_eq!(streamed_text(&streamed), cut.text, "NDJSON streamed, seed {}: {streamed:?}", cut.seed);

    let body = request(&cut, false);
    let response = http(daemon.http(), "POST", "/v1/completions", Some(&body), &["Content-Type: application/json"]);
    assert_eq!(response.status, 200, "{}", response.text());
    let choice = &response.json()["choices"][0];
    assert_eq!(choice["finish_reason"], "length", "{choice}");
    assert_eq!(choice["text"].as_str(), Some(cut.text.as_str()), "HTTP, seed {}: {choice}", cut.seed);

    let body = request(&cut, true);
    let response = http(daemon.http(), "POST", "/v1/completions", Some(&body), &["Content-Type: application/json"]);
    assert_eq!(response.status, 200, "{}", response.text());
    let mut text = String::new();
    for event in sse_events(&response.text()) {
        if event != "[DONE]" {
            let chunk: Value = serde_json::from_str(&event).unwrap_or_else(|e| panic!("{e}: {event}"));
            text.push_str(chunk["choices"][0]["text"].as_str().unwrap_or_default());
        }
    }
    assert_eq!(text, cut.text, "HTTP streamed, seed {}: {}", cut.seed, response.text());
}
