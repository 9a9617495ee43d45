//! The text side of a model: a Hugging Face `tokenizers` tokenizer (loaded from `tokenizer.json`
//! or rebuilt from GGUF metadata), its special tokens, and the chat template rendered by
//! minijinja exactly as transformers' `apply_chat_template` does.

use anyhow::Context;
use serde::Serialize;
use tokenizers::Tokenizer;

#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct ChatMessage {
    pub role: String,
    pub content: String,
}

impl ChatMessage {
    pub fn new(role: &str, content: impl Into<String>) -> Self {
        ChatMessage { role: role.to_string(), content: content.into() }
    }
}

/// A token's bytes in the encoded text, `(start, end)`.
pub type ByteRange = (usize, usize);

pub struct TextTokenizer {
    inner: Tokenizer,
    /// Token ids that end a generation.
    pub eos_ids: Vec<u32>,
    pub bos_token: Option<String>,
    pub eos_token: Option<String>,
    /// The Jinja chat template, if the model has one.
    pub chat_template: Option<String>,
}

impl TextTokenizer {
    pub fn new(
        inner: Tokenizer,
        eos_ids: Vec<u32>,
        bos_token: Option<String>,
        eos_token: Option<String>,
        chat_template: Option<String>,
    ) -> Self {
        TextTokenizer { inner, eos_ids, bos_token, eos_token, chat_template }
    }

    pub fn inner(&self) -> &Tokenizer {
        &self.inner
    }

    pub fn vocab_size(&self) -> usize {
        self.inner.get_vocab_size(true)
    }

    /// Adds `token` as one new, non-special token (it decodes as its text), with the next id.
    pub fn add_token(&mut self, token: &str) -> anyhow::Result<u32> {
        self.inner.add_tokens([tokenizers::AddedToken::from(token, false)]).map_err(|e| anyhow::anyhow!("tokenizer: {e}"))?;
        self.token_id(token).with_context(|| format!("the tokenizer did not take the token {token}"))
    }

    /// Token ids of `text`. Special tokens written in the text (`<|im_start|>`) are recognised;
    /// `add_special` adds what the model adds by default (a BOS for Llama, nothing for SmolLM2).
    pub fn encode(&self, text: &str, add_special: bool) -> anyhow::Result<Vec<u32>> {
        let enc = self.inner.encode(text, add_special).map_err(|e| anyhow::anyhow!("tokenizer: {e}"))?;
        Ok(enc.get_ids().to_vec())
    }

    /// Token ids of `text` (no special tokens added) with each token's byte range in `text`.
    pub fn encode_with_offsets(&self, text: &str) -> anyhow::Result<(Vec<u32>, Vec<ByteRange>)> {
        let enc = self.inner.encode(text, false).map_err(|e| anyhow::anyhow!("tokenizer: {e}"))?;
        Ok((enc.get_ids().to_vec(), enc.get_offsets().to_vec()))
    }

    /// Text of `ids`; special tokens are dropped when `skip_special`.
    pub fn decode(&self, ids: &[u32], skip_special: bool) -> anyhow::Result<String> {
        self.inner.decode(ids, skip_special).map_err(|e| anyhow::anyhow!("tokenizer: {e}"))
    }

    pub fn token_to_string(&self, id: u32) -> Option<String> {
        self.inner.id_to_token(id)
    }

    pub fn token_id(&self, token: &str) -> Option<u32> {
        self.inner.token_to_id(token)
    }

    /// Renders `messages` through the chat template, ending with the assistant's turn opener
    /// when `add_generation_prompt`.
    pub fn apply_chat_template(&self, messages: &[ChatMessage], add_generation_prompt: bool) -> anyhow::Result<String> {
        let template = self.chat_template.as_deref().context("this model has no chat template")?;
        render_chat_template(template, messages, add_generation_prompt, self.bos_token.as_deref(), self.eos_token.as_deref())
    }
}

/// Renders a Hugging Face chat template with the variables transformers provides.
pub fn render_chat_template(
    template: &str,
    messages: &[ChatMessage],
    add_generation_prompt: bool,
    bos_token: Option<&str>,
    eos_token: Option<&str>,
) -> anyhow::Result<String> {
    let mut env = minijinja::Environment::new();
    // Python-style string methods (.strip(), .startswith(), ...) that HF templates use.
    env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
    env.add_function("raise_exception", |msg: String| -> Result<String, minijinja::Error> {
        Err(minijinja::Error::new(minijinja::ErrorKind::InvalidOperation, msg))
    });
    // transformers renders with trim_blocks and lstrip_blocks.
    env.set_trim_blocks(true);
    env.set_lstrip_blocks(true);
    env.add_template("chat", template).context("the model's chat template does not parse")?;
    let ctx = minijinja::context! {
        messages => messages,
        add_generation_prompt => add_generation_prompt,
        bos_token => bos_token.unwrap_or(""),
        eos_token => eos_token.unwrap_or(""),
    };
    env.get_template("chat")?.render(ctx).context("rendering the chat template failed")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chatml_template_renders_like_transformers() {
        let template = "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}{{ '<|im_start|>system\nYou are helpful<|im_end|>\n' }}{% endif %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}";
        let out = render_chat_template(template, &[ChatMessage::new("user", "hi")], true, None, None).unwrap();
        assert_eq!(out, "<|im_start|>system\nYou are helpful<|im_end|>\n<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n");
    }

    #[test]
    fn raise_exception_is_an_error() {
        let err = render_chat_template("{{ raise_exception('no system role') }}", &[], false, None, None);
        assert!(format!("{:#}", err.unwrap_err()).contains("no system role"));
    }
}
