//! The serial console: a person at a terminal chats with the model.
//!
//! Written once over the [`transport`](crate::transport) traits, it runs over
//! the UART (or a USB-serial adapter, or a pseudo-terminal in the tests) and
//! over TCP. The line is in raw mode, so the console does its own echo and
//! editing: printable text is echoed, Backspace/Delete erase a character,
//! Ctrl-U the line, Ctrl-C abandons the line or cancels a running generation,
//! escape sequences (arrow keys) are ignored. Lines longer than
//! [`MAX_LINE_BYTES`] and lines that are not UTF-8 are refused with a message.
//! Output newlines are sent as CR LF.
//!
//! Commands: `/help`, `/reset`, `/stats`, `/bias`, `/set [NAME VALUE]`. Anything else
//! is the user's next turn in a conversation rendered with the model's chat
//! template; the oldest turns are dropped when it outgrows the context.

use crate::config::SamplingDefaults;
use crate::engine::{self, Engine, FinishReason, GenerationRequest, Outcome, Prompt, TokenSink, Usage};
use crate::transport::{is_tick, Read, SerialPort, TcpPort, Write};
use bramble_runtime::chat::ChatMessage;
use bramble_runtime::sampler::SamplerConfig;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::TryRecvError;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// The longest line the console takes, in bytes.
pub const MAX_LINE_BYTES: usize = 4096;

const CTRL_C: u8 = 0x03;
const CTRL_U: u8 = 0x15;
const BACKSPACE: u8 = 0x08;
const DELETE: u8 = 0x7F;
const ESCAPE: u8 = 0x1B;
const BELL: &[u8] = b"\x07";
const ERASE_CHARACTER: &[u8] = b"\x08 \x08";

/// The prompt shown before each line.
pub const PROMPT: &str = "> ";

/// What a byte typed at the prompt did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Edit {
    /// Nothing to act on yet.
    Pending,
    /// Enter: the line, or why it was refused.
    Line(Result<String, String>),
    /// Ctrl-C at the prompt: the line was abandoned.
    Interrupt,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Escape {
    None,
    /// After ESC.
    Start,
    /// In `ESC [ ...`, until a final byte.
    Csi,
    /// After `ESC O`: one more byte.
    Ss3,
}

/// Line editing in raw mode: the line so far and what to echo.
#[derive(Debug)]
pub struct LineEditor {
    /// The line typed so far, in a buffer of the longest line: typing allocates nothing.
    line: heapless::Vec<u8, MAX_LINE_BYTES>,
    /// Bytes were typed past the longest line: the line is refused at Enter.
    overflow: bool,
    escape: Escape,
    after_carriage_return: bool,
}

impl Default for LineEditor {
    fn default() -> Self {
        Self { line: heapless::Vec::new(), overflow: false, escape: Escape::None, after_carriage_return: false }
    }
}

impl LineEditor {
    /// Takes one typed byte; appends what the terminal should show to `echo`.
    pub fn feed(&mut self, byte: u8, echo: &mut Vec<u8>) -> Edit {
        let after_carriage_return = std::mem::replace(&mut self.after_carriage_return, false);
        match self.escape {
            Escape::Start => {
                self.escape = match byte {
                    b'[' => Escape::Csi,
                    b'O' => Escape::Ss3,
                    _ => Escape::None,
                };
                return Edit::Pending;
            }
            Escape::Csi => {
                if (0x40..=0x7E).contains(&byte) {
                    self.escape = Escape::None;
                }
                return Edit::Pending;
            }
            Escape::Ss3 => {
                self.escape = Escape::None;
                return Edit::Pending;
            }
            Escape::None => {}
        }
        match byte {
            b'\r' | b'\n' => {
                // CR LF from a terminal is one Enter.
                if byte == b'\n' && after_carriage_return {
                    return Edit::Pending;
                }
                self.after_carriage_return = byte == b'\r';
                echo.extend_from_slice(b"\r\n");
                let line = if std::mem::replace(&mut self.overflow, false) {
                    Err(format!("the line is longer than {MAX_LINE_BYTES} bytes; it was ignored"))
                } else {
                    std::str::from_utf8(&self.line).map(str::to_string).map_err(|e| {
                        format!("the line is not valid UTF-8 (at byte {}); it was ignored", e.valid_up_to())
                    })
                };
                self.line.clear();
                Edit::Line(line)
            }
            CTRL_C => {
                echo.extend_from_slice(b"^C\r\n");
                self.line.clear();
                self.overflow = false;
                Edit::Interrupt
            }
            CTRL_U => {
                for _ in 0..self.characters() {
                    echo.extend_from_slice(ERASE_CHARACTER);
                }
                self.line.clear();
                self.overflow = false;
                Edit::Pending
            }
            BACKSPACE | DELETE => {
                // A whole UTF-8 character: its continuation bytes and its lead byte.
                while self.line.last().is_some_and(|&b| b & 0xC0 == 0x80) {
                    self.line.pop();
                }
                if self.line.pop().is_some() {
                    echo.extend_from_slice(ERASE_CHARACTER);
                }
                Edit::Pending
            }
            ESCAPE => {
                self.escape = Escape::Start;
                Edit::Pending
            }
            b'\t' => self.insert(b' ', echo),
            0x00..=0x1F => Edit::Pending,
            _ => self.insert(byte, echo),
        }
    }

