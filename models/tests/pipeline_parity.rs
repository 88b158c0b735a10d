//! Whole Stable Diffusion pipelines against diffusers (fixtures of
//! tools/oracle/make_sd_pipeline_fixtures.py in tests/fixtures/sd-tiny): prompt and negative
//! prompt embeddings, the latents after every denoising step with classifier-free guidance
//! (five schedulers, epsilon and v-prediction, guidance off), img2img from an uploaded image,
//! and the decoded image. The jobs run through the engine's own code
//! ([`DiffusionPipeline::start_job`] / [`DiffusionPipeline::step_jobs`]) with diffusers'
//! recorded random draws fed back in. Then batch invariance: jobs started at different steps
//! and batched together end with the same latents and image as each alone.

mod common;

use std::collections::{HashMap, VecDeque};
use std::path::PathBuf;

use burn::backend::flex::FlexDevice;
use burn::backend::Flex;
use common::{max_abs, Reference};
use kiln_actors::{ImageRequest, InitImage, RgbImage};
use kiln_models::clip::ClipTokenizer;
use kiln_models::diffusion::{DiffusionInfo, DiffusionPipeline, ImageJob, NoiseRng, NoiseSource};
use kiln_models::DType;
use serde_json::Value;

/// Latents after each step: max abs difference relative to the reference's largest value
/// (the random UNet makes latents grow to ~80).
const LATENT_REL_TOL: f32 = 1e-4;
/// Prompt embeddings: max abs difference.
const EMBED_TOL: f32 = 1e-4;
/// Decoded image in [0, 1]: max abs difference.
const IMAGE_TOL: f32 = 1e-3;

fn fixtures() -> PathBuf {
    common::fixtures("sd-tiny")
}

fn expected() -> Value {
    serde_json::from_str(&std::fs::read_to_string(fixtures().join("pipeline_expected.json")).unwrap()).unwrap()
}

fn reference() -> Reference {
    Reference::load(&fixtures().join("pipeline_expected.safetensors"))
}

/// Recorded draws, handed out in order; a draw of the wrong size or one too many fails.
struct Recorded(VecDeque<Vec<f32>>);

impl NoiseSource for Recorded {
    fn normals(&mut self, n: usize) -> Vec<f32> {
        let v = self.0.pop_front().expect("the pipeline drew more noise than diffusers did");
        assert_eq!(v.len(), n, "draw of a different size than diffusers'");
        v
    }
}

/// The request name Kiln uses for a case's scheduler.
fn scheduler_name(case: &Value) -> Option<String> {
    let karras = case["scheduler_overrides"]["use_karras_sigmas"] == true;
    let base = match case["scheduler_class"].as_str().unwrap() {
        "DDIMScheduler" => "ddim",
        "PNDMScheduler" => return None, // the folder's own
        "EulerDiscreteScheduler" => "euler",
        "EulerAncestralDiscreteScheduler" => "euler_a",
        "DPMSolverMultistepScheduler" => "dpmpp_2m",
        other => panic!("unexpected scheduler {other}"),
    };
    Some(if karras { format!("{base}_karras") } else { base.to_string() })
}

struct Pipes {
    loaded: HashMap<String, (DiffusionPipeline<Flex>, DiffusionInfo, ClipTokenizer)>,
}

impl Pipes {
    fn new() -> Self {
        Pipes { loaded: HashMap::new() }
    }
    fn get(&mut self, name: &str) -> &(DiffusionPipeline<Flex>, DiffusionInfo, ClipTokenizer) {
        self.loaded.entry(name.to_string()).or_insert_with(|| {
            let dir = fixtures().join(name);
            (
                DiffusionPipeline::load(&dir, &FlexDevice, DType::F32).unwrap(),
                DiffusionInfo::from_dir(&dir).unwrap(),
                ClipTokenizer::from_dir(&dir.join("tokenizer")).unwrap(),
            )
        })
    }
}

