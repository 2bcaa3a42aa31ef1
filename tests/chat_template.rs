//! Chat templates rendered by edgemoe (minijinja) against transformers' `apply_chat_template`
//! on the same templates and conversations (tests/fixtures/chat/*.json, written by
//! tools/chat_template_reference.py): SmolLM2-135M-Instruct's real template, a stress template,
//! and the real templates of the MoE families (Qwen3, GPT-OSS, DeepSeek-V2 and V3.1, GLM-4.6,
//! Granite 3.0 and 3.3, OLMoE) over tools, documents, reasoning fields and template variables.
//! The prompts must be identical, byte for byte; where transformers raises, edgemoe must fail
//! with the template's message. Also: the template a GGUF, a checkpoint directory and a
//! quantized `.emoe` carry is the one used; broken templates and odd messages never panic; a
//! long conversation fits the render's fuel.

use edgemoe::serve::chat::{ChatInputs, ChatTemplate};
use serde_json::Value;
use std::path::PathBuf;

fn dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/chat")
}

fn read_json(name: &str) -> Value {
    serde_json::from_slice(&std::fs::read(dir().join(name)).unwrap()).unwrap()
}

fn fixture() -> Value {
    read_json("smollm2.json")
}

/// Renders every case as the fixture gives it and compares with transformers' string.
fn check(t: &ChatTemplate, cases: &[Value], name: &str) {
    for (i, case) in cases.iter().enumerate() {
        let messages = case["messages"].as_array().unwrap();
        let gen = case["add_generation_prompt"].as_bool().unwrap();
        let inputs = ChatInputs {
            tools: case["tools"].as_array().map(Vec::as_slice),
            documents: case["documents"].as_array().map(Vec::as_slice),
            kwargs: case["kwargs"].as_object(),
        };
        if !case["error"].is_null() {
            // transformers raised: edgemoe must fail too, with the template's own message.
            let err = match t.render_with(messages, gen, inputs) {
                Ok(p) => panic!("{name} case {i}: rendered {p:?}, transformers raised"),
                Err(e) => e.to_string(),
            };
            assert!(
                err.contains("the chat template failed"),
                "{name} case {i}: {err}"
            );
            if let Some(msg) = case["error"]["message"].as_str() {
                assert!(err.ends_with(msg), "{name} case {i}: {err}");
            }
            continue;
        }
        let got = t
            .render_with(messages, gen, inputs)
            .unwrap_or_else(|e| panic!("{name} case {i}: {e}"));
        let want = case["expected"].as_str().unwrap();
        if got != want {
            let at = got
                .bytes()
                .zip(want.bytes())
                .position(|(a, b)| a != b)
                .unwrap_or(got.len().min(want.len()));
            let from = at.saturating_sub(80);
            panic!(
                "{name} case {i} differs at byte {at}:\n got: {:?}\nwant: {:?}",
                got.get(from..(at + 80).min(got.len())).unwrap_or(&got),
                want.get(from..(at + 80).min(want.len())).unwrap_or(want),
            );
        }
    }
}

/// The families' templates, each with the cases its features call for.
const FAMILIES: [&str; 8] = [
    "qwen3",
    "gpt-oss",
    "deepseek-v3.1",
    "deepseek-v2",
    "glm-4.6",
    "granite-3.0",
    "granite-3.3",
    "olmoe",
];

fn family(name: &str) -> (ChatTemplate, Value) {
    let f = read_json(&format!("{name}.json"));
    let source = std::fs::read_to_string(dir().join(f["template"].as_str().unwrap())).unwrap();
    let token = |k: &str| f[k].as_str().unwrap_or("").to_string();
    let mut t = ChatTemplate::new(&source, &token("bos_token"), &token("eos_token")).unwrap();
    t.fix_clock(f["now_unix"].as_i64().unwrap());
    (t, f)
}

#[test]
fn family_templates_match_transformers() {
    let (mut total, mut refused) = (0, 0);
    for name in FAMILIES {
        let (t, f) = family(name);
        let cases = f["cases"].as_array().unwrap();
        assert!(cases.len() >= 6, "{name}: {} cases", cases.len());
        check(&t, cases, name);
        total += cases.len();
        refused += cases.iter().filter(|c| !c["error"].is_null()).count();
    }
    eprintln!("{total} family cases match transformers ({refused} of them refusals)");
}

