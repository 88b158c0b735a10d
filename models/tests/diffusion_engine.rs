//! The diffusion engine behind the real batcher: step-level continuous batching. Requests that
//! arrive while others are mid-schedule join between steps; every image streams one event per
//! denoising step, in order, and ends with the same pixels as when generated alone with the
//! same seed. Previews arrive every k steps; a request the engine cannot run fails alone.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use kiln_actors::{
    spawn_batcher, BatcherConfig, BatcherHandle, Engine, EngineError, FinishReason, ImageEvent, ImageOutput,
    ImageRequest, ImageStream, InitImage, ModelMetrics, RgbImage,
};
use kiln_models::clip::ClipTokenizer;
use kiln_models::{DType, DeviceSpec, DiffusionEngine, DiffusionEngineOptions};

fn pipeline() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures/sd-tiny/sd15")
}

fn options(warmup: bool) -> DiffusionEngineOptions {
    DiffusionEngineOptions {
        device: DeviceSpec::Cpu,
        dtype: DType::F32,
        max_running: 8,
        max_pixels: 48 * 48,
        max_batch_images: 4,
        max_steps: 12,
        warmup,
    }
}

async fn start(warmup: bool) -> BatcherHandle<DiffusionEngine> {
    let dir = pipeline();
    let opts = options(warmup);
    spawn_batcher(
        "sd".into(),
        Arc::new(move || DiffusionEngine::load(&dir, &opts).map_err(|e| EngineError::Load(e.to_string()))),
        BatcherConfig::default(),
        ModelMetrics::unregistered("sd"),
    )
    .await
    .expect("engine loads")
}

fn request(tok: &ClipTokenizer, prompt: &str, seed: u64, steps: usize, scheduler: &str) -> ImageRequest {
    ImageRequest {
        prompt_ids: tok.encode(prompt).unwrap().0,
        negative_ids: tok.encode("blurry").unwrap().0,
        width: 32,
        height: 32,
        steps,
        guidance_scale: 7.5,
        scheduler: Some(scheduler.into()),
        seed,
        init_image: None,
        preview_every: 0,
    }
}

/// Every event of one stream: per image its step outputs, and how it ended.
async fn collect(
    mut stream: ImageStream<DiffusionEngine>,
) -> BTreeMap<usize, (Vec<ImageOutput>, Option<FinishReason>)> {
    let mut out: BTreeMap<usize, (Vec<ImageOutput>, Option<FinishReason>)> = BTreeMap::new();
    while let Some(ev) = tokio::time::timeout(Duration::from_secs(120), stream.next()).await.expect("no stall") {
        match ev {
            ImageEvent::Step { index, output } => out.entry(index).or_default().0.push(output),
            ImageEvent::Ended { index, reason } => out.entry(index).or_default().1 = Some(reason),
            ImageEvent::Failed { index, message } => panic!("image {index} failed: {message}"),
        }
    }
    out
}