/// The request of a case and the draws diffusers made, in the order Kiln draws them.
fn case_request(case: &Value, refs: &Reference, tok: &ClipTokenizer) -> (ImageRequest, VecDeque<Vec<f32>>) {
    let name = case["name"].as_str().unwrap();
    let negative = case["negative_prompt_as_encoded"].as_str().unwrap_or("");
    let (w, h) = (case["width"].as_u64().unwrap() as usize, case["height"].as_u64().unwrap() as usize);
    let mut draws = VecDeque::new();
    let init_image = if case["kind"] == "img2img" {
        let pixels = refs.f32s(&format!("{name}.init_pixels"));
        draws.push_back(refs.f32s(&format!("{name}.encoder_eps")));
        draws.push_back(refs.f32s(&format!("{name}.add_noise")));
        Some(InitImage {
            image: RgbImage { width: w, height: h, data: pixels.iter().map(|&x| x as u8).collect() },
            strength: case["strength"].as_f64().unwrap(),
        })
    } else {
        draws.push_back(refs.f32s(&format!("{name}.init_latents")));
        None
    };
    if let Some((noise, shape)) = refs.get(&format!("{name}.noise")) {
        let per = shape[1..].iter().product::<usize>();
        draws.extend(noise.chunks(per).map(<[f32]>::to_vec));
    }
    let req = ImageRequest {
        prompt_ids: tok.encode(case["prompt"].as_str().unwrap()).unwrap().0,
        negative_ids: tok.encode(negative).unwrap().0,
        width: w,
        height: h,
        steps: case["steps"].as_u64().unwrap() as usize,
        guidance_scale: case["guidance_scale"].as_f64().unwrap() as f32,
        scheduler: scheduler_name(case),
        seed: 0,
        init_image,
        preview_every: 0,
    };
    (req, draws)
}

fn unlimited(_: [usize; 3]) -> usize {
    64
}

#[test]
fn pipelines_match_diffusers_step_by_step() {
    let exp = expected();
    let refs = reference();
    let mut pipes = Pipes::new();
    let cases = exp["cases"].as_array().unwrap();
    assert_eq!(cases.len(), 7);
    for case in cases {
        let name = case["name"].as_str().unwrap();
        let (p, info, tok) = pipes.get(case["pipeline"].as_str().unwrap());
        let (req, draws) = case_request(case, &refs, tok);
        let mut job: ImageJob<Flex> = p.start_job(info, &req, Box::new(Recorded(draws))).unwrap();

        let want_ts: Vec<f32> =
            case["timesteps"].as_array().unwrap().iter().map(|t| t.as_f64().unwrap() as f32).collect();
        assert_eq!(job.timesteps(), want_ts, "{name}: timesteps");

        let (cond, uncond) = job.embeddings();
        let read = |t: &burn::tensor::Tensor<Flex, 3>| t.clone().into_data().into_vec::<f32>().unwrap();
        let d = max_abs(&read(cond), &refs.f32s(&format!("{name}.prompt_embeds")));
        assert!(d < EMBED_TOL, "{name}: prompt embeddings differ by {d}");
        match (uncond, case["classifier_free_guidance"].as_bool().unwrap()) {
            (Some(u), true) => {
                let d = max_abs(&read(u), &refs.f32s(&format!("{name}.negative_prompt_embeds")));
                assert!(d < EMBED_TOL, "{name}: negative embeddings differ by {d}");
            }
            (None, false) => {}
            (u, cfg) => panic!("{name}: unconditional branch {} but diffusers' CFG is {cfg}", u.is_some()),
        }
        if case["kind"] == "img2img" {
            let d = max_abs(job.latents(), &refs.f32s(&format!("{name}.init_latents")));
            let scale = refs.f32s(&format!("{name}.init_latents")).iter().fold(1f32, |m, x| m.max(x.abs()));
            assert!(d / scale < LATENT_REL_TOL, "{name}: noised init latents differ by {d}");
        }

        let (all, shape) = refs.get(&format!("{name}.latents")).unwrap();
        assert_eq!(shape[0], want_ts.len());
        let per = all.len() / shape[0];
        let mut last = None;
        for (i, want) in all.chunks(per).enumerate() {
            let out = p.step_jobs(&mut [&mut job], &unlimited).unwrap().remove(0);
            assert_eq!(out.output.step, i + 1, "{name}");
            assert_eq!(out.output.total, want_ts.len(), "{name}");
            assert_eq!(out.output.timestep, want_ts[i], "{name}");
            let scale = want.iter().fold(1f32, |m, x| m.max(x.abs()));
            let d = max_abs(job.latents(), want);
            assert!(d / scale < LATENT_REL_TOL, "{name}: latents after step {} differ by {d} (scale {scale})", i + 1);
            assert_eq!(out.finished, i + 1 == want_ts.len(), "{name}");
            last = Some(out);
        }
        assert!(job.is_done());

        // The image: NHWC in [0, 1] from diffusers; Kiln decodes [3, H, W].
        let want = refs.f32s(&format!("{name}.image"));
        let (w, h) = (req.width, req.height);
        let got = p.decode_jobs(&[&job]).unwrap().remove(0);
        let mut got_hwc = vec![0f32; got.len()];
        for c in 0..3 {
            for px in 0..w * h {
                got_hwc[px * 3 + c] = got[c * w * h + px];
            }
        }
        let d = max_abs(&got_hwc, &want);
        assert!(d < IMAGE_TOL, "{name}: image differs by {d}");
        // The 8-bit image the engine returned on the last step.
        let img = last.unwrap().output.image.expect("the last step returns the image");
        assert_eq!((img.width, img.height), (w, h));
        let worst =
            img.data.iter().zip(&want).map(|(&a, &b)| (a as f32 - (b * 255.0).round()).abs()).fold(0.0, f32::max);
        assert!(worst <= 1.0, "{name}: 8-bit image off by {worst} levels");
    }
}

