//! The image routes end to end: a real server on 127.0.0.1:0 serving the tiny random-weight
//! Stable Diffusion 1.5 pipeline (tests/fixtures/sd-tiny/sd15: 64x64 by default, so at most
//! 8192 pixels and 128 a side; PNDM) next to the tiny text model. Few steps and 32x32 images
//! keep each request well under a second on CPU. PNDM runs the UNet once more than the steps
//! asked (as diffusers does): streams are checked against the `total` the events report.

mod common;

use std::io::Cursor;
use std::path::Path;

use base64::Engine as _;
use common::{assert_error, metric_value, TestServer};
use futures::{SinkExt, StreamExt};
use kiln::config::Config;
use serde_json::{json, Value};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const SD: &str = "sd-tiny";
const TEXT: &str = "kiln-demo";

fn config(sd_extra: &str) -> Config {
    let text = format!(
        r#"
        [server]
        max_body_bytes = 1048576
        request_timeout_s = 120

        [[models]]
        name = "{SD}"
        path = "tests/fixtures/sd-tiny/sd15"
        device = "cpu"
        default_steps = 2
        {sd_extra}

        [[models]]
        name = "{TEXT}"
        path = "tests/fixtures/qwen2-tied-gqa"
        demo = true
        device = "cpu"
        kv_cache_tokens = 1024
        max_batch_tokens = 256
        "#
    );
    Config::parse(&text, "test config", Path::new(env!("CARGO_MANIFEST_DIR"))).unwrap()
}

async fn server() -> TestServer {
    server_with("max_steps = 8").await
}

async fn server_with(sd_extra: &str) -> TestServer {
    TestServer::serve(&config(sd_extra)).await
}

fn gen(extra: Value) -> Value {
    let mut b = json!({"model": SD, "prompt": "a red square", "size": "32x32", "steps": 2});
    for (k, v) in extra.as_object().unwrap() {
        b[k] = v.clone();
    }
    b
}

fn b64(s: &Value) -> Vec<u8> {
    base64::engine::general_purpose::STANDARD.decode(s.as_str().expect("a base64 string")).unwrap()
}

/// Decodes PNG bytes, checking the signature.
fn png(bytes: &[u8]) -> image::RgbImage {
    assert!(bytes.starts_with(b"\x89PNG\r\n\x1a\n"), "not a PNG");
    image::load_from_memory_with_format(bytes, image::ImageFormat::Png).unwrap().into_rgb8()
}

fn test_png(w: u32, h: u32) -> Vec<u8> {
    let img = image::RgbImage::from_fn(w, h, |x, y| image::Rgb([(x * 8) as u8, (y * 8) as u8, 200]));
    let mut out = Cursor::new(Vec::new());
    img.write_to(&mut out, image::ImageFormat::Png).unwrap();
    out.into_inner()
}

/// One SSE event: its name and data.
fn sse_events(text: &str) -> Vec<(String, String)> {
    text.split("\n\n")
        .filter_map(|block| {
            let mut name = String::from("message");
            let mut data = Vec::new();
            for line in block.lines() {
                if let Some(n) = line.strip_prefix("event:") {
                    name = n.trim().to_string();
                } else if let Some(d) = line.strip_prefix("data:") {
                    data.push(d.strip_prefix(' ').unwrap_or(d));
                }
            }
            (!data.is_empty()).then(|| (name, data.join("\n")))
        })
        .collect()
}

async fn sse(s: &TestServer, path: &str, body: Value) -> Vec<(String, String)> {
    let r = s.client.post(s.url(path)).json(&body).send().await.unwrap();
    assert_eq!(r.status().as_u16(), 200);
    assert!(r.headers()["content-type"].to_str().unwrap().starts_with("text/event-stream"));
    sse_events(&r.text().await.unwrap())
}

