//! The Stable Diffusion UNet and VAE against diffusers (fixtures of
//! tools/oracle/make_sd_fixtures.py in tests/fixtures/sd-tiny): the tiny SD 1.5-like (conv
//! projections) and SD 2-like (linear projections, heads per block) `UNet2DConditionModel`s on
//! a batch of two latents at different timesteps, each item alone against its row of the batch,
//! and the `AutoencoderKL`'s decode and encode.

mod common;

use common::{max_abs, Reference};
use std::path::PathBuf;

use burn::backend::Flex;
use burn::tensor::{Tensor, TensorData};
use kiln_models::unet::UNet2DConditionModel;
use kiln_models::vae::AutoencoderKL;
use kiln_models::DType;

/// UNet output: max abs difference allowed (measured worst 1.1e-6, outputs up to 2 in magnitude).
const UNET_TOL: f32 = 1e-5;
/// An item alone against its row of the batch.
const BATCH_TOL: f32 = 1e-5;
/// VAE decoded image and encoder mean / log-variance (measured worst 1.2e-6).
const VAE_TOL: f32 = 1e-5;

fn fixtures() -> PathBuf {
    common::fixtures("sd-tiny")
}

/// A named float32 tensor of unet_vae_expected.safetensors, flattened, with its shape.
fn reference(name: &str) -> (Vec<f32>, Vec<usize>) {
    Reference::load(&fixtures().join("unet_vae_expected.safetensors"))
        .get(name)
        .unwrap_or_else(|| panic!("{name} missing"))
}

fn tensor<const D: usize>(name: &str) -> Tensor<Flex, D> {
    let (v, shape) = reference(name);
    Tensor::from_data(TensorData::new(v, shape), &Default::default())
}

fn values<const D: usize>(t: Tensor<Flex, D>) -> Vec<f32> {
    t.into_data().into_vec::<f32>().unwrap()
}

#[test]
fn unet_matches_diffusers_per_item_timesteps_and_is_batch_invariant() {
    let dev = Default::default();
    let latents = tensor::<4>("latents");
    let context = tensor::<3>("encoder_hidden_states");
    let (timesteps, _) = reference("timesteps");
    assert_ne!(timesteps[0], timesteps[1], "the fixture must batch two different timesteps");
    let mut worst = 0.0f32;
    for pipe in ["sd15", "sd21"] {
        let unet = UNet2DConditionModel::<Flex>::from_dir(&fixtures().join(pipe).join("unet"), &dev, DType::F32)
            .unwrap_or_else(|e| panic!("{pipe}: {e}"));
        let (want, shape) = reference(&format!("{pipe}.unet"));
        let got = values(unet.forward(latents.clone(), &timesteps, &context).unwrap());
        let d = max_abs(&got, &want);
        eprintln!(
            "{pipe} UNet: max abs diff {d:e} (output max abs {:e})",
            want.iter().fold(0f32, |m, x| m.max(x.abs()))
        );
        worst = worst.max(d);
        assert!(d <= UNET_TOL, "{pipe} UNet: max abs diff {d:e} > {UNET_TOL:e}");

        // Each item alone (its own timestep) gives its row of the batch.
        let row = shape[1..].iter().product::<usize>();
        for i in 0..2 {
            let alone = unet
                .forward(latents.clone().narrow(0, i, 1), &timesteps[i..=i], &context.clone().narrow(0, i, 1))
                .unwrap();
            let d = max_abs(&values(alone), &got[i * row..(i + 1) * row]);
            assert!(d <= BATCH_TOL, "{pipe} item {i}: alone vs batched differ by {d:e}");
        }
        // The timestep matters: item 0 at item 1's timestep is not item 0's output.
        let swapped = values(unet.forward(latents.clone(), &[timesteps[1], timesteps[0]], &context).unwrap());
        assert!(max_abs(&swapped, &got) > 100.0 * UNET_TOL, "{pipe}: timesteps have no effect");

        assert!(unet.forward(latents.clone(), &timesteps[..1], &context).is_err(), "one timestep for two items");
        assert!(unet.forward(latents.clone().narrow(2, 0, 15), &timesteps, &context).is_err(), "odd height");
    }
    eprintln!("UNet: worst max abs diff {worst:e}");
}

#[test]
fn vae_decode_and_encode_match_diffusers() {
    let dev = Default::default();
    let vae = AutoencoderKL::<Flex>::from_dir(&fixtures().join("vae"), &dev, DType::F32).unwrap();
    assert_eq!(vae.cfg.scaling_factor, 0.18215);
    let (want, shape) = reference("vae.decoded");
    let got = vae.decode_latents(tensor::<4>("latents")).unwrap();
    assert_eq!(got.dims().to_vec(), shape);
    let d = max_abs(&values(got), &want);
    eprintln!("VAE decode: max abs diff {d:e}");
    assert!(d <= VAE_TOL, "VAE decode: max abs diff {d:e} > {VAE_TOL:e}");

    let (mean, logvar) = vae.encode(tensor::<4>("vae.image")).unwrap();
    let dm = max_abs(&values(mean), &reference("vae.encoded_mean").0);
    let dl = max_abs(&values(logvar), &reference("vae.encoded_logvar").0);
    eprintln!("VAE encode: mean max abs diff {dm:e}, logvar {dl:e}");
    assert!(dm <= VAE_TOL && dl <= VAE_TOL, "VAE encode: mean {dm:e}, logvar {dl:e} > {VAE_TOL:e}");

    assert!(vae.decode(tensor::<4>("vae.image")).is_err(), "3-channel latents");
    assert!(vae.encode(tensor::<4>("vae.image").narrow(3, 0, 31)).is_err(), "odd width");
}