    fn insert(&mut self, byte: u8, echo: &mut Vec<u8>) -> Edit {
        if self.line.push(byte).is_ok() {
            echo.push(byte);
        } else {
            // Full: one bell, and the rest of the line is dropped.
            if !self.overflow {
                echo.extend_from_slice(BELL);
            }
            self.overflow = true;
        }
        Edit::Pending
    }

    /// Characters on the line (UTF-8 lead bytes and stray bytes).
    fn characters(&self) -> usize {
        self.line.iter().filter(|&&b| b & 0xC0 != 0x80).count()
    }
}

/// Writes `text` with each `\n` as `\r\n` (raw mode does no output processing).
fn write_text<W: Write>(out: &mut W, text: &str) -> Result<(), W::Error> {
    let mut lines = text.split('\n');
    if let Some(first) = lines.next() {
        out.write_all(first.as_bytes())?;
    }
    for line in lines {
        out.write_all(b"\r\n")?;
        out.write_all(line.as_bytes())?;
    }
    Ok(())
}

/// Streams the reply to the terminal and keeps it for the conversation.
struct ConsoleSink<W> {
    out: Arc<Mutex<W>>,
    reply: Arc<Mutex<String>>,
}

impl<W: Write + Send> TokenSink for ConsoleSink<W> {
    fn start(&mut self, _prompt_tokens: usize) -> std::io::Result<()> {
        Ok(())
    }
    fn text(&mut self, piece: &str) -> std::io::Result<()> {
        if let Ok(mut reply) = self.reply.lock() {
            reply.push_str(piece);
        }
        let mut out = self.out.lock().map_err(|_| std::io::Error::other("console writer poisoned"))?;
        write_text(&mut *out, piece)
            .map_err(|e| std::io::Error::new(embedded_io::Error::kind(&e).into(), "console write failed"))?;
        out.flush().map_err(|_| std::io::Error::other("console flush failed"))
    }
    fn finish(&mut self, _reason: FinishReason, _usage: &Usage) -> std::io::Result<()> {
        Ok(())
    }
    // The console prints the error itself, from the outcome.
    fn fail(&mut self, _error: &engine::RequestError) -> std::io::Result<()> {
        Ok(())
    }
}

/// Why a console session ended.
#[derive(Debug)]
pub enum End {
    /// The daemon is shutting down.
    Shutdown,
    /// The device or peer is gone.
    Gone(String),
}

/// One console: its settings and conversation, over a reader and a shared writer.
pub struct Console<W> {
    out: Arc<Mutex<W>>,
    engine: Engine,
    stopping: Arc<AtomicBool>,
    sampling: SamplerConfig,
    max_tokens: usize,
    max_tokens_limit: usize,
    system: Option<String>,
    messages: Vec<ChatMessage>,
    last: Option<Usage>,
    editor: LineEditor,
    /// Bytes typed while a reply was streaming, taken as input after it (as a terminal's type-ahead).
    typeahead: Vec<u8>,
}

const HELP: &str = "Type a message and press Enter to chat. Ctrl-C stops a reply, Ctrl-U clears the line.
/help                 this text
/reset                forget the conversation
/stats                the model, the conversation, the daemon's counters, the last reply's speed
/bias                 the bias feedback: its mode, the weights per layer, the recent signals
/set                  show the settings
/set NAME VALUE       temperature, top_p, top_k, min_p, repeat_penalty, seed, max_tokens, system (text, or none)
";

