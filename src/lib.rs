//! The Kiln server: configuration, model wiring, the OpenAI-compatible HTTP API and the
//! WebSocket protocol. Request path: `api` (routes, wire types) → `validation` (wire →
//! `Valid*`) → `backend` (the per-model batcher handle of kiln-actors).

pub mod api;
pub mod backend;
pub mod bench;
pub mod bench_images;
pub mod bench_speech;
pub mod config;
pub mod corpus;
pub mod error;
pub mod image_store;
pub mod index;
pub mod pca;
pub mod plan;
pub mod server;
pub mod upload;
pub mod validation;
pub mod ws;

#[doc(hidden)]
pub mod testing;

pub use api::app;
pub use config::Config;
pub use error::ApiError;
pub use server::AppState;
