//! `tokenizer.ggml.pre` → the normalizer and pre-tokenizer of the Hugging Face tokenizer.json
//! the GGUF was converted from.
//!
//! llama.cpp's converter names a byte-level BPE's pre-tokenizer by hashing the ids the
//! checkpoint's tokenizer gives a probe text; llama.cpp then re-implements each name's
//! regexes. We rebuild a tokenizer.json, so each name maps back to the pre-tokenizer (and
//! normalizer) the checkpoints behind that name ship, as `tokenizers` runs them. The ids
//! `tokenizers` gives with those checkpoints' own JSON are the reference
//! (tests/gguf_pretok.rs, fixtures from tools/make_pretok_fixtures.py).

use serde_json::{json, Value};

/// The names [`pre_tokenizer`] knows, as its error lists them.
pub(crate) const SUPPORTED: &str = "default, gpt2, gpt-2, olmo, mpt, smollm, refact, starcoder, \
     llama-bpe, llama3, llama-v3, smaug-bpe, dbrx, falcon3, glm4, qwen2, deepseek-llm, \
     deepseek-v3, gpt-4o";

/// (normalizer, pre_tokenizer) for a `tokenizer.ggml.pre` name (`None`: the key is absent,
/// GPT-2's split as llama.cpp defaults to), or `None` for a name we do not know.
pub(crate) fn pre_tokenizer(name: Option<&str>) -> Option<(Value, Value)> {
    let nfc = json!({"type": "NFC"});
    let byte_level = |regex: bool| {
        json!({"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": true,
               "use_regex": regex})
    };
    // A regex split (matches kept as pieces, as are the gaps between them) then bytes.
    let split = |patterns: &[&str], digits: bool| {
        let mut seq: Vec<Value> = patterns
            .iter()
            .map(|p| json!({"type": "Split", "pattern": {"Regex": p}, "behavior": "Isolated", "invert": false}))
            .collect();
        if digits {
            seq.push(json!({"type": "Digits", "individual_digits": true}));
        }
        seq.push(byte_level(false));
        json!({"type": "Sequence", "pretokenizers": seq})
    };
    Some(match name {
        // GPT-2's own split, inside ByteLevel.
        None | Some("default" | "gpt2" | "gpt-2") => (Value::Null, byte_level(true)),
        // GPT-NeoX-20B's tokenizer (OLMo, OLMoE, MPT): GPT-2's split after NFC.
        Some("olmo" | "mpt") => (nfc, byte_level(true)),
        // StarCoder's (SmolLM, Refact, Granite 3): digits one by one, then GPT-2's split.
        Some("smollm" | "refact" | "starcoder") => (
            Value::Null,
            json!({"type": "Sequence", "pretokenizers": [
                {"type": "Digits", "individual_digits": true}, byte_level(true)]}),
        ),
        // Llama 3's (and GLM-4.5's, which ships the same split).
        Some("llama3" | "llama-v3" | "llama-bpe" | "smaug-bpe" | "dbrx" | "falcon3" | "glm4") => {
            (Value::Null, split(&[LLAMA3_SPLIT], false))
        }
        // Qwen2/Qwen3 (and their MoEs): digits one at a time, NFC first.
        Some("qwen2") => (nfc, split(&[QWEN2_SPLIT], false)),
        // DeepSeek LLM and DeepSeek-V2: five splits, then digits one by one.
        Some("deepseek-llm") => (Value::Null, split(&DEEPSEEK_LLM_SPLITS, true)),
        Some("deepseek-v3") => (Value::Null, split(&DEEPSEEK_V3_SPLITS, false)),
        // o200k (GPT-4o, GPT-OSS): case-aware words with their contraction.
        Some("gpt-4o") => (Value::Null, split(&[GPT4O_SPLIT], false)),
        Some(_) => return None,
    })
}

/// Llama 3's split.
const LLAMA3_SPLIT: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";

/// Qwen2's: Llama 3's with single digits.
const QWEN2_SPLIT: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";

/// o200k's.
const GPT4O_SPLIT: &str = r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+(?i:'s|'t|'re|'ve|'m|'ll|'d)?|[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*(?i:'s|'t|'re|'ve|'m|'ll|'d)?|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+";

/// DeepSeek LLM's (V2's): newlines alone, cased-script letters, ASCII and full-width
/// punctuation, trailing spaces, CJK runs.
const DEEPSEEK_LLM_SPLITS: [&str; 5] = [
    "[\r\n]",
    "\\s?[A-Za-zµÀ-ÖØ-öø-ƺƼ-ƿǄ-ʓʕ-ʯͰ-ͳͶͷͻ-ͽͿΆΈ-ΊΌΎ-ΡΣ-ϵϷ-ҁҊ-ԯԱ-ՖႠ-ჅᎠ-Ᏽᏸ-ᏽᲐ-ᲺᲽ-Ჿᴀ-ᴫᵫ-ᵷᵹ-ᶚḀ-ἕἘ-Ἕἠ-ὅὈ-Ὅὐ-ὗὙὛὝὟ-\u{1F7D}ᾀ-ᾴᾶ-ᾼ\u{1FBE}ῂ-ῄῆ-ῌῐ-\u{1FD3}ῖ-\u{1FDB}ῠ-Ῥῲ-ῴῶ-ῼℂℇℊ-ℓℕℙ-ℝℤ\u{2126}ℨ\u{212A}-ℭℯ-ℴℹℼ-ℿⅅ-ⅉⅎↃↄⰀ-ⱻⱾ-ⳤⳫ-ⳮⳲⳳꙀ-ꙭꚀ-ꚛꜢ-ꝯꝱ-ꞇꞋ-ꞎꭰ-ꮿﬀ-ﬆﬓ-ﬗＡ-Ｚａ-ｚ𐐀-𐑏𐒰-𐓓𐓘-𐓻𐲀-𐲲𐳀-𐳲𑢠-𑣟𞤀-𞥃]+",
    r"\s?[!-/:-~！-／：-～‘-‟　-。]+",
    r"\s+$",
    "[一-龥ࠀ-一가-퟿]+",
];

/// DeepSeek-V3's: up to three digits, CJK and kana runs, then a word split on punctuation.
const DEEPSEEK_V3_SPLITS: [&str; 3] = [
    r"\p{N}{1,3}",
    "[一-龥぀-ゟ゠-ヿ]+",
    "[!\"#$%&'()*+,\\-./:;<=>?@\\[\\\\\\]^_`{|}~][A-Za-z]+|[^\r\n\\p{L}\\p{P}\\p{S}]?[\\p{L}\\p{M}]+| ?[\\p{P}\\p{S}]+[\r\n]*|\\s*[\r\n]+|\\s+(?!\\S)|\\s+",
];

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_listed_name_is_known_and_others_are_not() {
        for name in SUPPORTED.split(", ") {
            assert!(pre_tokenizer(Some(name)).is_some(), "{name}");
        }
        assert!(pre_tokenizer(None).is_some());
        assert!(pre_tokenizer(Some("tekken")).is_none());
    }
}
