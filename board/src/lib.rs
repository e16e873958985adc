//! `brambled`, Bramble's on-device daemon: it loads one model image once and
//! serves it over the serial console and two TCP protocols.
//!
//! | module | what |
//! |---|---|
//! | [`config`] | the TOML configuration, its defaults and validation, and the flags that override it |
//! | [`transport`] | the one transport abstraction (embedded-io `Read`/`Write`) over a UART/pty and a TCP stream |
//! | [`engine`] | the inference thread: one model, one generation at a time, a bounded FIFO queue, cancellation; the types the protocols share, loading, the memory check and the bias feedback in its submodules |
//! | [`connection`] | reading requests from TCP within the byte caps and timeouts |
//! | [`request`] | the generation request shared by both TCP protocols, parsed from JSON with errors naming the field |
//! | [`json`] | JSON string escaping into a reused buffer, so streaming a token allocates nothing |
//! | [`ndjson`] | the NDJSON protocol (one JSON object per line, like ollama's `/api/generate`) |
//! | [`http`] | the OpenAI-compatible HTTP/1.1 server |
//! | [`console`] | the serial console: line editing, commands, chat history, Ctrl-C |
//! | [`daemon`] | startup, listeners, signals, sd_notify, shutdown |
//!
//! Threads: one inference thread owns the model and the session; each TCP
//! connection and the console have their own thread, parse requests, and hand
//! the engine a job whose sink writes tokens straight to the client.
#![warn(missing_docs)]
#![forbid(unsafe_code)]

pub mod config;
pub mod connection;
pub mod console;
pub mod daemon;
pub mod engine;
pub mod http;
pub mod json;
pub mod logger;
pub mod ndjson;
pub mod request;
pub mod transport;
