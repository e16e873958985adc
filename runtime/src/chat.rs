//! Chat templates: the model's own Jinja template rendered with minijinja
//! (with Python string methods such as `.strip()` that Hugging Face templates
//! use), or a built-in ChatML / Llama-2 `[INST]` template when the image has none.

use crate::error::{Error, ErrorKind, Result};
use crate::vocab::Vocab;
use serde::Serialize;

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

/// A chat template ready to render.
pub struct ChatTemplate {
    source: String,
    bos_token: String,
    eos_token: String,
}

impl ChatTemplate {
    /// The image's template, or the built-in one that suits the vocabulary:
    /// ChatML when it has `<|im_start|>`, Llama-2 otherwise.
    pub fn new(template: Option<&str>, vocab: &Vocab) -> Self {
        let text = |id: Option<u32>| {
            id.map(|i| String::from_utf8_lossy(&vocab.tokens[i as usize]).into_owned()).unwrap_or_default()
        };
        let source = match template {
            Some(t) => t.to_string(),
            None if vocab.find("<|im_start|>").is_some() => CHATML.to_string(),
            None => LLAMA2.to_string(),
        };
        Self { source, bos_token: text(vocab.bos_id), eos_token: text(vocab.eos_id) }
    }

    /// The template text.
    pub fn source(&self) -> &str {
        &self.source
    }

    /// Renders `messages`; with `add_generation_prompt` the text ends where the
    /// assistant's reply begins. Control tokens appear as text (`<|im_start|>`)
    /// and are turned into their ids by encoding with special tokens parsed.
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::vocab::{PreTokenizer, TokenType, TokenizerKind};

    fn vocab(tokens: &[&str]) -> Vocab {
        Vocab {
            kind: TokenizerKind::SentencePiece,
            pre_tokenizer: PreTokenizer::None,
            tokens: tokens.iter().map(|t| t.as_bytes().to_vec()).collect(),
            scores: vec![0.0; tokens.len()],
            types: vec![TokenType::Normal; tokens.len()],
            merges: vec![],
            bos_id: Some(1),
            eos_id: Some(2),
            unk_id: Some(0),
            pad_id: None,
            eot_id: None,
            add_bos: true,
            add_eos: false,
            add_space_prefix: true,
        }
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