/// A multipart/form-data body of text fields and one file field.
fn form(fields: &[(&str, &str)], file: Option<(&str, &[u8])>) -> (String, Vec<u8>) {
    let boundary = "kilnTestBoundary7MA4YWxkTrZu0gW";
    let mut body = Vec::new();
    for (k, v) in fields {
        body.extend_from_slice(
            format!("--{boundary}\r\nContent-Disposition: form-data; name=\"{k}\"\r\n\r\n{v}\r\n").as_bytes(),
        );
    }
    if let Some((name, bytes)) = file {
        body.extend_from_slice(
            format!(
                "--{boundary}\r\nContent-Disposition: form-data; name=\"{name}\"; filename=\"upload\"\r\n\
                 Content-Type: application/octet-stream\r\n\r\n"
            )
            .as_bytes(),
        );
        body.extend_from_slice(bytes);
        body.extend_from_slice(b"\r\n");
    }
    body.extend_from_slice(format!("--{boundary}--\r\n").as_bytes());
    (format!("multipart/form-data; boundary={boundary}"), body)
}

async fn post_form(s: &TestServer, fields: &[(&str, &str)], file: Option<(&str, &[u8])>) -> (u16, Value) {
    let (ct, body) = form(fields, file);
    let r = s.client.post(s.url("/v1/images/edits")).header("content-type", ct).body(body).send().await.unwrap();
    let status = r.status().as_u16();
    let text = r.text().await.unwrap();
    (status, serde_json::from_str(&text).unwrap_or_else(|_| panic!("not JSON ({status}): {text}")))
}

#[tokio::test]
async fn generations_return_pngs_seeded_and_by_url() {
    let s = server().await;

    let (st, v) = s.post("/v1/images/generations", gen(json!({"seed": 42, "user": "u1", "quality": "hd"}))).await;
    assert_eq!(st, 200, "{v}");
    assert!(v["created"].as_u64().unwrap() > 0);
    let data = v["data"].as_array().unwrap();
    assert_eq!(data.len(), 1);
    assert_eq!(png(&b64(&data[0]["b64_json"])).dimensions(), (32, 32));
    assert_eq!(data[0]["seed"], 42);
    let k = &v["kiln"];
    assert_eq!((k["seed"].as_u64(), k["steps"].as_u64(), k["size"].as_str()), (Some(42), Some(2), Some("32x32")));
    assert_eq!(k["scheduler"], "pndm", "{v}");
    assert!(k["elapsed_ms"].is_u64(), "{v}");

    // n = 2: seeds s and s + 1, different images; the same seed again gives the same bytes.
    let (st, v) = s.post("/v1/images/generations", gen(json!({"n": 2, "seed": 7}))).await;
    assert_eq!(st, 200, "{v}");
    let data = v["data"].as_array().unwrap();
    assert_eq!((data[0]["seed"].as_u64(), data[1]["seed"].as_u64()), (Some(7), Some(8)));
    let (a, b) = (b64(&data[0]["b64_json"]), b64(&data[1]["b64_json"]));
    assert_ne!(png(&a), png(&b), "two seeds gave the same image");
    let (st, again) = s.post("/v1/images/generations", gen(json!({"n": 2, "seed": 7}))).await;
    assert_eq!(st, 200, "{again}");
    assert_eq!(b64(&again["data"][0]["b64_json"]), a, "same seed, different PNG");
    assert_eq!(b64(&again["data"][1]["b64_json"]), b);
    // Alone, image 1's seed gives image 1 of the pair.
    let (_, alone) = s.post("/v1/images/generations", gen(json!({"seed": 8}))).await;
    assert_eq!(b64(&alone["data"][0]["b64_json"]), b, "batched and alone differ");

    // No seed: a random one, reported.
    let (st, v) = s.post("/v1/images/generations", json!({"model": SD, "prompt": "x", "steps": 1})).await;
    assert_eq!(st, 200, "{v}");
    assert!(v["data"][0]["seed"].is_u64() && v["kiln"]["seed"] == v["data"][0]["seed"], "{v}");
    assert_eq!(v["kiln"]["size"], "64x64", "the model's default size");

    // response_format = url: a relative URL that serves the PNG until it expires.
    let (st, v) = s.post("/v1/images/generations", gen(json!({"response_format": "url", "seed": 42}))).await;
    assert_eq!(st, 200, "{v}");
    let url = v["data"][0]["url"].as_str().unwrap();
    assert!(url.starts_with("/v1/images/") && url.ends_with(".png"), "{url}");
    assert!(v["data"][0].get("b64_json").is_none());
    let r = s.client.get(s.url(url)).send().await.unwrap();
    assert_eq!(r.status().as_u16(), 200);
    assert_eq!(r.headers()["content-type"], "image/png");
    let bytes = r.bytes().await.unwrap();
    assert_eq!(png(&bytes), png(&b64(&data_of(&s, 42).await)), "url and b64_json differ");
    for missing in ["/v1/images/0123456789abcdef0123456789abcdef.png", "/v1/images/nope"] {
        let (st, body) = s.get(missing).await;
        let e = assert_error(st, &serde_json::from_str(&body).unwrap(), 404, "not_found");
        assert!(e["message"].as_str().unwrap().contains("expired"), "{e}");
    }

    // The seed example's flat input, top level or in an `input` envelope.
    let simple = json!({"prompt": "a red square", "width": 32, "height": 32, "num_steps": 2, "seed": 42});
    let (st, v) = s.post("/v1/images/simple", json!({"model": SD, "input": simple})).await;
    assert_eq!(st, 200, "{v}");
    assert_eq!((v["width"].as_u64(), v["height"].as_u64(), v["seed"].as_u64()), (Some(32), Some(32), Some(42)));
    assert_eq!(v["steps"], 2);
    assert!(v["elapsed_ms"].is_u64());
    assert_eq!(png(&b64(&v["image_base64"])), png(&b64(&data_of(&s, 42).await)), "simple and OpenAI routes differ");
    let mut flat = simple.clone();
    flat["model"] = json!(SD);
    flat["num_steps"] = json!(0);
    let (st, v) = s.post("/v1/images/simple", flat).await;
    assert_eq!(assert_error(st, &v, 400, "invalid_parameter")["param"], "num_steps");

    let metrics = s.get("/metrics").await.1;
    assert!(metric_value(&metrics, "kiln_requests_total", &[("model", SD), ("status", "stop")]) >= 6.0, "{metrics}");
}

