//! Chat templates: the model's own Jinja template rendered with minijinja
//! (with Python string methods such as `.strip()` that Hugging Face templates
//! use), or a built-in Llama-3 / ChatML / Llama-2 `[INST]` template when the
//! image has none.

use crate::error::{Error, ErrorKind, Result};
use crate::vocab::Vocab;
use serde::Serialize;
use std::ops::Range;

/// One turn of a conversation.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ChatMessage {
    /// `system`, `user` or `assistant`.
    pub role: String,
    /// The text.
    pub content: String,
}

impl ChatMessage {
    /// A message of `role` saying `content`.
    pub fn new(role: &str, content: &str) -> Self {
        Self { role: role.to_string(), content: content.to_string() }
    }
}

/// ChatML, as SmolLM2 and many others use.
pub const CHATML: &str = "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}";

/// Llama-2 chat: `[INST] <<SYS>> … <</SYS>> … [/INST]`, as Meta's reference formats it.
pub const LLAMA2: &str = "{% if messages[0]['role'] == 'system' %}{% set loop_messages = messages[1:] %}{% set system_message = messages[0]['content'] %}{% else %}{% set loop_messages = messages %}{% set system_message = false %}{% endif %}{% for message in loop_messages %}{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}{% if loop.index0 == 0 and system_message != false %}{% set content = '<<SYS>>\\n' + system_message + '\\n<</SYS>>\\n\\n' + message['content'] %}{% else %}{% set content = message['content'] %}{% endif %}{% if message['role'] == 'user' %}{{ bos_token + '[INST] ' + content.strip() + ' [/INST]' }}{% elif message['role'] == 'assistant' %}{{ ' '  + content.strip() + ' ' + eos_token }}{% endif %}{% endfor %}";

/// Llama-3.x chat, as Meta's template formats it: `<|begin_of_text|>`
/// first, then each turn `<|start_header_id|>ROLE<|end_header_id|>\n\n`,
/// its trimmed text and `<|eot_id|>`, which ends the turn (and generation).
pub const LLAMA3: &str = "{{ bos_token }}{% for message in messages %}{{ '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n' + message['content'] | trim + '<|eot_id|>' }}{% endfor %}{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}";

/// Gemma's turns: BOS, a system message (if any) put before the first user
/// turn's text, each turn `<start_of_turn>ROLE\n…<end_of_turn>\n` with the
/// assistant called `model`.
pub const GEMMA: &str = "{{ bos_token }}{% if messages[0]['role'] == 'system' %}{% set first_user_prefix = messages[0]['content'] + '\n\n' %}{% set loop_messages = messages[1:] %}{% else %}{% set first_user_prefix = '' %}{% set loop_messages = messages %}{% endif %}{% for message in loop_messages %}{% if message['role'] == 'assistant' %}{% set role = 'model' %}{% else %}{% set role = message['role'] %}{% endif %}{{ '<start_of_turn>' + role + '\n' + (first_user_prefix if loop.first else '') + message['content'] | trim + '<end_of_turn>\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<start_of_turn>model\n' }}{% endif %}";

/// The built-in template for a vocabulary whose model brought none:
/// Llama-3 when it has `<|start_header_id|>`, Gemma's when it has
/// `<start_of_turn>`, ChatML when it has `<|im_start|>`, Llama-2 otherwise.
pub fn builtin_for(vocab: &Vocab) -> &'static str {
    if vocab.find("<|start_header_id|>").is_some() {
        LLAMA3
    } else if vocab.find("<start_of_turn>").is_some() {
        GEMMA
    } else if vocab.find("<|im_start|>").is_some() {
        CHATML
    } else {
        LLAMA2
    }
}

/// A chat template ready to render.
pub struct ChatTemplate {
    source: String,
    bos_token: String,
    eos_token: String,
}

impl ChatTemplate {
    /// The image's template, or the built-in one that suits the vocabulary
    /// ([`builtin_for`]).
    pub fn new(template: Option<&str>, vocab: &Vocab) -> Self {
        let text = |id: Option<u32>| {
            id.map(|i| String::from_utf8_lossy(&vocab.tokens[i as usize]).into_owned()).unwrap_or_default()
        };
        let source = template.unwrap_or_else(|| builtin_for(vocab)).to_string();
        Self { source, bos_token: text(vocab.bos_id), eos_token: text(vocab.eos_id) }
    }

    /// The template text.
    pub fn source(&self) -> &str {
        &self.source
    }

