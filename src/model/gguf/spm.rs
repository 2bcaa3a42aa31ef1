//! A SentencePiece BPE vocabulary (`tokenizer.ggml.model` = `llama`: Llama 2, Mistral,
//! Mixtral) rebuilt as those checkpoints' tokenizer.json: a BPE over `▁`-spelled text with
//! byte fallback (`<0x41>` tokens), and merges recovered from the scores as transformers
//! recovers them, since the file lists none: SentencePiece merges the adjacent pair whose joined
//! piece scores highest, so every split of a piece into two pieces is a merge ranked by the
//! joined piece's score.

use super::parse::Value;
use super::GgufFile;
use crate::error::Result;
use serde_json::{json, Map};
use std::cmp::Reverse;
use std::collections::HashMap;

impl GgufFile {
    pub(super) fn sentencepiece_bpe_json(&self) -> Result<String> {
        let tokens = self
            .strings("tokenizer.ggml.tokens")?
            .ok_or_else(|| self.key_error("tokenizer.ggml.tokens", "missing"))?;
        let scores: Vec<f32> = match self.get("tokenizer.ggml.scores") {
            Some(Value::Array(a)) if a.len() == tokens.len() => a
                .iter()
                .map(|v| v.as_f64().map(|x| x as f32))
                .collect::<Option<_>>()
                .ok_or_else(|| self.key_error("tokenizer.ggml.scores", "expected numbers"))?,
            _ => {
                return Err(self.key_error(
                    "tokenizer.ggml.scores",
                    format!("expected an array of {} numbers", tokens.len()),
                ))
            }
        };
        let types = self.token_types(tokens.len())?;
        let mut ids: HashMap<&str, usize> = HashMap::new();
        let mut vocab = Map::new();
        for (id, t) in tokens.iter().enumerate() {
            if !ids.contains_key(t) {
                ids.insert(t, id);
                vocab.insert(t.to_string(), json!(id));
            }
        }
        let merges: Vec<_> = merges_from_scores(&tokens, &scores, &ids)
            .into_iter()
            .map(|(l, r)| json!([tokens[l], tokens[r]]))
            .collect();
        // 2 = unknown, 3 = control (special); 4 = user-defined (matched whole, not special).
        let added: Vec<_> = tokens
            .iter()
            .zip(&types)
            .enumerate()
            .filter(|(_, (_, &ty))| matches!(ty, 2..=4))
            .map(|(id, (t, &ty))| {
                json!({"id": id, "content": t, "single_word": false, "lstrip": false,
                       "rstrip": false, "normalized": false, "special": ty != 4})
            })
            .collect();
        let unk = match self.token_id("tokenizer.ggml.unknown_token_id")? {
            Some(id) => Some(*tokens.get(id as usize).ok_or_else(|| {
                self.key_error("tokenizer.ggml.unknown_token_id", "past the vocabulary")
            })?),
            None => ids.contains_key("<unk>").then_some("<unk>"),
        };
        let space_prefix = self
            .get("tokenizer.ggml.add_space_prefix")
            .and_then(Value::as_bool)
            .unwrap_or(true);
        let mut decoders = vec![
            json!({"type": "Replace", "pattern": {"String": "▁"}, "content": " "}),
            json!({"type": "ByteFallback"}),
            json!({"type": "Fuse"}),
        ];
        if space_prefix {
            decoders.push(json!({"type": "Strip", "content": " ", "start": 1, "stop": 0}));
        }
        // As Llama 2's and Mixtral's tokenizer.json: the whole text one piece, `▁` first (even
        // before a leading space, as SentencePiece and llama.cpp do) and for every space.
        let mut normalizers = vec![];
        if space_prefix {
            normalizers.push(json!({"type": "Prepend", "prepend": "▁"}));
        }
        normalizers.push(json!({"type": "Replace", "pattern": {"String": " "}, "content": "▁"}));
        let tok = json!({
            "version": "1.0",
            "truncation": null,
            "padding": null,
            "added_tokens": added,
            "normalizer": {"type": "Sequence", "normalizers": normalizers},
            "pre_tokenizer": null,
            // llama.cpp and transformers put BOS first in a SentencePiece vocabulary that does
            // not say otherwise.
            "post_processor": self.bos_post_processor(&tokens, true)?,
            "decoder": {"type": "Sequence", "decoders": decoders},
            "model": {"type": "BPE", "dropout": null, "unk_token": unk,
                      "continuing_subword_prefix": null, "end_of_word_suffix": null,
                      "fuse_unk": true, "byte_fallback": true, "ignore_merges": false,
                      "vocab": vocab, "merges": merges},
        });
        Ok(tok.to_string())
    }
}

/// Every split of a token into two tokens, best joined score first; among equal scores the
/// longer left part, then the longer right part, then vocabulary order (as transformers orders
/// them, so that the two tokenizers agree on ties too).
fn merges_from_scores(
    tokens: &[&str],
    scores: &[f32],
    ids: &HashMap<&str, usize>,
) -> Vec<(usize, usize)> {
    let mut merges = vec![];
    for (id, t) in tokens.iter().enumerate() {
        if ids.get(t) != Some(&id) {
            continue; // a repeated token: its first id stands for it
        }
        let mut local: Vec<(usize, usize)> = t
            .char_indices()
            .skip(1)
            .filter_map(|(at, _)| Some((*ids.get(&t[..at])?, *ids.get(&t[at..])?)))
            .collect();
        local.sort();
        merges.extend(local.into_iter().map(|(l, r)| (l, r, scores[id])));
    }
    let chars = |i: usize| tokens[i].chars().count();
    // A stable sort: equal keys keep the order above.
    merges.sort_by(|a, b| {
        (Reverse(a.2), Reverse(chars(a.0)), Reverse(chars(a.1)))
            .partial_cmp(&(Reverse(b.2), Reverse(chars(b.0)), Reverse(chars(b.1))))
            .unwrap_or(std::cmp::Ordering::Equal)
    });
    merges.into_iter().map(|(l, r, _)| (l, r)).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn merges_follow_the_joined_scores() {
        let tokens = ["a", "b", "c", "ab", "bc", "abc"];
        let scores = [0.0, 0.0, 0.0, -2.0, -1.0, -3.0];
        let ids: HashMap<&str, usize> = tokens.iter().enumerate().map(|(i, t)| (*t, i)).collect();
        let m = merges_from_scores(&tokens, &scores, &ids);
        // bc (-1) before ab (-2) before the two ways to abc (-3), longer left part first.
        assert_eq!(m, [(1, 2), (0, 1), (3, 2), (0, 4)]);
    }
}