#[test]
fn rendering_matches_transformers() {
    let f = fixture();
    let (bos, eos) = (
        f["bos_token"].as_str().unwrap(),
        f["eos_token"].as_str().unwrap(),
    );
    let templates = f["templates"].as_array().unwrap();
    assert_eq!(templates.len(), 2);
    for t in templates {
        let name = t["name"].as_str().unwrap();
        let tmpl = ChatTemplate::new(t["template"].as_str().unwrap(), bos, eos).unwrap();
        check(&tmpl, t["cases"].as_array().unwrap(), name);
    }
}

/// The template and special tokens read from the real GGUF render the same prompts (skipped
/// where the model is not fetched: tools/fetch_smollm2.sh).
#[test]
fn smollm2_gguf_template_is_read_and_matches() {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("target/models/SmolLM2-135M-Instruct.Q4_1.gguf");
    if !path.exists() {
        eprintln!("skipped: {} not fetched", path.display());
        return;
    }
    let tokenizer = edgemoe::model::gguf::GgufFile::open(&path)
        .unwrap()
        .tokenizer()
        .unwrap();
    let t = ChatTemplate::for_model(&path, &tokenizer)
        .unwrap()
        .expect("the SmolLM2 GGUF carries a chat template");
    let f = fixture();
    check(
        &t,
        f["templates"][0]["cases"].as_array().unwrap(),
        "smollm2 (gguf)",
    );
}

#[test]
fn template_errors_are_clear() {
    let err = ChatTemplate::new("{% for %}", "", "")
        .err()
        .unwrap()
        .to_string();
    assert!(err.contains("chat template does not compile"), "{err}");
    let t = ChatTemplate::new("{{ raise_exception('roles must alternate') }}", "", "").unwrap();
    let err = t.render(&[], true).unwrap_err().to_string();
    assert!(err.contains("roles must alternate"), "{err}");
}

/// A GGUF string key/value as the format writes it: key, type 8 (string), value.
fn gguf_string_kv(key: &str, value: &str, out: &mut Vec<u8>) {
    out.extend((key.len() as u64).to_le_bytes());
    out.extend(key.as_bytes());
    out.extend(8u32.to_le_bytes());
    out.extend((value.len() as u64).to_le_bytes());
    out.extend(value.as_bytes());
}

/// `src` with `tokenizer.chat_template` = `template` added as its first key. A padding key
/// keeps the insertion a multiple of the 32-byte alignment, so the data section (its offsets
/// relative to its start) moves whole and stays aligned.
fn with_chat_template(src: &[u8], template: &str) -> Vec<u8> {
    assert_eq!(&src[..4], b"GGUF");
    let mut kv = Vec::new();
    gguf_string_kv("tokenizer.chat_template", template, &mut kv);
    let pad_key = "edgemoe.test.pad";
    let bare = 8 + pad_key.len() + 4 + 8;
    let pad = (32 - (kv.len() + bare) % 32) % 32;
    gguf_string_kv(pad_key, &" ".repeat(pad), &mut kv);
    assert_eq!(kv.len() % 32, 0);
    let n_kv = u64::from_le_bytes(src[16..24].try_into().unwrap());
    let mut out = src[..16].to_vec();
    out.extend((n_kv + 2).to_le_bytes());
    out.extend(kv);
    out.extend(&src[24..]);
    out
}

/// `ChatTemplate::for_model` on a GGUF takes the template from `tokenizer.chat_template` and
/// bos/eos from the token ids, and renders Qwen3's cases as transformers does; the same file
/// without the key has no template.
#[test]
fn gguf_template_is_the_one_used() {
    let src = std::fs::read(
        PathBuf::from(env!("CARGO_MANIFEST_DIR"))
            .join("tests/fixtures/qwen3moe-tiny/qwen3moe-tiny.gguf"),
    )
    .unwrap();
    let source = std::fs::read_to_string(dir().join("qwen3.jinja")).unwrap();
    let tmp = tempfile::tempdir().unwrap();
    let path = tmp.path().join("qwen3-chat.gguf");
    std::fs::write(&path, with_chat_template(&src, &source)).unwrap();
    let file = edgemoe::model::gguf::GgufFile::open(&path).unwrap();
    let tokenizer = file.tokenizer().unwrap();
    let mut t = ChatTemplate::for_model(&path, &tokenizer)
        .unwrap()
        .expect("the GGUF carries a chat template");
    let f = read_json("qwen3.json");
    t.fix_clock(f["now_unix"].as_i64().unwrap());
    check(&t, f["cases"].as_array().unwrap(), "qwen3 (gguf)");
    // bos/eos come from the ids: a template printing them shows the tokens' text.
    let eos_id = file
        .get("tokenizer.ggml.eos_token_id")
        .unwrap()
        .as_u64()
        .unwrap();
    let eos = tokenizer.token_text(eos_id as u32).unwrap();
    let probe = with_chat_template(&src, "[{{ eos_token }}]");
    std::fs::write(&path, probe).unwrap();
    let t = ChatTemplate::for_model(&path, &tokenizer).unwrap().unwrap();
    assert_eq!(t.render(&[], false).unwrap(), format!("[{eos}]"));
    // The fixture itself carries none.
    let bare = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/qwen3moe-tiny/qwen3moe-tiny.gguf");
    assert!(ChatTemplate::for_model(&bare, &tokenizer)
        .unwrap()
        .is_none());
}