/// The steps of a stream: what its first step event says, checked against every step event.
fn step_count(events: &[(String, String)]) -> usize {
    let steps: Vec<Value> =
        events.iter().filter(|(n, _)| n == "step").map(|(_, d)| serde_json::from_str(d).unwrap()).collect();
    let total = steps[0]["total"].as_u64().unwrap();
    assert!(steps.iter().all(|v| v["total"] == total), "{steps:?}");
    total as usize
}

/// The b64 PNG of the default request with `seed`.
async fn data_of(s: &TestServer, seed: u64) -> Value {
    let (st, v) = s.post("/v1/images/generations", gen(json!({"seed": seed}))).await;
    assert_eq!(st, 200, "{v}");
    v["data"][0]["b64_json"].clone()
}

#[tokio::test]
async fn streaming_sends_every_step_then_the_image_then_done() {
    let s = server().await;
    let events = sse(&s, "/v1/images/generations", gen(json!({"stream": true, "steps": 3, "seed": 42}))).await;
    let total = step_count(&events);
    assert!((3..=4).contains(&total), "3 steps (PNDM: 4 model calls): {events:?}");
    let names: Vec<&str> = events.iter().map(|(n, _)| n.as_str()).collect();
    let mut want = vec!["step"; total];
    want.extend(["image", "done"]);
    assert_eq!(names, want, "{events:?}");
    for (k, (_, d)) in events[..total].iter().enumerate() {
        let v: Value = serde_json::from_str(d).unwrap();
        assert_eq!((v["index"].as_u64(), v["step"].as_u64()), (Some(0), Some(k as u64 + 1)), "{v}");
        assert!(v["timestep"].is_number() && v["elapsed_ms"].is_u64(), "{v}");
        assert!(v.get("preview").is_none(), "no previews unless asked");
    }
    let img: Value = serde_json::from_str(&events[total].1).unwrap();
    assert_eq!((img["index"].as_u64(), img["seed"].as_u64()), (Some(0), Some(42)));
    // The streamed image is the non-streamed one with those steps.
    let (_, plain) = s.post("/v1/images/generations", gen(json!({"steps": 3, "seed": 42}))).await;
    assert_eq!(png(&b64(&img["b64_json"])), png(&b64(&plain["data"][0]["b64_json"])));
    assert_eq!(events[total + 1].1, "[DONE]");

    // Two images with previews every step: per image steps 1..=2 in order, each with a PNG preview.
    let body = gen(json!({"stream": true, "n": 2, "preview_every": 1, "response_format": "url", "seed": 5}));
    let events = sse(&s, "/v1/images/generations", body).await;
    assert_eq!(events.last().unwrap().0, "done");
    let total = step_count(&events);
    for index in 0..2u64 {
        let mine: Vec<Value> = events
            .iter()
            .filter(|(n, _)| n != "done")
            .map(|(_, d)| serde_json::from_str::<Value>(d).unwrap())
            .filter(|v| v["index"] == index)
            .collect();
        assert_eq!(mine.len(), total + 1, "{mine:?}");
        for (k, v) in mine[..total].iter().enumerate() {
            assert_eq!(v["type"], "step");
            assert_eq!(v["step"], k as u64 + 1);
            if k + 1 < total {
                let preview = png(&b64(&v["preview"]));
                assert!(preview.width() > 0, "an empty preview");
            } else {
                assert!(v.get("preview").is_none(), "the last step brings the image, not a preview: {v}");
            }
        }
        assert_eq!(mine[total]["type"], "image");
        let url = mine[total]["url"].as_str().unwrap();
        let r = s.client.get(s.url(url)).send().await.unwrap();
        assert_eq!(r.status().as_u16(), 200);
        // Previews leave the image as it is without them.
        let plain = data_of(&s, mine[total]["seed"].as_u64().unwrap()).await;
        assert_eq!(png(&r.bytes().await.unwrap()), png(&b64(&plain)), "previews changed image {index}");
    }
}