impl<W: Write + Send + 'static> Console<W> {
    /// A console writing to `out`.
    pub fn new(
        out: W,
        engine: Engine,
        defaults: &SamplingDefaults,
        max_tokens_limit: usize,
        stopping: Arc<AtomicBool>,
    ) -> Self {
        Self {
            out: Arc::new(Mutex::new(out)),
            engine,
            stopping,
            sampling: engine::sampler_config(defaults),
            max_tokens: defaults.max_tokens,
            max_tokens_limit,
            system: None,
            messages: Vec::new(),
            last: None,
            editor: LineEditor::default(),
            typeahead: Vec::new(),
        }
    }

    fn say(&self, text: &str) -> Result<(), End> {
        let mut out = self.out.lock().map_err(|_| End::Gone("console writer poisoned".to_string()))?;
        write_text(&mut *out, text).map_err(|e| End::Gone(format!("write failed: {e:?}")))?;
        out.flush().map_err(|e| End::Gone(format!("write failed: {e:?}")))
    }

    fn send(&self, bytes: &[u8]) -> Result<(), End> {
        let mut out = self.out.lock().map_err(|_| End::Gone("console writer poisoned".to_string()))?;
        out.write_all(bytes).map_err(|e| End::Gone(format!("write failed: {e:?}")))?;
        out.flush().map_err(|e| End::Gone(format!("write failed: {e:?}")))
    }

    /// Runs until the device is gone or the daemon stops.
    pub fn run<R: Read>(&mut self, reader: &mut R) -> End {
        match self.serve(reader) {
            Ok(()) => End::Shutdown,
            Err(end) => end,
        }
    }

    fn serve<R: Read>(&mut self, reader: &mut R) -> Result<(), End> {
        let info = Arc::clone(&self.engine.info);
        self.say(&format!("\nbrambled: {} (context {}). /help for commands.\n{PROMPT}", info.name, info.context))?;
        let mut buffer = [0u8; 256];
        let mut echo = Vec::with_capacity(512);
        loop {
            if self.stopping.load(Ordering::SeqCst) {
                let _ = self.say("\n(brambled is shutting down)\n");
                return Ok(());
            }
            let input: Vec<u8> = if self.typeahead.is_empty() {
                let n = read_some(reader, &mut buffer)?;
                buffer[..n].to_vec()
            } else {
                std::mem::take(&mut self.typeahead)
            };
            for &byte in &input {
                let edit = self.editor.feed(byte, &mut echo);
                if !echo.is_empty() {
                    self.send(&echo)?;
                    echo.clear();
                }
                match edit {
                    Edit::Pending => {}
                    Edit::Interrupt => self.say(PROMPT)?,
                    Edit::Line(Err(why)) => self.say(&format!("error: {why}\n{PROMPT}"))?,
                    Edit::Line(Ok(line)) => {
                        self.line(line.trim(), reader)?;
                        self.say(PROMPT)?;
                    }
                }
            }
        }
    }

    fn line<R: Read>(&mut self, line: &str, reader: &mut R) -> Result<(), End> {
        match line {
            "" => Ok(()),
            "/help" => self.say(HELP),
            "/reset" => {
                self.messages.clear();
                self.say("(conversation cleared)\n")
            }
            "/stats" => self.say(&self.stats()),
            "/bias" => {
                let text = self.engine.bias.lock().unwrap_or_else(|e| e.into_inner()).text();
                self.say(&text)
            }
            "/set" => self.say(&self.settings()),
            command if command.starts_with("/set ") => {
                let message = match self.set(command["/set ".len()..].trim()) {
                    Ok(done) => done,
                    Err(why) => format!("error: {why}"),
                };
                self.say(&format!("{message}\n"))
            }
            command if command.starts_with('/') => {
                let name = command.split_whitespace().next().unwrap_or(command);
                self.say(&format!("error: unknown command {name}; /help lists the commands\n"))
            }
            text => self.chat(text, reader),
        }
    }

    fn settings(&self) -> String {
        let s = &self.sampling;
        format!(
            "temperature {} top_p {} top_k {} min_p {} repeat_penalty {} seed {} max_tokens {} system {}\n",
            s.temperature,
            s.top_p,
            s.top_k,
            s.min_p,
            s.repetition_penalty,
            s.seed,
            self.max_tokens,
            self.system.as_deref().map_or("none".to_string(), |t| format!("{t:?}"))
        )
    }

    fn set(&mut self, arguments: &str) -> Result<String, String> {
        let (name, value) = arguments.split_once(' ').map(|(n, v)| (n, v.trim())).ok_or("usage: /set NAME VALUE")?;
        let real = |min: f32, max: f32| -> Result<f32, String> {
            match value.parse::<f32>() {
                Ok(v) if v.is_finite() && (min..=max).contains(&v) => Ok(v),
                _ => Err(format!("{name}: {value:?} is not a number from {min} to {max}")),
            }
        };
        let whole = |max: u64| -> Result<u64, String> {
            match value.parse::<u64>() {
                Ok(v) if v <= max => Ok(v),
                _ => Err(format!("{name}: {value:?} is not a whole number from 0 to {max}")),
            }
        };
        match name {
            "temperature" => self.sampling.temperature = real(0.0, 100.0)?,
            "top_p" => self.sampling.top_p = real(0.0, 1.0)?,
            "min_p" => self.sampling.min_p = real(0.0, 1.0)?,
            "repeat_penalty" => self.sampling.repetition_penalty = real(0.01, 100.0)?,
            "top_k" => self.sampling.top_k = whole(1 << 20)? as usize,
            "seed" => self.sampling.seed = whole(u64::MAX)?,
            "max_tokens" => {
                let n = whole(self.max_tokens_limit as u64)? as usize;
                if n == 0 {
                    return Err(format!("max_tokens: must be 1 to {}", self.max_tokens_limit));
                }
                self.max_tokens = n;
            }
            "system" => {
                self.system = (value != "none" && !value.is_empty()).then(|| value.to_string());
            }
            other => {
                return Err(format!(
                    "unknown setting {other}; one of temperature, top_p, top_k, min_p, repeat_penalty, seed, max_tokens, system"
                ))
            }
        }
        Ok(format!("{name} = {value}"))
    }

    fn stats(&self) -> String {
        let info = &self.engine.info;
        let stats = &self.engine.stats;
        let mut text = format!(
            "model {}: {}\nconversation: {} messages\ndaemon: {} served, {} refused busy, {} failed, {} cancelled, {} queued now\n",
            info.name,
            info.summary,
            self.messages.len(),
            stats.served.load(Ordering::Relaxed),
            stats.refused.load(Ordering::Relaxed),
            stats.failed.load(Ordering::Relaxed),
            stats.cancelled.load(Ordering::Relaxed),
            stats.queued.load(Ordering::SeqCst),
        );
        if let Some(usage) = &self.last {
            text.push_str(&format!(
                "last reply: {} tokens at {:.1} tokens/s; prompt {} tokens ({} cached) in {:.0} ms\n",
                usage.completion_tokens,
                usage.decode_tokens_per_second(),
                usage.prompt_tokens,
                usage.cached_tokens,
                usage.prefill.as_secs_f64() * 1000.0
            ));
            if let Some(allocations) = usage.decode_allocations {
                text.push_str(&format!("last reply's decode loop: {allocations} heap allocations\n"));
            }
        }
        text
    }

    /// One turn: the reply streams to the terminal; Ctrl-C cancels it.
    fn chat<R: Read>(&mut self, text: &str, reader: &mut R) -> Result<(), End> {
        self.messages.push(ChatMessage::new("user", text));
        let mut messages: Vec<ChatMessage> = self.system.iter().map(|s| ChatMessage::new("system", s)).collect();
        messages.extend(self.messages.iter().cloned());
        let request = GenerationRequest {
            prompt: Prompt::Chat { messages, trim_to_fit: true },
            max_tokens: self.max_tokens,
            sampling: self.sampling,
            reseed: false,
            stop: Vec::new(),
        };
        let reply = Arc::new(Mutex::new(String::with_capacity(self.max_tokens * 16)));
        let sink = ConsoleSink { out: Arc::clone(&self.out), reply: Arc::clone(&reply) };
        let cancel = Arc::new(AtomicBool::new(false));
        let outcome = match self.engine.submit(request, Box::new(sink), Arc::clone(&cancel)) {
            Ok(outcome) => outcome,
            Err(refusal) => {
                self.messages.pop();
                return self.say(&format!("error: {}\n", refusal.error(self.engine.queue_depth).message));
            }
        };
        let mut buffer = [0u8; 256];
        let mut gone = None;
        let outcome = loop {
            match outcome.try_recv() {
                Ok(outcome) => break outcome,
                Err(TryRecvError::Disconnected) => break Outcome::Disconnected,
                Err(TryRecvError::Empty) => {}
            }
            if gone.is_some() {
                std::thread::sleep(Duration::from_millis(20));
                continue;
            }
            // Ctrl-C cancels; other typing is kept (up to a line's worth) for after the reply.
            match read_some(reader, &mut buffer) {
                Ok(n) if buffer[..n].contains(&CTRL_C) => cancel.store(true, Ordering::SeqCst),
                Ok(n) => {
                    let room = MAX_LINE_BYTES.saturating_sub(self.typeahead.len()).min(n);
                    self.typeahead.extend_from_slice(&buffer[..room]);
                }
                Err(end) => {
                    cancel.store(true, Ordering::SeqCst);
                    gone = Some(end);
                }
            }
        };
        if let Some(end) = gone {
            return Err(end);
        }
        let reply = reply.lock().map(|r| r.clone()).unwrap_or_default();
        match outcome {
            Outcome::Finished { reason, usage, trimmed_messages } => {
                self.messages.drain(..trimmed_messages.min(self.messages.len().saturating_sub(1)));
                self.messages.push(ChatMessage::new("assistant", reply.trim()));
                self.last = Some(usage);
                let note = match reason {
                    FinishReason::Cancelled => "\n^C (cancelled)\n",
                    FinishReason::Context => "\n(the context is full; /reset to start again)\n",
                    _ => "\n",
                };
                if trimmed_messages > 0 {
                    self.say(&format!("{note}({trimmed_messages} oldest messages were dropped to fit the context)\n"))
                } else {
                    self.say(note)
                }
            }
            Outcome::Failed(error) => {
                self.messages.pop();
                self.say(&format!("error: {}\n", error.message))
            }
            Outcome::Disconnected => Err(End::Gone("the console stopped answering".to_string())),
        }
    }
}