/// Jobs of different schedulers, step counts, guidance and sizes, started at different steps
/// and run together, end exactly as each run alone.
#[test]
fn batching_jobs_at_different_steps_changes_nothing() {
    let mut pipes = Pipes::new();
    let (p, info, tok) = pipes.get("sd15");
    let req = |prompt: &str, scheduler: &str, steps: usize, g: f32, w: usize, h: usize| ImageRequest {
        prompt_ids: tok.encode(prompt).unwrap().0,
        negative_ids: tok.encode("").unwrap().0,
        width: w,
        height: h,
        steps,
        guidance_scale: g,
        scheduler: Some(scheduler.into()),
        seed: 0,
        init_image: None,
        preview_every: 0,
    };
    let reqs = [
        req("a red kiln", "ddim", 5, 7.5, 32, 32),
        req("a blue horse", "euler_a", 4, 5.0, 32, 32),
        req("the sea at night", "dpmpp_2m_karras", 6, 1.0, 32, 32),
        req("a tall tower", "pndm", 4, 3.0, 24, 40),
    ];
    let solo: Vec<Vec<f32>> = reqs
        .iter()
        .enumerate()
        .map(|(i, r)| {
            let mut job = p.start_job(info, r, Box::new(NoiseRng::new(i as u64))).unwrap();
            while !job.is_done() {
                p.step_jobs(&mut [&mut job], &unlimited).unwrap();
            }
            job.latents().to_vec()
        })
        .collect();
    // Job k joins at tick k; each tick steps every running job in one call.
    let mut jobs: Vec<Option<ImageJob<Flex>>> = (0..reqs.len()).map(|_| None).collect();
    let mut finished: Vec<Option<Vec<f32>>> = vec![None; reqs.len()];
    let mut batched_sizes = Vec::new();
    for tick in 0.. {
        if tick < reqs.len() {
            jobs[tick] = Some(p.start_job(info, &reqs[tick], Box::new(NoiseRng::new(tick as u64))).unwrap());
        }
        let mut running: Vec<(usize, &mut ImageJob<Flex>)> =
            jobs.iter_mut().enumerate().filter_map(|(i, j)| j.as_mut().map(|j| (i, j))).collect();
        if running.is_empty() {
            break;
        }
        batched_sizes.push(running.len());
        let idx: Vec<usize> = running.iter().map(|(i, _)| *i).collect();
        let mut refs: Vec<&mut ImageJob<Flex>> = running.iter_mut().map(|(_, j)| &mut **j).collect();
        let out = p.step_jobs(&mut refs, &unlimited).unwrap();
        for (i, o) in idx.into_iter().zip(out) {
            if o.finished {
                finished[i] = Some(jobs[i].take().unwrap().latents().to_vec());
            }
        }
    }
    assert!(batched_sizes.iter().any(|&n| n >= 3), "jobs overlapped: {batched_sizes:?}");
    for (i, (alone, together)) in solo.iter().zip(&finished).enumerate() {
        let together = together.as_ref().unwrap();
        let scale = alone.iter().fold(1f32, |m, x| m.max(x.abs()));
        let d = max_abs(alone, together);
        assert!(d / scale < 1e-5, "job {i}: batched latents differ by {d}");
    }
}