#[tokio::test]
async fn edits_run_img2img_on_an_upload_and_refuse_bad_files() {
    let s = server().await;
    let upload = test_png(32, 32);
    let fields = [("model", SD), ("prompt", "a blue square"), ("steps", "4"), ("strength", "0.5"), ("seed", "3")];
    let (st, v) = post_form(&s, &fields, Some(("image", &upload))).await;
    assert_eq!(st, 200, "{v}");
    assert_eq!(png(&b64(&v["data"][0]["b64_json"])).dimensions(), (32, 32));
    assert_eq!((v["kiln"]["denoising_steps"].as_u64(), v["kiln"]["steps"].as_u64()), (Some(2), Some(4)), "{v}");

    // The upload limit of this route (20 MiB) is not the server's `max_body_bytes` (1 MiB here).
    let padding = "x".repeat(1536 * 1024);
    let fields = [("model", SD), ("prompt", "p"), ("steps", "2"), ("padding", padding.as_str())];
    let (st, v) = post_form(&s, &fields, Some(("image", &upload))).await;
    assert_eq!(st, 200, "{v}");

    // Another size is resized to `size`; a different-size upload without `size` uses its own size.
    let big = test_png(48, 40);
    let fields = [("model", SD), ("prompt", "p"), ("steps", "2"), ("size", "32x32"), ("stream", "true")];
    let (ct, body) = form(&fields, Some(("image", &big)));
    let r = s.client.post(s.url("/v1/images/edits")).header("content-type", ct).body(body).send().await.unwrap();
    assert_eq!(r.status().as_u16(), 200);
    let events = sse_events(&r.text().await.unwrap());
    let total = step_count(&events);
    assert!((1..=2).contains(&total), "strength 0.8 of 2 steps runs 1 (PNDM: 2 model calls): {events:?}");
    let names: Vec<&str> = events.iter().map(|(n, _)| n.as_str()).collect();
    let mut want = vec!["step"; total];
    want.extend(["image", "done"]);
    assert_eq!(names, want);
    let (st, v) = post_form(&s, &[("model", SD), ("prompt", "p"), ("steps", "2")], Some(("image", &big))).await;
    assert_eq!(st, 200, "48x40 fits the model: {v}");
    assert_eq!(v["kiln"]["size"], "48x40");

    // Bad uploads: 400 naming the problem, and the server carries on.
    let truncated = &upload[..upload.len() / 2];
    let gif = b"GIF89a\x01\x00\x01\x00\x80\x00\x00\xff\xff\xff\x00\x00\x00,\x00\x00\x00\x00\x01\x00\x01\x00\x00\x02\x02D\x01\x00;";
    let huge = huge_png_header();
    let ok = [("model", SD), ("prompt", "p"), ("steps", "2")];
    for (file, want) in [
        (truncated, "truncated or corrupt"),
        (&gif[..], "GIF"),
        (&b"just some text\n"[..], "PNG, JPEG or WebP"),
        (&huge[..], "100000x100000"),
    ] {
        let (st, v) = post_form(&s, &ok, Some(("image", file))).await;
        let e = assert_error(st, &v, 400, "invalid_parameter");
        assert_eq!(e["param"], "image");
        assert!(e["message"].as_str().unwrap().contains(want), "{want}: {e}");
        s.assert_healthy().await;
    }
    let cases: Vec<FormCase> = vec![
        (vec![("model", SD), ("prompt", "p"), ("steps", "4"), ("strength", "0.2")], "strength", 400),
        (vec![("model", SD), ("prompt", "p"), ("strength", "1.5")], "strength", 400),
        (vec![("model", SD), ("prompt", "p"), ("strength", "0")], "strength", 400),
        (vec![("model", SD), ("prompt", "p"), ("size", "31x32")], "size", 400),
        (vec![("model", SD), ("prompt", "")], "prompt", 400),
        (vec![("model", SD), ("prompt", "p"), ("steps", "two")], "steps", 422),
        (vec![("model", TEXT), ("prompt", "p")], "model", 400),
    ];
    for (fields, param, status) in cases {
        let (st, v) = post_form(&s, &fields, Some(("image", &upload))).await;
        let code = if status == 422 { "invalid_type" } else { "invalid_parameter" };
        assert_eq!(assert_error(st, &v, status, code)["param"], param, "{fields:?}");
    }
    // An upload the model cannot generate at, without `size`.
    let (st, v) = post_form(&s, &ok, Some(("image", &test_png(30, 30)))).await;
    let e = assert_error(st, &v, 400, "invalid_parameter");
    assert!(e["message"].as_str().unwrap().contains("give `size`"), "{e}");
    // No file; a JSON body.
    let (st, v) = post_form(&s, &ok, None).await;
    assert_eq!(assert_error(st, &v, 422, "invalid_type")["param"], "image");
    let (st, v) = s.post("/v1/images/edits", json!({"prompt": "p"})).await;
    assert_error(st, &v, 400, "unsupported");

    // A body declared larger than the upload limit is refused before it is sent.
    let (status, body) = declared_too_large(&s).await;
    assert_eq!(status, 413, "{body}");
    assert!(body.contains("payload_too_large"), "{body}");
    s.assert_healthy().await;
}

