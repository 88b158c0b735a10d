//! HuggingFace tokenizer folder: tokenizer.json, tokenizer_config.json (chat template,
//! special tokens), generation_config.json. (in progress)

use std::path::Path;

use crate::LoadError;

/// One chat message as the template sees it.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct ChatMessage {
    pub role: String,
    pub content: String,
}

pub struct HfTokenizer {}

impl HfTokenizer {
    pub fn load(_dir: &Path) -> Result<Self, LoadError> {
        todo!()
    }
}
