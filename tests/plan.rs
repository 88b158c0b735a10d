//! `kiln plan`: size parsing, the memory arithmetic on the committed fixture and on a
//! synthetic Qwen2.5-3B-shaped folder (config.json + safetensors headers only, no weights).

use std::path::{Path, PathBuf};

use kiln::config::{Config, ModelConfig};
use kiln::plan::{parse_bytes, plan, plan_card, render, ModelEntry, STANDARD_CARDS};
use kiln_models::DType;
use serde_json::{json, Value};

const GIB: u64 = 1 << 30;

fn root() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

fn temp_dir(tag: &str) -> PathBuf {
    use std::sync::atomic::{AtomicUsize, Ordering};
    static N: AtomicUsize = AtomicUsize::new(0);
    let d = std::env::temp_dir().join(format!(
        "kiln-plan-{tag}-{}-{}",
        std::process::id(),
        N.fetch_add(1, Ordering::Relaxed)
    ));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

#[test]
fn sizes_are_binary() {
    assert_eq!(parse_bytes("24GB").unwrap(), 24 * GIB);
    assert_eq!(parse_bytes("24 GB").unwrap(), 24 * GIB);
    assert_eq!(parse_bytes("80GiB").unwrap(), 80 * GIB);
    assert_eq!(parse_bytes("48g").unwrap(), 48 * GIB);
    assert_eq!(parse_bytes("1.5GB").unwrap(), 3 * GIB / 2);
    assert_eq!(parse_bytes("24576MB").unwrap(), 24 * GIB);
    assert_eq!(parse_bytes("1TB").unwrap(), 1024 * GIB);
    assert_eq!(parse_bytes("25769803776").unwrap(), 24 * GIB);
    for bad in ["", "GB", "24XB", "-1GB", "0", "1.5", "abc"] {
        assert!(parse_bytes(bad).is_err(), "{bad:?} should be rejected");
    }
    assert_eq!(STANDARD_CARDS, [24 * GIB, 48 * GIB, 80 * GIB]);
}

fn u(v: &Value, k: &str) -> u64 {
    v[k].as_u64().unwrap_or_else(|| panic!("{k}"))
}

/// Qwen2 parameter count from config.json, written out here independently of kiln-models.
fn qwen2_params(c: &Value) -> u64 {
    let (h, i, l, v) = (u(c, "hidden_size"), u(c, "intermediate_size"), u(c, "num_hidden_layers"), u(c, "vocab_size"));
    let hd = h / u(c, "num_attention_heads");
    let kv = u(c, "num_key_value_heads") * hd;
    let attn = (h * h + h) + 2 * (h * kv + kv) + h * h; // q (+bias), k, v (+bias), o
    let mlp = 3 * h * i;
    let tied = c["tie_word_embeddings"].as_bool().unwrap_or(false);
    l * (attn + mlp + 2 * h) + v * h * if tied { 1 } else { 2 } + h
}

/// The documented activation formula, at 4 bytes per element.
fn activation(c: &Value, t: u64, running: u64, ctx: u64) -> u64 {
    let (h, i, v) = (u(c, "hidden_size"), u(c, "intermediate_size"), u(c, "vocab_size"));
    let heads = u(c, "num_attention_heads");
    let kv = u(c, "num_key_value_heads") * (h / heads);
    let r = running.min(t);
    4 * (t * (2 * h + h + 2 * kv + 3 * i) + 2 * heads * t * ctx + 2 * r * ctx * kv + r * v)
}

fn kv_per_token(c: &Value, dtype_bytes: u64) -> u64 {
    let hd = u(c, "hidden_size") / u(c, "num_attention_heads");
    2 * u(c, "num_hidden_layers") * u(c, "num_key_value_heads") * hd * dtype_bytes
}

#[test]
fn fixture_arithmetic_matches_an_independent_computation() {
    let config = Config::load(&root().join("config/default.toml")).unwrap();
    let m = &config.models[0];
    let c: Value = serde_json::from_str(&std::fs::read_to_string(m.path.join("config.json")).unwrap()).unwrap();
    let p = plan(&config.models[..1], 4096, &[24 * GIB], 0.9).unwrap();
    let e = &p.models[0];
    // f32 in the default config; the context is capped by max_position_embeddings (512).
    let params = qwen2_params(&c);
    assert_eq!(e.memory.config_params, params);
    assert_eq!(e.memory.params, params, "the safetensors headers agree with config.json");
    assert_eq!(e.memory.weights_bytes, params * 4);
    assert_eq!(e.memory.kv_bytes_per_token, kv_per_token(&c, 4));
    assert_eq!(e.memory.kv_bytes_per_token, 512);
    assert_eq!(e.context, 512);
    let act = activation(&c, m.max_batch_tokens as u64, m.max_running as u64, 512);
    assert_eq!(e.activation_bytes, act);

    let card = &p.cards[0];
    let cap = (24 * GIB) * 9 / 10;
    assert_eq!(card.capacity_bytes, cap);
    let pool = cap - params * 4 - act;
    assert_eq!(card.kv_pool_bytes, pool as i64);
    let blocks = pool / (512 * m.block_size as u64);
    assert_eq!(card.models[0].kv_tokens, blocks * m.block_size as u64);
    assert_eq!(card.models[0].max_sequences, blocks / (512 / m.block_size as u64));
    assert_eq!(card.models[0].max_running_sequences, m.max_running as u64);
    assert!(card.fits);
}

/// Writes a Qwen2.5-3B-shaped folder: config.json and two safetensors shards that hold only
/// their headers (bf16 tensors, no data), listed by model.safetensors.index.json.
fn synthetic_3b() -> (PathBuf, Value) {
    let dir = temp_dir("3b");
    let c = json!({
        "architectures": ["Qwen2ForCausalLM"],
        "model_type": "qwen2",
        "hidden_act": "silu",
        "hidden_size": 2048,
        "intermediate_size": 11008,
        "num_hidden_layers": 36,
        "num_attention_heads": 16,
        "num_key_value_heads": 2,
        "max_position_embeddings": 32768,
        "rms_norm_eps": 1e-6,
        "rope_theta": 1000000.0,
        "vocab_size": 151936,
        "tie_word_embeddings": true,
        "use_sliding_window": false
    });
    std::fs::write(dir.join("config.json"), c.to_string()).unwrap();
    let (h, i, kv, v) = (2048u64, 11008u64, 256u64, 151936u64);
    let mut tensors: Vec<(String, Vec<u64>)> = vec![("model.embed_tokens.weight".into(), vec![v, h])];
    for l in 0..36 {
        let p = format!("model.layers.{l}.");
        for (n, s) in [
            ("self_attn.q_proj.weight", vec![h, h]),
            ("self_attn.q_proj.bias", vec![h]),
            ("self_attn.k_proj.weight", vec![kv, h]),
            ("self_attn.k_proj.bias", vec![kv]),
            ("self_attn.v_proj.weight", vec![kv, h]),
            ("self_attn.v_proj.bias", vec![kv]),
            ("self_attn.o_proj.weight", vec![h, h]),
            ("mlp.gate_proj.weight", vec![i, h]),
            ("mlp.up_proj.weight", vec![i, h]),
            ("mlp.down_proj.weight", vec![h, i]),
            ("input_layernorm.weight", vec![h]),
            ("post_attention_layernorm.weight", vec![h]),
        ] {
            tensors.push((format!("{p}{n}"), s));
        }
    }
    tensors.push(("model.norm.weight".into(), vec![h]));
    let half = tensors.len() / 2;
    let mut weight_map = serde_json::Map::new();
    for (k, chunk) in [&tensors[..half], &tensors[half..]].into_iter().enumerate() {
        let file = format!("model-0000{}-of-00002.safetensors", k + 1);
        let mut header = serde_json::Map::new();
        header.insert("__metadata__".into(), json!({"format": "pt"}));
        let mut off = 0u64;
        for (name, shape) in chunk {
            let bytes = shape.iter().product::<u64>() * 2;
            header.insert(name.clone(), json!({"dtype": "BF16", "shape": shape, "data_offsets": [off, off + bytes]}));
            off += bytes;
            weight_map.insert(name.clone(), json!(file));
        }
        let text = Value::Object(header).to_string();
        let mut out = (text.len() as u64).to_le_bytes().to_vec();
        out.extend_from_slice(text.as_bytes());
        std::fs::write(dir.join(&file), out).unwrap();
    }
    std::fs::write(
        dir.join("model.safetensors.index.json"),
        json!({"metadata": {}, "weight_map": weight_map}).to_string(),
    )
    .unwrap();
    (dir, c)
}

fn model_3b(dir: &Path) -> ModelConfig {
    // Like config/qwen2.5-3b-instruct.toml, with a larger prefill budget.
    let mut m = ModelConfig::from_dir(dir);
    m.name = "qwen2.5-3b".into();
    m.dtype = DType::BF16;
    m.kv_cache_tokens = 131072.into();
    m.max_batch_tokens = 8192;
    m.max_running = 128;
    m.max_model_len = Some(32768);
    m
}

#[test]
fn synthetic_3b_fits_24gb_in_bf16() {
    let (dir, c) = synthetic_3b();
    let m = model_3b(&dir);
    let p = plan(std::slice::from_ref(&m), 4096, &STANDARD_CARDS, 0.9).unwrap();
    let e = &p.models[0];
    let params = qwen2_params(&c);
    assert_eq!(params, 3_085_938_688, "Qwen2.5-3B's parameter count");
    assert_eq!(e.memory.params, params);
    let ck = e.memory.checkpoint.as_ref().unwrap();
    assert_eq!((ck.files.len(), ck.elements), (2, params));
    assert_eq!(e.memory.weights_bytes, params * 2);
    assert_eq!(e.memory.kv_bytes_per_token, 36 * 1024, "36 KiB per token in bf16");
    assert!(e.memory.notes.is_empty(), "{:?}", e.memory.notes);
    let act = activation(&c, 8192, 128, 4096);
    assert_eq!(e.activation_bytes, act);

    let card = &p.cards[0];
    assert_eq!(card.label, "24 GB");
    let pool = (24 * GIB) * 9 / 10 - params * 2 - act;
    let tokens = pool / (36 * 1024 * 16) * 16;
    assert_eq!(card.models[0].kv_tokens, tokens);
    assert_eq!(card.models[0].max_sequences, tokens / 4096);
    assert!(card.fits, "{:?}", card.reasons);
    assert!(tokens > 200_000 && tokens < 300_000, "{tokens}");
    // Bigger cards hold more.
    assert!(p.cards[1].models[0].kv_tokens > tokens && p.cards[2].models[0].kv_tokens > p.cards[1].models[0].kv_tokens);
    let text = render(&p);
    assert!(text.contains("24 GB: fits") && text.contains(&tokens.to_string()), "{text}");

    // The same folder described by config.json alone (headers gone) gives the same weights.
    for f in ["model.safetensors.index.json", "model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"] {
        std::fs::remove_file(dir.join(f)).unwrap();
    }
    let e2 = ModelEntry::new(&m, 4096).unwrap();
    assert_eq!(e2.memory.weights_bytes, params * 2);
    assert!(e2.memory.checkpoint.is_none() && !e2.memory.notes.is_empty());
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn too_big_sets_do_not_fit() {
    let (dir, _) = synthetic_3b();
    let m = model_3b(&dir);
    // Full 32K context: the attention scores of an 8192-token prefill chunk alone exceed 24 GB.
    let p = plan(std::slice::from_ref(&m), 32768, &[24 * GIB, 80 * GIB], 0.9).unwrap();
    assert!(!p.cards[0].fits);
    assert!(p.cards[0].kv_pool_bytes < 0);
    assert!(render(&p).contains("24 GB: does NOT fit"), "{}", render(&p));
    assert!(p.cards[1].fits, "{:?}", p.cards[1].reasons);

    // Four copies in f32 on a 24 GB card: the weights alone (4 x 11.5 GiB) exceed it.
    let models: Vec<ModelConfig> = (0..4)
        .map(|k| {
            let mut m = model_3b(&dir);
            m.name = format!("copy{k}");
            m.dtype = DType::F32;
            m
        })
        .collect();
    let p = plan(&models, 4096, &[24 * GIB], 0.9).unwrap();
    assert!(!p.cards[0].fits && p.cards[0].reasons[0].contains("exceed the capacity"));

    // Weights fit but the KV share cannot hold one full-context sequence.
    let e = ModelEntry::new(&m, 4096).unwrap();
    let just_enough = e.memory.weights_bytes + e.activation_bytes + 1000 * e.memory.kv_bytes_per_token;
    let card = plan_card(std::slice::from_ref(&e), just_enough, 1.0);
    assert!(!card.fits && card.reasons[0].contains("cannot hold one 4096-token sequence"), "{:?}", card.reasons);
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn cli_prints_json() {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_kiln"))
        .args(["plan", "--config"])
        .arg(root().join("config/default.toml"))
        .args(["--gpu", "24GB", "--json"])
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let v: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["cards"].as_array().unwrap().len(), 1);
    assert_eq!(v["cards"][0]["gpu_bytes"], 24 * GIB);
    assert_eq!(v["cards"][0]["fits"], true);
    assert_eq!(v["models"][0]["name"], "kiln-demo");
}

#[test]
fn auto_kv_takes_the_rest_after_explicit_pools() {
    let (dir, _) = synthetic_3b();
    let mut fixed = model_3b(&dir);
    fixed.name = "fixed".into();
    fixed.kv_cache_tokens = 16384.into();
    let mut auto = model_3b(&dir);
    auto.name = "auto".into();
    auto.kv_cache_tokens = kiln::config::KvCacheTokens::Auto;
    let p = plan(&[fixed, auto.clone()], 4096, &[80 * GIB], 0.9).unwrap();
    let card = &p.cards[0];
    let per_token = 36 * 1024;
    assert_eq!(card.models[0].kv_tokens, 16384, "an explicit pool gets what it asked for");
    let rest = card.kv_pool_bytes as u64 - 16384 * per_token;
    let cap = 128 * 4096 * per_token; // max_running sequences of the planned context
    assert_eq!(card.models[1].kv_tokens, rest.min(cap) / (per_token * 16) * 16);
    assert!(card.fits, "{:?}", card.reasons);
    assert!(render(&p).contains("auto"), "{}", render(&p));

    // Two auto models split the rest evenly; on a small card each share is below the cap.
    let mut auto2 = auto.clone();
    auto2.name = "auto2".into();
    let p = plan(&[auto, auto2], 4096, &[48 * GIB], 0.9).unwrap();
    let card = &p.cards[0];
    let each = card.kv_pool_bytes as u64 / 2;
    assert!(each < cap);
    for m in &card.models {
        assert_eq!(m.kv_tokens, each / (per_token * 16) * 16, "{}", m.name);
    }
    let _ = std::fs::remove_dir_all(&dir);
}