/// Form fields, the param the error names, and the status.
type FormCase<'a> = (Vec<(&'a str, &'a str)>, &'a str, u16);

/// A PNG signature and IHDR chunk claiming 100000x100000, then nothing.
fn huge_png_header() -> Vec<u8> {
    fn crc32(bytes: &[u8]) -> u32 {
        let mut crc = !0u32;
        for &b in bytes {
            crc ^= u32::from(b);
            for _ in 0..8 {
                crc = if crc & 1 != 0 { (crc >> 1) ^ 0xedb8_8320 } else { crc >> 1 };
            }
        }
        !crc
    }
    let mut chunk = b"IHDR".to_vec();
    chunk.extend_from_slice(&100_000u32.to_be_bytes());
    chunk.extend_from_slice(&100_000u32.to_be_bytes());
    chunk.extend_from_slice(&[8, 2, 0, 0, 0]);
    let mut png = b"\x89PNG\r\n\x1a\n".to_vec();
    png.extend_from_slice(&13u32.to_be_bytes());
    png.extend_from_slice(&chunk);
    png.extend_from_slice(&crc32(&chunk).to_be_bytes());
    png
}

/// Sends only the headers of a 30 MB upload and reads the answer.
async fn declared_too_large(s: &TestServer) -> (u16, String) {
    let addr = s.base.trim_start_matches("http://");
    let mut tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
    let head = format!(
        "POST /v1/images/edits HTTP/1.1\r\nHost: {addr}\r\nContent-Type: multipart/form-data; boundary=x\r\n\
         Content-Length: 30000000\r\nConnection: close\r\n\r\n--x\r\n"
    );
    tcp.write_all(head.as_bytes()).await.unwrap();
    let mut buf = Vec::new();
    let _ = tokio::time::timeout(std::time::Duration::from_secs(10), tcp.read_to_end(&mut buf)).await;
    let text = String::from_utf8_lossy(&buf).to_string();
    let status = text.split(' ').nth(1).and_then(|c| c.parse().ok()).unwrap_or(0);
    (status, text)
}