/// Reads what has arrived: `Ok(0)` after a quiet tick, `Err` when the device is gone.
fn read_some<R: Read>(reader: &mut R, buffer: &mut [u8]) -> Result<usize, End> {
    match reader.read(buffer) {
        Ok(0) => Err(End::Gone("end of file".to_string())),
        Ok(n) => Ok(n),
        Err(e) if is_tick(&e) => Ok(0),
        Err(e) => Err(End::Gone(format!("{e:?}"))),
    }
}

/// The first wait before reopening a vanished device, and the longest.
pub const REOPEN_BACKOFF: (Duration, Duration) = (Duration::from_millis(250), Duration::from_secs(10));

/// Runs the console on the serial device at `path`, reopening it with
/// backoff whenever it disappears (unplugged adapter, closed pty), until `stopping`.
pub fn run_serial(
    path: &Path,
    baud: u32,
    engine: Engine,
    defaults: SamplingDefaults,
    max_tokens_limit: usize,
    stopping: Arc<AtomicBool>,
) {
    let mut backoff = REOPEN_BACKOFF.0;
    let mut warned = false;
    while !stopping.load(Ordering::SeqCst) {
        match SerialPort::open(path, baud).and_then(|port| Ok((port.try_clone()?, port))) {
            Ok((mut reader, writer)) => {
                log::info!("console on {} at {baud} baud", path.display());
                warned = false;
                let opened = Instant::now();
                let mut console =
                    Console::new(writer, engine.clone(), &defaults, max_tokens_limit, Arc::clone(&stopping));
                match console.run(&mut reader) {
                    End::Shutdown => return,
                    End::Gone(why) => log::warn!("console {}: device gone ({why}); reopening", path.display()),
                }
                if opened.elapsed() > Duration::from_secs(10) {
                    backoff = REOPEN_BACKOFF.0;
                }
            }
            Err(e) if !warned => {
                log::warn!("console: cannot open {e}; retrying with backoff");
                warned = true;
            }
            Err(e) => log::debug!("console: cannot open {e}"),
        }
        let until = Instant::now() + backoff;
        while Instant::now() < until && !stopping.load(Ordering::SeqCst) {
            std::thread::sleep(Duration::from_millis(50));
        }
        backoff = (backoff * 2).min(REOPEN_BACKOFF.1);
    }
}