/// A checkpoint directory: `chat_template.jinja` wins over `tokenizer_config.json`'s entry (as
/// in transformers), whose special tokens (strings or AddedToken objects) are used either way.
#[test]
fn checkpoint_dir_template_and_tokens() {
    let tmp = tempfile::tempdir().unwrap();
    let cfg = serde_json::json!({
        "chat_template": "config:{{ bos_token }}{{ eos_token }}",
        "bos_token": {"content": "<s>", "special": true},
        "eos_token": "</s>",
    });
    std::fs::write(tmp.path().join("tokenizer_config.json"), cfg.to_string()).unwrap();
    let src = std::fs::read(
        PathBuf::from(env!("CARGO_MANIFEST_DIR"))
            .join("tests/fixtures/qwen3moe-tiny/qwen3moe-tiny.gguf"),
    )
    .unwrap();
    let gguf = tmp.path().join("t.gguf");
    std::fs::write(&gguf, &src).unwrap();
    let tokenizer = edgemoe::model::gguf::GgufFile::open(&gguf)
        .unwrap()
        .tokenizer()
        .unwrap();
    let render = || {
        ChatTemplate::for_model(tmp.path(), &tokenizer)
            .unwrap()
            .unwrap()
            .render(&[], false)
            .unwrap()
    };
    assert_eq!(render(), "config:<s></s>");
    std::fs::write(
        tmp.path().join("chat_template.jinja"),
        "file:{{ bos_token }}",
    )
    .unwrap();
    assert_eq!(render(), "file:<s>");
}

/// Broken templates and odd conversations end in `Ok` or one `Err`, never a panic: seeded
/// mutations (cuts, deleted and repeated spans, stray delimiters) of every family's template,
/// each compiled and rendered over the fixture's first conversations and over malformed
/// messages (no role, numbers, nested lists, nulls).
#[test]
fn mutated_templates_and_odd_messages_never_panic() {
    use edgemoe::util::rng::SplitMix64;
    use serde_json::json;
    let odd = vec![
        json!({"content": "no role"}),
        json!({"role": "user", "content": 42}),
        json!({"role": "assistant", "content": [[1, {"a": null}]], "tool_calls": "x"}),
        json!({"role": "tool", "content": null, "reasoning": ["r"]}),
        json!({"role": "user"}),
    ];
    let mut rng = SplitMix64::new(27);
    let (mut compiled, mut rendered, mut failed) = (0, 0, 0);
    for name in FAMILIES {
        let (_, f) = family(name);
        let source = std::fs::read_to_string(dir().join(f["template"].as_str().unwrap())).unwrap();
        let cases = f["cases"].as_array().unwrap();
        let chars: Vec<char> = source.chars().collect();
        for _ in 0..150 {
            let mut c = chars.clone();
            for _ in 0..1 + rng.next_u64() % 3 {
                let n = c.len().max(1);
                let at = (rng.next_u64() as usize) % n;
                let len = 1 + (rng.next_u64() as usize) % 40;
                match rng.next_u64() % 4 {
                    0 => c.truncate(at),
                    1 => drop(c.drain(at..(at + len).min(c.len()))),
                    2 => {
                        let span: Vec<char> = c[at..(at + len).min(c.len())].to_vec();
                        c.splice(at..at, span);
                    }
                    _ => {
                        let stray = ["{%", "%}", "{{", "}}", "{#", "(", "]", "'", "-"];
                        let s = stray[(rng.next_u64() as usize) % stray.len()];
                        c.splice(at..at, s.chars());
                    }
                }
            }
            let mutated: String = c.into_iter().collect();
            let outcome = std::panic::catch_unwind(|| {
                let Ok(mut t) = ChatTemplate::new(&mutated, "<s>", "</s>") else {
                    return (0, 0, 1);
                };
                t.fix_clock(0);
                let (mut ok, mut err) = (0, 0);
                let convs = cases
                    .iter()
                    .take(4)
                    .map(|c| c["messages"].as_array().unwrap());
                for msgs in convs.chain(std::iter::once(&odd)) {
                    match t.render(msgs, true) {
                        Ok(_) => ok += 1,
                        Err(e) => {
                            assert!(!e.to_string().is_empty());
                            err += 1
                        }
                    }
                }
                (1, ok, err)
            });
            let (c, r, e) = outcome.unwrap_or_else(|_| panic!("{name}: panicked on {mutated:?}"));
            compiled += c;
            rendered += r;
            failed += e;
        }
        // The unmutated template on odd messages: an answer either way.
        let (t, _) = family(name);
        let _ = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| t.render(&odd, false)))
            .unwrap_or_else(|_| panic!("{name}: panicked on odd messages"));
    }
    eprintln!("{compiled} mutated templates compiled, {rendered} renders, {failed} errors");
    assert!(compiled > 100 && rendered > 100 && failed > 100);
}