    /// Renders `messages`; with `add_generation_prompt` the text ends where the
    /// assistant's reply begins. Control tokens appear as text (`<|im_start|>`),
    /// and so would any that the messages spell: to feed a conversation to a
    /// model, use [`Tokenizer::encode_chat`](crate::tokenizer::Tokenizer::encode_chat),
    /// which encodes what the messages say as plain text.
    pub fn render(&self, messages: &[ChatMessage], add_generation_prompt: bool) -> Result<String> {
        let fail = |e: minijinja::Error| Error::new(ErrorKind::Template, format!("chat template: {e:#}"));
        let mut env = minijinja::Environment::new();
        env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
        env.add_function("raise_exception", |message: String| -> std::result::Result<String, minijinja::Error> {
            Err(minijinja::Error::new(minijinja::ErrorKind::InvalidOperation, message))
        });
        env.add_template("chat", &self.source).map_err(fail)?;
        let template = env.get_template("chat").map_err(fail)?;
        template
            .render(minijinja::context! {
                messages => messages,
                add_generation_prompt => add_generation_prompt,
                bos_token => &self.bos_token,
                eos_token => &self.eos_token,
            })
            .map_err(fail)
    }
}

/// Marks where an escaped piece of message text starts in a rendering. The
/// marks are Unicode noncharacters (U+FDD0–U+FDEF), which the standard keeps
/// for a program's internal use: no template, vocabulary or text means
/// anything by them, and any in message text are escaped in turn.
const ESCAPE_START: char = '\u{FDD0}';
/// Marks where an escaped piece ends.
const ESCAPE_END: char = '\u{FDD1}';
/// The hexadecimal digits of a mark's number.
const ESCAPE_DIGITS: [char; 16] = [
    '\u{FDE0}', '\u{FDE1}', '\u{FDE2}', '\u{FDE3}', '\u{FDE4}', '\u{FDE5}', '\u{FDE6}', '\u{FDE7}', '\u{FDE8}',
    '\u{FDE9}', '\u{FDEA}', '\u{FDEB}', '\u{FDEC}', '\u{FDED}', '\u{FDEE}', '\u{FDEF}',
];

/// Whether `c` is one of the noncharacters the escaping uses.
fn is_reserved(c: char) -> bool {
    ('\u{FDD0}'..='\u{FDEF}').contains(&c)
}

/// Whether `text` (a piece of a rendering) holds escaped message text.
pub(crate) fn is_escaped(text: &str) -> bool {
    text.contains(is_reserved)
}

/// A conversation rendered with the pieces of message text that could be
/// read as control tokens swapped for numbered marks.
pub(crate) struct EscapedRendering<'m> {
    text: String,
    /// What each mark stands for, by number.
    originals: Vec<&'m str>,
}

impl EscapedRendering<'_> {
    /// The rendering, marks included.
    pub(crate) fn text(&self) -> &str {
        &self.text
    }

    /// Appends `piece` (a piece of [`text`](Self::text)) to `out` with every
    /// mark replaced by the message text it stands for.
    pub(crate) fn unescape(&self, piece: &str, out: &mut String) -> Result<()> {
        let cut = || {
            Error::new(
                ErrorKind::Template,
                "chat template: the template cut into a message's text where that text spells a control token \
                 (bramble marks such text to encode it as plain text)",
            )
        };
        let mut chars = piece.chars();
        while let Some(c) = chars.next() {
            if !is_reserved(c) {
                out.push(c);
                continue;
            }
            if c != ESCAPE_START {
                return Err(cut());
            }
            let mut number = 0usize;
            loop {
                match chars.next() {
                    Some(ESCAPE_END) => break,
                    Some(c) => {
                        let digit = ESCAPE_DIGITS.iter().position(|&digit| digit == c).ok_or_else(cut)?;
                        number = number.checked_mul(16).ok_or_else(cut)? + digit;
                    }
                    None => return Err(cut()),
                }
            }
            out.push_str(self.originals.get(number).ok_or_else(cut)?);
        }
        Ok(())
    }
}

/// The control-token spellings to escape, longest first, and which bytes begin one.
struct ControlSpellings<'c> {
    spellings: Vec<&'c str>,
    first_bytes: [bool; 256],
}