fn final_image(steps: &[ImageOutput]) -> &RgbImage {
    steps.last().and_then(|o| o.image.as_ref()).expect("the last step carries the image")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn staggered_requests_batch_per_step_and_match_solo_runs() {
    let tok = ClipTokenizer::from_dir(&pipeline().join("tokenizer")).unwrap();
    let reqs = vec![
        request(&tok, "a red kiln", 1, 12, "ddim"),
        request(&tok, "a blue horse", 2, 8, "euler_a"),
        request(&tok, "the sea at night", 3, 10, "dpmpp_2m_karras"),
        // PNDM at the most steps allowed: 13 UNet calls, still one KV block (no preemption).
        request(&tok, "a tall tower", 4, 12, "pndm"),
    ];
    let solo_handle = start(false).await;
    let mut solo = Vec::new();
    for r in &reqs {
        let s = ImageStream::start(&solo_handle, vec![r.clone()]).await.unwrap();
        let ev = collect(s).await;
        solo.push(final_image(&ev[&0].0).clone());
    }
    solo_handle.stop();

    let handle = start(false).await;
    let mut tasks = Vec::new();
    for (i, r) in reqs.iter().cloned().enumerate() {
        let h = handle.clone();
        tasks.push(tokio::spawn(async move {
            // Later requests arrive while earlier ones are mid-schedule.
            tokio::time::sleep(Duration::from_millis(40 * i as u64)).await;
            collect(ImageStream::start(&h, vec![r]).await.unwrap()).await
        }));
    }
    for (i, t) in tasks.into_iter().enumerate() {
        let ev = t.await.unwrap();
        let (steps, end) = &ev[&0];
        assert_eq!(*end, None, "image {i} ended early");
        let total = steps[0].total;
        assert_eq!(steps.iter().map(|o| o.step).collect::<Vec<_>>(), (1..=total).collect::<Vec<_>>(), "image {i}");
        assert!(steps[..total - 1].iter().all(|o| o.image.is_none()));
        let img = final_image(steps);
        assert_eq!((img.width, img.height, img.data.len()), (32, 32, 32 * 32 * 3));
        assert!(img == &solo[i], "image {i}: batched pixels differ from the solo run");
    }
    let stats = handle.stats().await.unwrap();
    assert_eq!((stats.running, stats.waiting, stats.used_blocks), (0, 0, 0));
    // Fewer engine steps than the sum of the schedules: steps were shared.
    let total_steps: usize = 12 + 8 + 10 + 13; // PNDM runs one extra PLMS step
    assert!(stats.steps < total_steps as u64, "{} engine steps for {total_steps} denoising steps", stats.steps);
    assert_eq!(stats.preemptions, 0, "an image is never preempted (it would restart)");
    handle.stop();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn n_images_previews_img2img_and_a_refused_request() {
    let tok = ClipTokenizer::from_dir(&pipeline().join("tokenizer")).unwrap();
    let handle = start(true).await;
    let mut a = request(&tok, "a red kiln", 7, 6, "euler");
    a.preview_every = 2;
    let b = request(&tok, "a red kiln", 8, 6, "euler");
    let ev = collect(ImageStream::start(&handle, vec![a.clone(), b]).await.unwrap()).await;
    assert_eq!(ev.len(), 2);
    let previews: Vec<usize> = ev[&0].0.iter().filter(|o| o.preview.is_some()).map(|o| o.step).collect();
    assert_eq!(previews, vec![2, 4], "previews every 2 steps, none on the last");
    let p = ev[&0].0[1].preview.as_ref().unwrap();
    assert_eq!((p.width, p.height, p.data.len()), (16, 16, 16 * 16 * 3));
    assert!(ev[&1].0.iter().all(|o| o.preview.is_none()));
    assert_ne!(final_image(&ev[&0].0), final_image(&ev[&1].0), "different seeds, different images");
    // Same seed again: same image.
    let again = collect(ImageStream::start(&handle, vec![a.clone()]).await.unwrap()).await;
    assert_eq!(final_image(&again[&0].0), final_image(&ev[&0].0));

    // img2img from the generated image: floor(10 * 0.5) = 5 steps.
    let mut edit = request(&tok, "a red kiln at dawn", 9, 10, "ddim");
    edit.init_image = Some(InitImage { image: final_image(&ev[&0].0).clone(), strength: 0.5 });
    let out = collect(ImageStream::start(&handle, vec![edit.clone()]).await.unwrap()).await;
    assert_eq!(out[&0].0.len(), 5);
    assert_eq!(out[&0].0[0].total, 5);

    // strength too small to run a step: that image fails alone, the server goes on.
    edit.init_image.as_mut().unwrap().strength = 0.05;
    let out = collect(ImageStream::start(&handle, vec![edit, a]).await.unwrap()).await;
    assert_eq!(out[&0].1, Some(FinishReason::Error));
    assert!(out[&1].0.last().unwrap().image.is_some());
    handle.stop();
}

#[test]
fn warmup_measures_memory() {
    let mut engine = DiffusionEngine::load(&pipeline(), &options(true)).unwrap();
    engine.warmup().unwrap();
    let m = engine.memory();
    assert_eq!(m.weights, engine.info().num_params * 4);
    assert_eq!(engine.num_sequences(), 0, "the warm-up leaves no image behind");
    // Peak RSS growth is measurable only where Linux lets the high-water mark be reset.
    if kiln_models::memory::PeakProbe::start().is_some() {
        assert!(m.activations > 0);
    }
}
