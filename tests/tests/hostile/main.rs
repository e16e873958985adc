//! Regression tests for the defects found by attacking `brambled`
//! and `bramble` as a hostile client would. Each test failed on the main
//! branch before its fix.
//!
//! | module | what |
//! |---|---|
//! | `stalled_client` | a streaming client that stops reading cannot freeze the board; SIGTERM always ends it |
//! | `crafted_image` | configurations whose sizes wrap, non-finite logits |
//! | `smuggling` | request smuggling and HTTP framing (RFC 9112) |
//! | `connections` | idle sockets cannot deny service; `/health` keeps a slot |
//! | `chat_injection` | message content is plain text, never control tokens |
//! | `web_pages` | DNS rebinding and cross-site requests |
//! | `signals_inputs` | SIGHUP, a FIFO as the model, an endless config file |
//! | `duplicate_keys` | a request with a key twice is refused, not half-read |
//! | `utf8_boundaries` | a reply cut inside a character ends before it, with no U+FFFD |

mod chat_injection;
mod connections;
mod crafted_image;
mod duplicate_keys;
mod signals_inputs;
mod smuggling;
mod stalled_client;
mod utf8_boundaries;
mod web_pages;
