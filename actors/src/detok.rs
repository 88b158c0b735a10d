//! Incremental detokenization: turns a growing list of token ids into text deltas that never
//! split a UTF-8 character, plus stop-string matching across token boundaries.

/// What the request actor needs from a tokenizer.
pub trait Detokenize: Send + Sync + 'static {
    /// Decodes ids to text, skipping special tokens.
    fn decode(&self, ids: &[u32]) -> String;
    /// The text of one token as shown in logprobs (special tokens included).
    fn token_text(&self, id: u32) -> String;
}