/// Runs the console over a TCP connection; with a token configured, the
/// first line must be the token (not echoed).
pub fn serve_tcp(stream: std::net::TcpStream, shared: &crate::connection::Shared) {
    let Ok(mut reader) = TcpPort::new(stream) else { return };
    let Ok(mut writer) = reader.try_clone() else { return };
    let mut typeahead = Vec::new();
    if let Some(token) = &shared.config.tcp.auth_token {
        if writer.write_all(b"token: ").is_err() {
            return;
        }
        let deadline = Instant::now() + shared.config.limits.request_timeout;
        let mut editor = LineEditor::default();
        let mut hidden = Vec::new();
        let mut buffer = [0u8; 256];
        let given = 'read: loop {
            if Instant::now() > deadline {
                let _ = writer.write_all(b"\r\nerror: no token in time\r\n");
                return;
            }
            let Ok(n) = read_some(&mut reader, &mut buffer) else { return };
            for (at, &byte) in buffer[..n].iter().enumerate() {
                if let Edit::Line(line) = editor.feed(byte, &mut hidden) {
                    // What came after the token line (a script's first command) is the console's first input.
                    typeahead.extend_from_slice(&buffer[at + 1..n]);
                    break 'read line.unwrap_or_default();
                }
            }
            hidden.clear();
        };
        if !crate::request::constant_time_eq(given.trim().as_bytes(), token.as_bytes()) {
            let _ = writer.write_all(b"\r\nerror: wrong token\r\n");
            return;
        }
    }
    let config = &shared.config;
    let stopping = Arc::clone(&shared.engine.stopping);
    let mut console = Console::new(writer, shared.engine.clone(), &config.sampling, config.limits.max_tokens, stopping);
    console.typeahead = typeahead;
    if let End::Gone(why) = console.run(&mut reader) {
        log::debug!("tcp console closed: {why}");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn type_line(editor: &mut LineEditor, bytes: &[u8], echo: &mut Vec<u8>) -> Edit {
        for &byte in bytes {
            assert_eq!(editor.feed(byte, echo), Edit::Pending);
        }
        editor.feed(b'\r', echo)
    }

    #[test]
    fn the_line_holds_exactly_the_longest_line_and_refuses_one_byte_more() {
        let mut editor = LineEditor::default();
        let mut echo = Vec::new();
        let longest = vec![b'a'; MAX_LINE_BYTES];
        assert_eq!(type_line(&mut editor, &longest, &mut echo), Edit::Line(Ok("a".repeat(MAX_LINE_BYTES))));
        assert!(!echo.contains(&BELL[0]));
        echo.clear();
        let edit = type_line(&mut editor, &[longest.as_slice(), b"bc"].concat(), &mut echo);
        assert_eq!(edit, Edit::Line(Err(format!("the line is longer than {MAX_LINE_BYTES} bytes; it was ignored"))));
        assert_eq!(echo.iter().filter(|&&b| b == BELL[0]).count(), 1, "one bell for the overflow");
        // The next line starts empty.
        assert_eq!(type_line(&mut editor, b"next", &mut echo), Edit::Line(Ok("next".to_string())));
    }

    #[test]
    fn backspace_erases_a_whole_character_and_bad_utf8_is_refused() {
        let mut editor = LineEditor::default();
        let mut echo = Vec::new();
        let edit = type_line(&mut editor, &["é".as_bytes(), b"x", &[DELETE, BACKSPACE], b"e"].concat(), &mut echo);
        assert_eq!(edit, Edit::Line(Ok("e".to_string())), "x, then both bytes of é, erased");
        let edit = type_line(&mut editor, &[b'a', 0xFF, b'b'], &mut echo);
        assert_eq!(edit, Edit::Line(Err("the line is not valid UTF-8 (at byte 1); it was ignored".to_string())));
        // Ctrl-C abandons the line.
        for &byte in b"abandoned" {
            editor.feed(byte, &mut echo);
        }
        assert_eq!(editor.feed(CTRL_C, &mut echo), Edit::Interrupt);
        assert_eq!(editor.feed(b'\r', &mut echo), Edit::Line(Ok(String::new())));
    }
}