impl<'c> ControlSpellings<'c> {
    /// `spellings` (longest first) less any made with the marks' characters,
    /// which could be found inside a mark.
    fn new(spellings: &[&'c str]) -> Self {
        let spellings: Vec<&str> = spellings
            .iter()
            .copied()
            .filter(|spelling| !spelling.is_empty() && !spelling.contains(is_reserved))
            .collect();
        let mut first_bytes = [false; 256];
        for spelling in &spellings {
            first_bytes[spelling.as_bytes()[0] as usize] = true;
        }
        Self { spellings, first_bytes }
    }
}

/// `text` with every piece that could be read as one of the `control`
/// spellings (longest first) swapped for a mark numbered by its place in
/// `originals`:
///
/// - every control spelling in it;
/// - at either end of its trimmed text (templates often trim), the longest
///   piece that, with the markup next to it, could complete a control
///   spelling: the end of the text that begins one, the start of the text
///   that ends one;
/// - the noncharacters the marks are made of.
fn escape<'m>(text: &'m str, control: &ControlSpellings, originals: &mut Vec<&'m str>) -> String {
    let (first_bytes, control) = (&control.first_bytes, control.spellings.as_slice());
    let mut pieces: Vec<Range<usize>> = Vec::new();
    let mut position = 0;
    while let Some(c) = text[position..].chars().next() {
        let rest = &text[position..];
        let spelling = if first_bytes[rest.as_bytes()[0] as usize] {
            control.iter().find(|spelling| rest.starts_with(**spelling))
        } else {
            None
        };
        let length = match spelling {
            Some(spelling) => spelling.len(),
            None if is_reserved(c) => c.len_utf8(),
            None => 0,
        };
        if length > 0 {
            pieces.push(position..position + length);
            position += length;
        } else {
            position += c.len_utf8();
        }
    }
    let trimmed_start = text.len() - text.trim_start().len();
    let trimmed_end = text.trim_end().len();
    if trimmed_start < trimmed_end {
        let core = &text[trimmed_start..trimmed_end];
        // The longest proper prefix of a spelling that the text ends with.
        let ends_with = control
            .iter()
            .flat_map(|spelling| (1..spelling.len()).filter(|&k| spelling.is_char_boundary(k)).map(|k| &spelling[..k]))
            .filter(|prefix| core.ends_with(*prefix))
            .map(str::len)
            .max();
        if let Some(length) = ends_with {
            pieces.push(trimmed_end - length..trimmed_end);
        }
        // The longest proper suffix of a spelling that the text starts with.
        let starts_with = control
            .iter()
            .flat_map(|spelling| (1..spelling.len()).filter(|&k| spelling.is_char_boundary(k)).map(|k| &spelling[k..]))
            .filter(|suffix| core.starts_with(*suffix))
            .map(str::len)
            .max();
        if let Some(length) = starts_with {
            pieces.push(trimmed_start..trimmed_start + length);
        }
    }
    if pieces.is_empty() {
        return text.to_string();
    }
    // Overlapping pieces become one.
    pieces.sort_by_key(|piece| piece.start);
    let mut merged: Vec<Range<usize>> = Vec::with_capacity(pieces.len());
    for piece in pieces {
        match merged.last_mut() {
            Some(last) if piece.start < last.end => last.end = last.end.max(piece.end),
            _ => merged.push(piece),
        }
    }
    let mut out = String::with_capacity(text.len() + 8 * merged.len());
    let mut copied = 0;
    for piece in merged {
        out.push_str(&text[copied..piece.start]);
        out.push(ESCAPE_START);
        let number = originals.len();
        let digits = (usize::BITS - number.leading_zeros()).div_ceil(4).max(1);
        for shift in (0..digits).rev() {
            out.push(ESCAPE_DIGITS[(number >> (4 * shift)) & 0xF]);
        }
        out.push(ESCAPE_END);
        originals.push(&text[piece.clone()]);
        copied = piece.end;
    }
    out.push_str(&text[copied..]);
    out
}

