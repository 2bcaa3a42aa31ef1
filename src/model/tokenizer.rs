//! Tokenizers: a checkpoint's tokenizer.json through the `tokenizers` crate, or the byte-level
//! tokenizer of the built-in default model. Streaming decode never splits a UTF-8 character.

use crate::error::{Error, Result};
use std::path::{Path, PathBuf};

pub enum Tokenizer {
    Hf(Box<tokenizers::Tokenizer>),
    /// Token i < 256 is byte i; then BOS and EOS.
    Bytes,
}

pub const BYTE_BOS: u32 = 256;
pub const BYTE_EOS: u32 = 257;
pub const BYTE_VOCAB: usize = 258;

impl Tokenizer {
    pub fn from_file(path: &Path) -> Result<Tokenizer> {
        let bytes = std::fs::read(path).map_err(|e| Error::Tokenizer {
            path: path.to_path_buf(),
            reason: format!("cannot read: {e}"),
        })?;
        Self::from_json_bytes(&bytes, path)
    }

    pub fn from_json_bytes(bytes: &[u8], origin: &Path) -> Result<Tokenizer> {
        let tok = tokenizers::Tokenizer::from_bytes(bytes).map_err(|e| Error::Tokenizer {
            path: origin.to_path_buf(),
            reason: format!("not a valid tokenizer.json: {e}"),
        })?;
        Ok(Tokenizer::Hf(Box::new(tok)))
    }

    /// Token ids for `text`; `special` adds what the tokenizer's post-processor adds (e.g. BOS).
    pub fn encode(&self, text: &str, special: bool) -> Result<Vec<u32>> {
        match self {
            Tokenizer::Hf(t) => t
                .encode(text, special)
                .map(|e| e.get_ids().to_vec())
                .map_err(|e| Error::Tokenizer {
                    path: PathBuf::from("tokenizer.json"),
                    reason: format!("encode failed: {e}"),
                }),
            Tokenizer::Bytes => Ok(text.bytes().map(u32::from).collect()),
        }
    }

    /// Text of `ids` with special tokens skipped; invalid UTF-8 becomes U+FFFD.
    pub fn decode(&self, ids: &[u32]) -> String {
        match self {
            Tokenizer::Hf(t) => t.decode(ids, true).unwrap_or_default(),
            Tokenizer::Bytes => {
                let bytes: Vec<u8> = ids.iter().filter(|&&i| i < 256).map(|&i| i as u8).collect();
                String::from_utf8_lossy(&bytes).into_owned()
            }
        }
    }

    pub fn vocab_size(&self) -> usize {
        match self {
            Tokenizer::Hf(t) => t.get_vocab_size(true),
            Tokenizer::Bytes => BYTE_VOCAB,
        }
    }

    pub fn token_text(&self, id: u32) -> Option<String> {
        match self {
            Tokenizer::Hf(t) => t.id_to_token(id),
            Tokenizer::Bytes => (id < 256).then(|| format!("<0x{id:02X}>")),
        }
    }
}

/// Turns a growing list of token ids into text pieces, holding back any incomplete character.
///
/// Following the prefix/read-offset scheme: decode a short window before and after the newest
/// tokens and emit the difference only when it does not end in a replacement character.
#[derive(Default)]
pub struct StreamDecoder {
    ids: Vec<u32>,
    prefix_offset: usize,
    read_offset: usize,
}

impl StreamDecoder {
    pub fn new() -> Self {
        Self::default()
    }

    /// Starts after `context` (the prompt's last tokens), so the first generated token decodes
    /// as a continuation: SentencePiece-style decoders strip a leading space from a lone token.
    pub fn with_context(context: &[u32]) -> Self {
        let tail = &context[context.len().saturating_sub(5)..];
        StreamDecoder {
            ids: tail.to_vec(),
            prefix_offset: 0,
            read_offset: tail.len(),
        }
    }

    /// Adds a token; returns the newly completed text, possibly empty.
    pub fn push(&mut self, tok: &Tokenizer, id: u32) -> String {
        self.ids.push(id);
        let prefix = tok.decode(&self.ids[self.prefix_offset..self.read_offset]);
        let full = tok.decode(&self.ids[self.prefix_offset..]);
        if full.len() > prefix.len()
            && !full.ends_with('\u{FFFD}')
            && full.is_char_boundary(prefix.len())
        {
            let piece = full[prefix.len()..].to_string();
            self.prefix_offset = self.read_offset;
            self.read_offset = self.ids.len();
            piece
        } else {
            String::new()
        }
    }

    /// Whatever is still held back (an incomplete character at the end becomes U+FFFD).
    pub fn finish(&mut self, tok: &Tokenizer) -> String {
        let prefix = tok.decode(&self.ids[self.prefix_offset..self.read_offset]);
        let full = tok.decode(&self.ids[self.prefix_offset..]);
        self.prefix_offset = self.ids.len();
        self.read_offset = self.ids.len();
        if full.len() > prefix.len() && full.is_char_boundary(prefix.len()) {
            full[prefix.len()..].to_string()
        } else {
            String::new()
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn byte_stream_never_splits_characters() {
        let tok = Tokenizer::Bytes;
        let text = "héllo, 世界 🎉!";
        let mut dec = StreamDecoder::new();
        let mut out = String::new();
        for id in tok.encode(text, false).unwrap() {
            let piece = dec.push(&tok, id);
            assert!(!piece.contains('\u{FFFD}'));
            out.push_str(&piece);
        }
        out.push_str(&dec.finish(&tok));
        assert_eq!(out, text);
    }

    /// A SentencePiece-style tokenizer: Metaspace pre-tokenizer and decoder, which drops the
    /// leading space of the first token it decodes.
    fn metaspace_tokenizer() -> Tokenizer {
        let json = r#"{
            "version": "1.0", "truncation": null, "padding": null, "added_tokens": [],
            "normalizer": null, "post_processor": null,
            "pre_tokenizer": {"type": "Metaspace", "replacement": "▁", "prepend_scheme": "always", "split": true},
            "decoder": {"type": "Metaspace", "replacement": "▁", "prepend_scheme": "always", "split": true},
            "model": {"type": "WordLevel", "unk_token": "<unk>",
                      "vocab": {"<unk>": 0, "▁Hello": 1, "▁world": 2, "▁again": 3}}
        }"#;
        Tokenizer::from_json_bytes(json.as_bytes(), Path::new("test")).unwrap()
    }

    #[test]
    fn continuation_keeps_the_leading_space_of_sentencepiece_tokens() {
        let tok = metaspace_tokenizer();
        let prompt = tok.encode("Hello", false).unwrap();
        assert_eq!(prompt, vec![1]);
        // Decoded alone, the first generated token loses its space ...
        assert_eq!(StreamDecoder::new().push(&tok, 2), "world");
        // ... after the prompt as context it keeps it, and the text matches a full decode.
        let mut dec = StreamDecoder::with_context(&prompt);
        let mut out = dec.push(&tok, 2);
        out.push_str(&dec.push(&tok, 3));
        out.push_str(&dec.finish(&tok));
        assert_eq!(out, " world again");
        assert_eq!(tok.decode(&[1, 2, 3]), format!("Hello{out}"));
    }

    #[test]
    fn invalid_bytes_become_replacement_at_finish() {
        let tok = Tokenizer::Bytes;
        let mut dec = StreamDecoder::new();
        let mut out = dec.push(&tok, b'a' as u32);
        out.push_str(&dec.push(&tok, 0xE4));
        out.push_str(&dec.finish(&tok));
        assert_eq!(out, "a\u{FFFD}");
    }
}
