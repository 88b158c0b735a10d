//! kiln-actors: the actor system of Kiln — supervisor, per-model batcher actors with their engine
//! threads, per-request actors — and the pure scheduling state they drive (KV block pool,
//! continuous-batching scheduler, sampling, incremental detokenization). No HTTP, no Burn.

pub mod batcher;
pub mod detok;
pub mod embed;
pub mod engine;
pub mod image;
pub mod kv;
pub mod ledger;
pub mod metrics;
pub mod request;
pub mod sampling;
pub mod scheduler;
pub mod speech;
pub mod supervisor;
pub mod text;

pub use batcher::{
    spawn_batcher, BatcherConfig, BatcherHandle, BatcherStats, FailureHook, FaultSwitch, MemoryPlan, SeqEvent,
    SubmitError,
};
pub use detok::Detokenize;
pub use embed::{embed_inputs, EmbedError, EmbedOutput, EmbedRequest};
pub use engine::{Engine, EngineError, EngineSpec, FinishReason, ScheduledSeq, SeqId, SeqOutput, SeqRequest, StepPlan};
pub use image::{img2img_steps, ImageEvent, ImageOutput, ImageRequest, ImageStream, InitImage, RgbImage};
pub use ledger::{DeviceLedger, MemoryBytes, MemoryKind, OutOfMemory, Reservation};
pub use metrics::{Metrics, ModelMetrics};
pub use request::{start_generation, ClientEvent, Generation, TopLogprob};
pub use sampling::Sampler;
pub use speech::{SpeechEvent, SpeechOutput, SpeechRequest, SpeechSampling, SpeechStream};
pub use supervisor::{BatcherHealth, SupervisorHandle};
pub use text::{SamplingParams, TextRequest, TokenOutput};