/// `quantize` keeps the source's chat template in the `.emoe` header, from a checkpoint
/// directory (its `chat_template.jinja`) and from a GGUF (`tokenizer.chat_template`), and
/// `for_model` on the store renders Qwen3's cases as transformers does; a source without one
/// gives a store without one.
#[test]
fn quantized_store_keeps_the_template() {
    let fixture = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/qwen3moe-tiny");
    let source = std::fs::read_to_string(dir().join("qwen3.jinja")).unwrap();
    let tmp = tempfile::tempdir().unwrap();
    let ckpt = tmp.path().join("ckpt");
    std::fs::create_dir(&ckpt).unwrap();
    for f in [
        "config.json",
        "model.safetensors",
        "tokenizer.json",
        "generation_config.json",
    ] {
        std::fs::copy(fixture.join(f), ckpt.join(f)).unwrap();
    }
    std::fs::write(ckpt.join("chat_template.jinja"), &source).unwrap();
    let gguf = tmp.path().join("chat.gguf");
    let src = std::fs::read(fixture.join("qwen3moe-tiny.gguf")).unwrap();
    std::fs::write(&gguf, with_chat_template(&src, &source)).unwrap();
    let f = read_json("qwen3.json");
    let quantize = |model: &std::path::Path, out: &str| {
        let out = tmp.path().join(out);
        let st = std::process::Command::new(env!("CARGO_BIN_EXE_edgemoe"))
            .args(["quantize", "--method", "rtn", "--model"])
            .arg(model)
            .arg("--out")
            .arg(&out)
            .stdout(std::process::Stdio::null())
            .status()
            .unwrap();
        assert!(st.success(), "quantize {}", model.display());
        out
    };
    for (model, out) in [(&ckpt, "dir.emoe"), (&gguf, "gguf.emoe")] {
        let store = quantize(model, out);
        let file = edgemoe::model::emoe::EmoeFile::open(&store).unwrap();
        assert_eq!(file.chat_template(), Some(source.as_str()), "{out}");
        let tokenizer = edgemoe::Model::load(&store).unwrap().tokenizer;
        let mut t = ChatTemplate::for_model(&store, &tokenizer)
            .unwrap()
            .unwrap();
        t.fix_clock(f["now_unix"].as_i64().unwrap());
        check(&t, f["cases"].as_array().unwrap(), out);
    }
    let bare = quantize(&fixture.join("qwen3moe-tiny.gguf"), "bare.emoe");
    let tokenizer = edgemoe::Model::load(&bare).unwrap().tokenizer;
    assert!(ChatTemplate::for_model(&bare, &tokenizer)
        .unwrap()
        .is_none());
}

/// A long real conversation stays inside the render's fuel allowance on the heaviest template
/// (GPT-OSS renders each tool schema as TypeScript): 32 rich tools and 2000 messages.
#[test]
fn long_conversations_fit_the_fuel_allowance() {
    let (t, f) = family("gpt-oss");
    let case = f["cases"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| {
            c["tools"]
                .as_array()
                .is_some_and(|t| t[0]["function"]["name"] == "book_trip")
        })
        .unwrap();
    let tools: Vec<Value> = (0..32).map(|_| case["tools"][0].clone()).collect();
    let mut messages = Vec::new();
    for i in 0..1000 {
        messages.push(serde_json::json!({"role": "user", "content": format!("question {i}")}));
        messages.push(serde_json::json!({"role": "assistant", "content": format!("answer {i}")}));
    }
    let started = std::time::Instant::now();
    let inputs = ChatInputs {
        tools: Some(&tools),
        ..Default::default()
    };
    let prompt = t.render_with(&messages, true, inputs).unwrap();
    assert!(prompt.contains("answer 999") && prompt.matches("type book_trip").count() == 32);
    eprintln!("{} bytes in {:?}", prompt.len(), started.elapsed());
}