impl ChatTemplate {
    /// Renders `messages` as [`render`](Self::render) does, with the pieces
    /// of their roles and text that could be read as one of the `control`
    /// token spellings (longest first) marked, so that encoding the
    /// rendering with special tokens parsed finds only the template's own.
    /// [`EscapedRendering::unescape`] puts the text back.
    ///
    /// A conversation that spells no control token renders exactly as with
    /// [`render`](Self::render). The marks are not whitespace, so a template
    /// that trims or joins message text works as before; one that slices it
    /// may cut a mark, which unescaping reports.
    pub(crate) fn render_escaped<'m>(
        &self,
        messages: &'m [ChatMessage],
        add_generation_prompt: bool,
        control: &[&str],
    ) -> Result<EscapedRendering<'m>> {
        let sources = [("template", &self.source), ("BOS token", &self.bos_token), ("EOS token", &self.eos_token)];
        for (what, text) in sources {
            if text.contains(is_reserved) {
                return Err(Error::new(
                    ErrorKind::Template,
                    format!("chat template: the {what} holds noncharacters U+FDD0–U+FDEF, which mark message text"),
                ));
            }
        }
        let control = ControlSpellings::new(control);
        let mut originals = Vec::new();
        let escaped: Vec<ChatMessage> = messages
            .iter()
            .map(|message| ChatMessage {
                role: escape(&message.role, &control, &mut originals),
                content: escape(&message.content, &control, &mut originals),
            })
            .collect();
        let text = self.render(&escaped, add_generation_prompt)?;
        Ok(EscapedRendering { text, originals })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::vocab::TokenType;

    fn vocab(tokens: &[&str]) -> Vocab {
        let n = tokens.len();
        Vocab::llama_sentencepiece(
            tokens.iter().map(|t| t.as_bytes().to_vec()).collect(),
            vec![0.0; n],
            vec![TokenType::Normal; n],
        )
    }

    #[test]
    fn chatml_renders_turns_and_generation_prompt() {
        let template = ChatTemplate::new(None, &vocab(&["<unk>", "<|endoftext|>", "<|im_end|>", "<|im_start|>"]));
        let text =
            template.render(&[ChatMessage::new("system", "Be brief."), ChatMessage::new("user", "Hi")], true).unwrap();
        assert_eq!(
            text,
            "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"
        );
    }

    #[test]
    fn llama3_is_chosen_by_its_header_token_and_renders_meta_s_format() {
        let tokens = ["<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"];
        let mut llama3 = vocab(&tokens);
        (llama3.bos_id, llama3.eos_id) = (Some(0), Some(1));
        let template = ChatTemplate::new(None, &llama3);
        assert_eq!(template.source(), LLAMA3);
        let messages = [
            ChatMessage::new("system", "Be brief."),
            ChatMessage::new("user", " Hi\n"),
            ChatMessage::new("assistant", "Hello."),
            ChatMessage::new("user", "Bye"),
        ];
        assert_eq!(
            template.render(&messages, true).unwrap(),
            "<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\nBe brief.<|eot_id|>\
             <|start_header_id|>user<|end_header_id|>\n\nHi<|eot_id|>\
             <|start_header_id|>assistant<|end_header_id|>\n\nHello.<|eot_id|>\
             <|start_header_id|>user<|end_header_id|>\n\nBye<|eot_id|>\
             <|start_header_id|>assistant<|end_header_id|>\n\n"
        );
        // Without the generation prompt the text ends with the last turn.
        let text = template.render(&messages[..2], false).unwrap();
        assert!(text.ends_with("Hi<|eot_id|>"), "{text}");
        // The image's own template wins over the built-in one.
        assert_eq!(ChatTemplate::new(Some(CHATML), &llama3).source(), CHATML);
    }

    #[test]
    fn gemma_is_chosen_by_its_turn_token_and_folds_the_system_prompt_into_the_first_turn() {
        let template =
            ChatTemplate::new(None, &vocab(&["<unk>", "<bos>", "<eos>", "<start_of_turn>", "<end_of_turn>"]));
        assert_eq!(template.source(), GEMMA);
        let messages = [
            ChatMessage::new("system", "Be brief."),
            ChatMessage::new("user", " Hi "),
            ChatMessage::new("assistant", "Hello."),
            ChatMessage::new("user", "Bye"),
        ];
        assert_eq!(
            template.render(&messages, true).unwrap(),
            "<bos><start_of_turn>user\nBe brief.\n\nHi<end_of_turn>\n<start_of_turn>model\nHello.<end_of_turn>\n\
             <start_of_turn>user\nBye<end_of_turn>\n<start_of_turn>model\n"
        );
    }

    #[test]
    fn llama2_renders_system_prompt_and_strips() {
        let template = ChatTemplate::new(None, &vocab(&["<unk>", "<s>", "</s>"]));
        let messages = [
            ChatMessage::new("system", "Be brief."),
            ChatMessage::new("user", "Hi  "),
            ChatMessage::new("assistant", "Hello."),
            ChatMessage::new("user", "Bye"),
        ];
        let text = template.render(&messages, true).unwrap();
        assert_eq!(text, "<s>[INST] <<SYS>>\nBe brief.\n<</SYS>>\n\nHi [/INST] Hello. </s><s>[INST] Bye [/INST]");
    }

    #[test]
    fn llama2_refuses_roles_out_of_order() {
        let template = ChatTemplate::new(None, &vocab(&["<unk>", "<s>", "</s>"]));
        let error = template.render(&[ChatMessage::new("assistant", "x")], true).unwrap_err();
        assert!(error.message().contains("alternate"), "{error}");
    }

    #[test]
    fn broken_template_is_an_error_not_a_panic() {
        let template = ChatTemplate::new(Some("{% for %}"), &vocab(&["<unk>", "<s>", "</s>"]));
        assert_eq!(template.render(&[], true).unwrap_err().kind(), ErrorKind::Template);
    }
}