#[tokio::test]
async fn bad_requests_are_400s_and_the_server_carries_on() {
    let s = server().await;
    let p = |x: &str| x.to_string();
    let cases: Vec<(Value, u16, &str, String, &str)> = vec![
        (gen(json!({"prompt": ""})), 400, "invalid_parameter", p("prompt"), "non-empty"),
        (gen(json!({"prompt": "  "})), 400, "invalid_parameter", p("prompt"), "non-empty"),
        (json!({"model": SD}), 422, "invalid_type", p("prompt"), "prompt"),
        (gen(json!({"prompt": 5})), 422, "invalid_type", p("prompt"), "prompt"),
        (gen(json!({"size": "30x32"})), 400, "invalid_parameter", p("size"), "multiples of 4"),
        (gen(json!({"size": "128x128"})), 400, "invalid_parameter", p("size"), "at most 8192 pixels"),
        (gen(json!({"size": "132x8"})), 400, "invalid_parameter", p("size"), "between 4 and 128"),
        (gen(json!({"size": "big"})), 400, "invalid_parameter", p("size"), "WIDTHxHEIGHT"),
        (gen(json!({"steps": 0})), 400, "invalid_parameter", p("steps"), "between 1 and 8"),
        (gen(json!({"steps": 9})), 400, "invalid_parameter", p("steps"), "between 1 and 8"),
        (gen(json!({"steps": 2, "num_inference_steps": 3})), 400, "invalid_parameter", p("steps"), "not both"),
        (gen(json!({"n": 0})), 400, "invalid_parameter", p("n"), "between 1 and 8"),
        (gen(json!({"n": 9})), 400, "invalid_parameter", p("n"), "between 1 and 8"),
        (gen(json!({"guidance_scale": 51})), 400, "invalid_parameter", p("guidance_scale"), "between 0 and 50"),
        (gen(json!({"scheduler": "warp"})), 400, "invalid_parameter", p("scheduler"), "euler_a"),
        (gen(json!({"seed": -1})), 400, "invalid_parameter", p("seed"), "between 0 and"),
        (gen(json!({"seed": 1.5})), 400, "invalid_parameter", p("seed"), "between 0 and"),
        (gen(json!({"response_format": "jpeg"})), 400, "invalid_parameter", p("response_format"), "b64_json"),
        (gen(json!({"output_format": "webp"})), 400, "invalid_parameter", p("output_format"), "png"),
        (gen(json!({"preview_every": 1})), 400, "invalid_parameter", p("preview_every"), "stream"),
        (gen(json!({"strength": 0.5})), 400, "invalid_parameter", p("strength"), "edits"),
        (gen(json!({"timeout": 0})), 400, "invalid_parameter", p("timeout"), "seconds"),
        (gen(json!({"model": TEXT})), 400, "invalid_parameter", p("model"), "does not generate images"),
        (gen(json!({"model": "nope"})), 404, "model_not_found", p("model"), "nope"),
        (json!({"prompt": "x"}), 400, "invalid_parameter", p("model"), "required"),
    ];
    for (body, status, code, param, needle) in cases {
        let (st, v) = s.post("/v1/images/generations", body.clone()).await;
        let e = assert_error(st, &v, status, code);
        assert_eq!(e["param"], param.as_str(), "{body}: {v}");
        assert!(e["message"].as_str().unwrap().contains(needle), "{body}: {needle:?} not in {e}");
    }
    // An unknown scheduler's message lists the allowed ones; a known one works.
    let (st, v) = s.post("/v1/images/generations", gen(json!({"scheduler": "Euler-A", "guidance_scale": 1}))).await;
    assert_eq!(st, 200, "{v}");
    assert_eq!(v["kiln"]["scheduler"], "euler_a", "reported by its canonical name");

    // The text routes refuse the image model with a 400 naming the image routes.
    let (st, v) =
        s.post("/v1/chat/completions", json!({"model": SD, "messages": [{"role": "user", "content": "hi"}]})).await;
    let e = assert_error(st, &v, 400, "invalid_parameter");
    assert!(e["message"].as_str().unwrap().contains("/v1/images/generations"), "{e}");
    let (st, v) = s.post("/v1/embeddings", json!({"model": SD, "input": "hi"})).await;
    assert_error(st, &v, 400, "invalid_parameter");

    // A deadline shorter than the work: 408, and the images are cancelled.
    let (st, v) = s.post("/v1/images/generations", gen(json!({"steps": 8, "timeout": 0.005}))).await;
    assert_error(st, &v, 408, "timeout");

    // Still serving.
    s.assert_healthy().await;
    let (st, v) = s.post("/v1/images/generations", gen(json!({}))).await;
    assert_eq!(st, 200, "{v}");
    let (st, v) = s
        .post(
            "/v1/chat/completions",
            json!({"model": TEXT, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}),
        )
        .await;
    assert_eq!(st, 200, "{v}");
    let (_, models) = s.get("/v1/models").await;
    let models: Value = serde_json::from_str(&models).unwrap();
    let sd = models["data"].as_array().unwrap().iter().find(|m| m["id"] == SD).unwrap();
    assert_eq!(sd["kiln"]["family"], "image-generation");
}

