//! Tokenizer and chat-template parity with transformers: every `tests/fixtures/*/expected.json`
//! written by `tools/oracle/make_text_fixtures.py`.

use std::path::{Path, PathBuf};

use kiln_models::tokenizer::{ChatMessage, HfTokenizer};
use minijinja::Value;
use serde::Deserialize;

#[derive(Deserialize)]
struct Expected {
    model: String,
    prompts: Vec<Prompt>,
    chat: Vec<Chat>,
}

#[derive(Deserialize)]
struct Prompt {
    text: String,
    ids: Vec<u32>,
    greedy: Vec<u32>,
    greedy_text: String,
}

#[derive(Deserialize)]
struct Chat {
    /// Plain `{role, content}` messages, or (with `tools`) tool calls and tool responses.
    messages: Vec<serde_json::Value>,
    #[serde(default)]
    tools: Option<serde_json::Value>,
    add_generation_prompt: bool,
    text: String,
    ids: Vec<u32>,
}

const FIXTURES: [&str; 3] = ["qwen2-tied-gqa", "qwen2-untied-mha", "llama-tiny"];

fn fixture_dir(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures").join(name)
}

fn load(name: &str) -> (HfTokenizer, Expected) {
    let dir = fixture_dir(name);
    let tok = HfTokenizer::load(&dir).unwrap_or_else(|e| panic!("{name}: {e}"));
    let text = std::fs::read_to_string(dir.join("expected.json")).unwrap();
    let expected: Expected = serde_json::from_str(&text).unwrap();
    assert_eq!(expected.model, name);
    (tok, expected)
}

#[test]
fn chat_templates_render_like_transformers() {
    for name in FIXTURES {
        let (tok, expected) = load(name);
        assert!(tok.has_chat_template(), "{name}");
        assert!(expected.chat.len() >= 4, "{name}");
        if name.starts_with("qwen2") {
            assert!(expected.chat.iter().any(|c| c.tools.is_some()), "{name}: a tools case");
        }
        for (i, case) in expected.chat.iter().enumerate() {
            let rendered = match &case.tools {
                None => {
                    let messages: Vec<ChatMessage> =
                        case.messages.iter().map(|m| serde_json::from_value(m.clone()).unwrap()).collect();
                    tok.apply_chat_template(&messages, case.add_generation_prompt)
                }
                Some(tools) => tok.render_chat_template(
                    Value::from_serialize(&case.messages),
                    Some(Value::from_serialize(tools)),
                    case.add_generation_prompt,
                ),
            };
            let text = rendered.unwrap_or_else(|e| panic!("{name} chat {i}: {e}"));
            assert_eq!(text, case.text, "{name} chat {i}: rendering differs");
            let ids = tok.encode(&case.text, false).unwrap();
            assert_eq!(ids, case.ids, "{name} chat {i}: ids differ");
        }
    }
}

#[test]
fn default_system_prompts() {
    let (qwen, _) = load("qwen2-tied-gqa");
    let (llama, _) = load("llama-tiny");
    let msgs = vec![ChatMessage { role: "user".into(), content: "Hi".into() }];
    assert_eq!(
        qwen.apply_chat_template(&msgs, true).unwrap(),
        "<|im_start|>system\nYou are Qwen, created by Alibaba Cloud. You are a helpful assistant.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"
    );
    assert_eq!(
        llama.apply_chat_template(&msgs, false).unwrap(),
        "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n"
    );
}

#[test]
fn prompts_encode_and_decode_like_transformers() {
    for name in FIXTURES {
        let (tok, expected) = load(name);
        for (i, p) in expected.prompts.iter().enumerate() {
            let ids = tok.encode(&p.text, false).unwrap();
            assert_eq!(ids, p.ids, "{name} prompt {i}: ids differ");
            // The post-processor adds nothing for these tokenizers.
            assert_eq!(tok.encode(&p.text, true).unwrap(), p.ids, "{name} prompt {i}");
            assert_eq!(tok.decode(&p.ids, false), p.text, "{name} prompt {i}: round trip");
            assert_eq!(tok.decode(&p.ids, true), p.text, "{name} prompt {i}: round trip");
            assert_eq!(tok.decode(&p.greedy, false), p.greedy_text, "{name} prompt {i}: greedy text");
            assert!(p.greedy.iter().all(|&id| (id as usize) < tok.vocab_size()));
        }
    }
}

#[test]
fn special_tokens_and_eos() {
    for name in FIXTURES {
        let (tok, _) = load(name);
        assert_eq!(tok.vocab_size(), 1024, "{name}");
        let im_end = tok.token_id("<|im_end|>").unwrap();
        let eot = tok.token_id("<|endoftext|>").unwrap();
        let expected_eos = if name.starts_with("qwen2") { vec![im_end, eot] } else { vec![im_end] };
        assert_eq!(tok.eos_token_ids(), expected_eos, "{name}");
        assert_eq!(tok.eos_token(), Some("<|im_end|>"));
        // Special tokens are single ids, skipped by decode(.., true).
        let ids = tok.encode("<|im_start|>user\nHi<|im_end|>", false).unwrap();
        assert_eq!(ids[0], tok.token_id("<|im_start|>").unwrap());
        assert_eq!(*ids.last().unwrap(), im_end);
        assert_eq!(tok.decode(&ids, true), "user\nHi");
        assert_eq!(tok.decode(&ids, false), "<|im_start|>user\nHi<|im_end|>");
    }
}