#[tokio::test]
async fn websocket_image_messages_stream_steps_and_images() {
    let s = server().await;
    let (mut ws, _) = tokio_tungstenite::connect_async(s.ws_url()).await.unwrap();
    let send = |v: Value| tokio_tungstenite::tungstenite::Message::Text(v.to_string().into());
    ws.send(send(json!({"type": "image", "id": "i1", "model": SD, "prompt": "a red square", "size": "32x32",
        "steps": 2, "n": 2, "seed": 42, "preview_every": 2})))
        .await
        .unwrap();
    ws.send(send(json!({"type": "image", "id": "bad", "model": SD, "prompt": "x", "steps": 0}))).await.unwrap();
    let mut events = Vec::new();
    let mut images = 0;
    while images < 2 || !events.iter().any(|e: &Value| e["id"] == "bad") {
        let m = tokio::time::timeout(std::time::Duration::from_secs(60), ws.next()).await.unwrap().unwrap().unwrap();
        let v: Value = serde_json::from_str(m.to_text().unwrap()).unwrap();
        if v["type"] == "image" {
            images += 1;
        }
        events.push(v);
    }
    let bad = events.iter().find(|e| e["id"] == "bad").unwrap();
    assert_eq!((bad["type"].as_str(), bad["param"].as_str()), (Some("error"), Some("steps")), "{bad}");
    for index in 0..2u64 {
        let mine: Vec<&Value> = events.iter().filter(|e| e["id"] == "i1" && e["index"] == index).collect();
        let total = mine[0]["total"].as_u64().unwrap() as usize;
        let kinds: Vec<&str> = mine.iter().map(|e| e["type"].as_str().unwrap()).collect();
        let mut want = vec!["image_step"; total];
        want.push("image");
        assert_eq!(kinds, want, "{mine:?}");
        for (k, e) in mine[..total].iter().enumerate() {
            assert_eq!(e["step"], k as u64 + 1);
            assert_eq!(e["preview"].is_string(), (k + 1) % 2 == 0, "a preview every 2 steps: {e}");
        }
        assert_eq!(mine[total]["seed"], 42 + index);
        assert_eq!(png(&b64(&mine[total]["b64_json"])).dimensions(), (32, 32));
    }
    // The same image as the HTTP route.
    let first = events.iter().find(|e| e["type"] == "image" && e["index"] == 0).unwrap();
    assert_eq!(png(&b64(&first["b64_json"])), png(&b64(&data_of(&s, 42).await)));

    // Cancel: the images still running end with `done` / cancelled, and the id is free again.
    ws.send(send(json!({"type": "image", "id": "c", "model": SD, "prompt": "x", "steps": 8}))).await.unwrap();
    ws.send(send(json!({"type": "cancel", "id": "c"}))).await.unwrap();
    loop {
        let m = tokio::time::timeout(std::time::Duration::from_secs(60), ws.next()).await.unwrap().unwrap().unwrap();
        let v: Value = serde_json::from_str(m.to_text().unwrap()).unwrap();
        assert_ne!(v["type"], "image", "a cancelled request finished: {v}");
        if v["type"] == "done" {
            assert_eq!((v["id"].as_str(), v["finish_reason"].as_str()), (Some("c"), Some("cancelled")), "{v}");
            break;
        }
    }
    ws.send(send(json!({"type": "image", "id": "c", "model": SD, "prompt": "x", "steps": 1}))).await.unwrap();
    loop {
        let m = tokio::time::timeout(std::time::Duration::from_secs(60), ws.next()).await.unwrap().unwrap().unwrap();
        let v: Value = serde_json::from_str(m.to_text().unwrap()).unwrap();
        if v["type"] == "image" {
            assert_eq!(v["id"], "c");
            break;
        }
        assert_eq!(v["type"], "image_step", "{v}");
    }
}

#[tokio::test]
async fn a_full_queue_is_429_and_a_dropped_stream_cancels_its_images() {
    let s = server_with("max_steps = 40\nmax_waiting = 1\nmax_running = 2").await;
    let metric =
        |text: &str, status: &str| metric_value(text, "kiln_requests_total", &[("model", SD), ("status", status)]);

    // More images than may wait: refused whole, with Retry-After, and counted.
    let r =
        s.client.post(s.url("/v1/images/generations")).json(&gen(json!({"n": 8, "steps": 4}))).send().await.unwrap();
    assert_eq!(r.status().as_u16(), 429);
    assert!(r.headers().get("retry-after").is_some());
    let v: Value = r.json().await.unwrap();
    assert_error(429, &v, 429, "overloaded");
    let metrics = s.get("/metrics").await.1;
    assert_eq!(metric(&metrics, "rejected"), 1.0, "{metrics}");

    // A client that goes away after the first step: the image is cancelled.
    let body = gen(json!({"stream": true, "steps": 40, "size": "64x64"}));
    let mut r = s.client.post(s.url("/v1/images/generations")).json(&body).send().await.unwrap();
    assert_eq!(r.status().as_u16(), 200);
    let first = r.chunk().await.unwrap().unwrap();
    assert!(String::from_utf8_lossy(&first).contains("event: step"), "{first:?}");
    drop(r);
    // Cancelled at the next step boundary: counted, and the batcher has nothing running.
    let mut state = (0.0, Value::Null);
    for _ in 0..200 {
        let cancelled = metric(&s.get("/metrics").await.1, "cancelled");
        let models: Value = serde_json::from_str(&s.get("/v1/models").await.1).unwrap();
        let sd = models["data"].as_array().unwrap().iter().find(|m| m["id"] == SD).unwrap().clone();
        state = (cancelled, sd["kiln"]["stats"]["running"].clone());
        if state == (1.0, json!(0)) {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(25)).await;
    }
    assert_eq!(state, (1.0, json!(0)), "(cancelled requests, running images)");
    assert_eq!(metric(&s.get("/metrics").await.1, "stop"), 0.0, "the dropped stream did not finish");

    // The queue is free again.
    let (st, v) = s.post("/v1/images/generations", gen(json!({"n": 2}))).await;
    assert_eq!(st, 200, "{v}");
}
