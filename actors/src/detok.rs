//! Incremental detokenization: turns a growing list of token ids into text deltas that never
//! split a UTF-8 character, plus stop-string matching across token boundaries.

/// What the request actor needs from a tokenizer.
pub trait Detokenize: Send + Sync + 'static {
    /// Decodes ids to text, skipping special tokens.
    fn decode(&self, ids: &[u32]) -> String;
    /// The text of one token as shown in logprobs (special tokens included).
    fn token_text(&self, id: u32) -> String;
}

impl Detokenize for tokenizers::Tokenizer {
    fn decode(&self, ids: &[u32]) -> String {
        (**self).decode(ids, true).unwrap_or_default()
    }

    fn token_text(&self, id: u32) -> String {
        (**self).decode(&[id], false).unwrap_or_default()
    }
}

/// Prompt tokens kept as decoding context by [`IncrementalDecoder::with_context`] (vLLM's
/// initial incremental detokenization offset).
pub const CONTEXT_TOKENS: usize = 5;

/// Undecodable tokens (text ending in U+FFFD) waited for at most: a UTF-8 character has at most
/// 4 bytes, so beyond this the replacement character is genuine and is emitted.
const MAX_PENDING_TOKENS: usize = 8;

const REPLACEMENT: char = '\u{FFFD}';

/// Incremental detokenizer (the TGI/vLLM prefix-offset algorithm).
///
/// Keeps a small window of ids: `ids[prefix_offset..read_offset]` is text already emitted, kept
/// as context so that the decoder's handling of the window's start (leading spaces, merges) is
/// the same in both decodes; `ids[read_offset..]` is not yet emitted. Each `push` decodes the
/// window twice and emits the difference, so the cost per token does not grow with the length.
#[derive(Debug, Clone, Default)]
pub struct IncrementalDecoder {
    /// The window; ids before it are dropped.
    ids: Vec<u32>,
    prefix_offset: usize,
    read_offset: usize,
}

impl IncrementalDecoder {
    /// A decoder with no context: the first token is decoded as the start of a text.
    pub fn new() -> Self {
        Self::default()
    }

    /// A decoder continuing `prompt`: its last [`CONTEXT_TOKENS`] tokens are context (never
    /// emitted), so e.g. the leading space of the first generated word is kept.
    pub fn with_context(prompt: &[u32]) -> Self {
        let tail = &prompt[prompt.len().saturating_sub(CONTEXT_TOKENS)..];
        IncrementalDecoder { ids: tail.to_vec(), prefix_offset: 0, read_offset: tail.len() }
    }

    /// Adds one generated token; returns the new text (possibly empty while a character is
    /// incomplete). Never ends in a partial UTF-8 sequence.
    pub fn push(&mut self, detok: &dyn Detokenize, token: u32) -> String {
        self.ids.push(token);
        self.emit(detok, false)
    }

    /// Flushes what is still held back (an incomplete character at the end of the sequence
    /// comes out as U+FFFD, as in `decode` of all ids).
    pub fn finish(&mut self, detok: &dyn Detokenize) -> String {
        self.emit(detok, true)
    }

    /// Tokens pushed whose text has not been emitted yet.
    pub fn pending_tokens(&self) -> usize {
        self.ids.len() - self.read_offset
    }

    fn emit(&mut self, detok: &dyn Detokenize, force: bool) -> String {
        if self.read_offset >= self.ids.len() {
            return String::new();
        }
        let prefix_text = if self.prefix_offset < self.read_offset {
            detok.decode(&self.ids[self.prefix_offset..self.read_offset])
        } else {
            String::new()
        };
        let new_text = detok.decode(&self.ids[self.prefix_offset..]);
        if new_text.len() <= prefix_text.len() {
            // Nothing new yet (e.g. a skipped special token, or a partial character that
            // replaces an earlier partial one).
            return String::new();
        }
        if !force && new_text.ends_with(REPLACEMENT) && self.pending_tokens() < MAX_PENDING_TOKENS {
            return String::new();
        }
        let delta = suffix_after(&new_text, &prefix_text).to_string();
        self.prefix_offset = self.read_offset;
        self.read_offset = self.ids.len();
        // Keep only the window.
        self.ids.drain(..self.prefix_offset);
        self.read_offset -= self.prefix_offset;
        self.prefix_offset = 0;
        delta
    }
}

/// The part of `new` after `prefix` (the decode of the already-emitted window).
fn suffix_after<'a>(new: &'a str, prefix: &str) -> &'a str {
    if let Some(rest) = new.strip_prefix(prefix) {
        return rest;
    }
    // The context ended in a partial character that the new token completed.
    let trimmed = prefix.trim_end_matches(REPLACEMENT);
    if let Some(rest) = new.strip_prefix(trimmed) {
        return rest;
    }
    // The decoder rewrote the window: cut at the same length, on a character boundary.
    let mut i = prefix.len().min(new.len());
    while !new.is_char_boundary(i) {
        i += 1;
    }
    &new[i..]
}

/// What [`StopMatcher::push`] lets through.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct StopResult {
    /// Text safe to send now. On a match: the text before the stop string.
    pub emit: String,
    /// A stop string matched: the sequence must end (the stop string is not emitted).
    pub stopped: bool,
}

/// Finds stop strings in streamed text, holding back any tail that could be the start of one so
/// that a stop string split across tokens is never partially emitted.
#[derive(Debug, Clone, Default)]
pub struct StopMatcher {
    stops: Vec<String>,
    held: String,
    matched: Option<usize>,
}

impl StopMatcher {
    /// Empty stop strings are ignored; no stop strings means pass-through.
    pub fn new(stops: Vec<String>) -> Self {
        let stops = stops.into_iter().filter(|s| !s.is_empty()).collect();
        StopMatcher { stops, held: String::new(), matched: None }
    }

    /// Whether there is anything to match.
    pub fn is_empty(&self) -> bool {
        self.stops.is_empty()
    }

    /// Feeds a text delta. After a match, every later call returns nothing and `stopped`.
    pub fn push(&mut self, delta: &str) -> StopResult {
        if self.matched.is_some() {
            return StopResult { emit: String::new(), stopped: true };
        }
        if self.stops.is_empty() {
            return StopResult { emit: delta.to_string(), stopped: false };
        }
        self.held.push_str(delta);

        // Earliest match wins (same start: the first listed).
        let mut best: Option<(usize, usize)> = None;
        for (i, s) in self.stops.iter().enumerate() {
            if let Some(pos) = self.held.find(s.as_str()) {
                if best.is_none_or(|(bp, _)| pos < bp) {
                    best = Some((pos, i));
                }
            }
        }
        if let Some((pos, i)) = best {
            self.held.truncate(pos);
            self.matched = Some(i);
            return StopResult { emit: std::mem::take(&mut self.held), stopped: true };
        }

        let cut = self.held.len() - self.hold_len();
        let emit: String = self.held.drain(..cut).collect();
        StopResult { emit, stopped: false }
    }

    /// Releases the held-back text when the sequence ends for another reason (nothing after a
    /// match).
    pub fn flush(&mut self) -> String {
        std::mem::take(&mut self.held)
    }

    /// Whether a stop string matched.
    pub fn stopped(&self) -> bool {
        self.matched.is_some()
    }

    /// The stop string that matched.
    pub fn matched(&self) -> Option<&str> {
        self.matched.map(|i| self.stops[i].as_str())
    }

    /// Bytes of text currently held back.
    pub fn held_len(&self) -> usize {
        self.held.len()
    }

    /// Longest tail of `held` that is a proper prefix of some stop string.
    fn hold_len(&self) -> usize {
        let mut hold = 0;
        for s in &self.stops {
            let max = (s.len() - 1).min(self.held.len());
            for k in (hold + 1..=max).rev() {
                if s.is_char_boundary(k) && self.held.as_bytes().ends_with(&s.as_bytes()[..k]) {
                    hold = k;
                    break;
                }
            }
        }
        hold
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};

    /// Byte-level vocabulary: ids 0..256 are bytes, 256 is a special `<eos>` token.
    struct ByteVocab {
        max_window: AtomicUsize,
    }

    const EOS: u32 = 256;

    impl ByteVocab {
        fn new() -> Self {
            ByteVocab { max_window: AtomicUsize::new(0) }
        }
        fn encode(s: &str) -> Vec<u32> {
            s.bytes().map(u32::from).collect()
        }
    }

    impl Detokenize for ByteVocab {
        fn decode(&self, ids: &[u32]) -> String {
            self.max_window.fetch_max(ids.len(), Ordering::Relaxed);
            let bytes: Vec<u8> = ids.iter().filter(|&&i| i < 256).map(|&i| i as u8).collect();
            String::from_utf8_lossy(&bytes).into_owned()
        }
        fn token_text(&self, id: u32) -> String {
            if id == EOS {
                "<eos>".into()
            } else {
                String::from_utf8_lossy(&[id as u8]).into_owned()
            }
        }
    }

    /// Byte-level BPE-like vocabulary of arbitrary byte pieces.
    struct PieceVocab {
        pieces: Vec<Vec<u8>>,
    }

    impl PieceVocab {
        /// Splits `text` into pieces of the given sizes (cycled), each a token.
        fn split(text: &str, sizes: &[usize]) -> (Self, Vec<u32>) {
            let b = text.as_bytes();
            let mut pieces = Vec::new();
            let mut i = 0;
            let mut j = 0;
            while i < b.len() {
                let n = sizes[j % sizes.len()].min(b.len() - i);
                pieces.push(b[i..i + n].to_vec());
                i += n;
                j += 1;
            }
            let ids = (0..pieces.len() as u32).collect();
            (PieceVocab { pieces }, ids)
        }
    }

    impl Detokenize for PieceVocab {
        fn decode(&self, ids: &[u32]) -> String {
            let bytes: Vec<u8> = ids.iter().flat_map(|&i| self.pieces[i as usize].clone()).collect();
            String::from_utf8_lossy(&bytes).into_owned()
        }
        fn token_text(&self, id: u32) -> String {
            String::from_utf8_lossy(&self.pieces[id as usize]).into_owned()
        }
    }

    /// SentencePiece-like: "▁" is a space, and the decoder drops the leading space of a text.
    struct SpVocab {
        words: Vec<&'static str>,
    }

    impl Detokenize for SpVocab {
        fn decode(&self, ids: &[u32]) -> String {
            let s: String = ids.iter().map(|&i| self.words[i as usize].replace('▁', " ")).collect();
            s.strip_prefix(' ').map(str::to_string).unwrap_or(s)
        }
        fn token_text(&self, id: u32) -> String {
            self.words[id as usize].to_string()
        }
    }

    fn run(detok: &dyn Detokenize, dec: &mut IncrementalDecoder, ids: &[u32]) -> Vec<String> {
        let mut out: Vec<String> = ids.iter().map(|&t| dec.push(detok, t)).collect();
        out.push(dec.finish(detok));
        out
    }

    const TEXT: &str = "héllo wörld 你好 🎉";

    #[test]
    fn byte_tokens_never_split_characters() {
        let v = ByteVocab::new();
        let ids = ByteVocab::encode(TEXT);
        let mut dec = IncrementalDecoder::new();
        let deltas = run(&v, &mut dec, &ids);
        for d in &deltas {
            assert!(!d.contains(REPLACEMENT), "{deltas:?}");
        }
        // The decode window stays small.
        assert!(v.max_window.load(Ordering::Relaxed) <= 6, "{:?}", v.max_window);
        assert_eq!(deltas.concat(), v.decode(&ids));
        assert_eq!(deltas.concat(), TEXT);
        // "🎉" is 4 byte tokens: three empty deltas then the character.
        let n = deltas.len();
        assert_eq!(&deltas[n - 5..], &["", "", "", "🎉", ""]);
    }

    #[test]
    fn multibyte_pieces_in_every_split() {
        for sizes in [&[1usize][..], &[2], &[3], &[5], &[2, 3], &[1, 4, 2], &[7, 1]] {
            let (v, ids) = PieceVocab::split(TEXT, sizes);
            let mut dec = IncrementalDecoder::new();
            let deltas = run(&v, &mut dec, &ids);
            for d in &deltas {
                assert!(!d.contains(REPLACEMENT), "{sizes:?}: {deltas:?}");
            }
            assert_eq!(deltas.concat(), TEXT, "{sizes:?}");
        }
    }

    #[test]
    fn long_output_is_windowed() {
        let v = ByteVocab::new();
        let text = TEXT.repeat(200);
        let ids = ByteVocab::encode(&text);
        let mut dec = IncrementalDecoder::new();
        assert_eq!(run(&v, &mut dec, &ids).concat(), text);
        assert!(v.max_window.load(Ordering::Relaxed) <= 6);
        assert!(dec.ids.len() <= 6);
    }

    #[test]
    fn finish_flushes_an_incomplete_character() {
        let v = ByteVocab::new();
        let mut ids = ByteVocab::encode("a");
        ids.extend_from_slice(&ByteVocab::encode("🎉")[..2]);
        let mut dec = IncrementalDecoder::new();
        let deltas = run(&v, &mut dec, &ids);
        assert_eq!(deltas, vec!["a", "", "", "\u{FFFD}"]);
        assert_eq!(deltas.concat(), v.decode(&ids));
    }

    #[test]
    fn genuine_invalid_bytes_are_not_held_forever() {
        let v = ByteVocab::new();
        let ids = vec![0xFF; 20];
        let mut dec = IncrementalDecoder::new();
        let deltas = run(&v, &mut dec, &ids);
        assert_eq!(deltas.concat(), v.decode(&ids));
        assert!(deltas[..12].iter().any(|d| !d.is_empty()));
    }

    #[test]
    fn special_tokens_are_skipped() {
        let v = ByteVocab::new();
        let mut ids = ByteVocab::encode("hi");
        ids.push(EOS);
        ids.extend(ByteVocab::encode("é"));
        let mut dec = IncrementalDecoder::new();
        let deltas = run(&v, &mut dec, &ids);
        assert_eq!(deltas, vec!["h", "i", "", "", "é", ""]);
        assert_eq!(v.token_text(EOS), "<eos>");
    }

    #[test]
    fn leading_spaces_are_kept() {
        let v = SpVocab { words: vec!["▁Hello", "▁world", "!", "▁The"] };
        let ids = [0, 1, 2];
        let mut dec = IncrementalDecoder::new();
        let deltas = run(&v, &mut dec, &ids);
        assert_eq!(deltas, vec!["Hello", " world", "!", ""]);
        assert_eq!(deltas.concat(), v.decode(&ids));
        // Per-token decoding would lose the spaces.
        let naive: String = ids.iter().map(|&i| v.decode(&[i])).collect();
        assert_eq!(naive, "Helloworld!");
        // With prompt context, the first generated word keeps its space.
        let mut dec = IncrementalDecoder::with_context(&[3]);
        assert_eq!(run(&v, &mut dec, &[1, 2]), vec![" world", "!", ""]);
        let mut dec = IncrementalDecoder::with_context(&[3; 20]);
        assert_eq!(dec.ids.len(), CONTEXT_TOKENS);
        assert_eq!(run(&v, &mut dec, &[0]), vec![" Hello", ""]);
    }

    fn feed(m: &mut StopMatcher, parts: &[&str]) -> (String, bool) {
        let mut out = String::new();
        for p in parts {
            let r = m.push(p);
            out.push_str(&r.emit);
            if r.stopped {
                return (out, true);
            }
        }
        out.push_str(&m.flush());
        (out, false)
    }

    #[test]
    fn stop_split_across_tokens() {
        let mut m = StopMatcher::new(vec!["ab".into()]);
        assert_eq!(m.push("xa"), StopResult { emit: "x".into(), stopped: false });
        assert_eq!(m.held_len(), 1);
        assert_eq!(m.push("b"), StopResult { emit: "".into(), stopped: true });
        assert!(m.stopped());
        assert_eq!(m.matched(), Some("ab"));
        assert_eq!(m.push("more"), StopResult { emit: "".into(), stopped: true });
        assert_eq!(m.flush(), "");
    }

    #[test]
    fn stop_at_the_very_start() {
        let mut m = StopMatcher::new(vec!["STOP".into()]);
        assert_eq!(feed(&mut m, &["STOP", "after"]), ("".into(), true));
        let mut m = StopMatcher::new(vec!["STOP".into()]);
        assert_eq!(feed(&mut m, &["S", "T", "O", "P"]), ("".into(), true));
    }

    #[test]
    fn overlapping_candidates() {
        let mut m = StopMatcher::new(vec!["ab".into()]);
        assert_eq!(m.push("a"), StopResult { emit: "".into(), stopped: false });
        // "aa": the first 'a' cannot start "ab" any more, the second can.
        assert_eq!(m.push("a"), StopResult { emit: "a".into(), stopped: false });
        assert_eq!(m.push("b"), StopResult { emit: "".into(), stopped: true });
        let mut m = StopMatcher::new(vec!["ab".into()]);
        assert_eq!(feed(&mut m, &["aab"]), ("a".into(), true));
        // Self-overlapping stop string.
        let mut m = StopMatcher::new(vec!["aab".into()]);
        assert_eq!(feed(&mut m, &["a", "a", "a", "b", "c"]), ("a".into(), true));
    }

    #[test]
    fn multiple_stops_earliest_wins() {
        let mut m = StopMatcher::new(vec!["world".into(), "lo".into()]);
        assert_eq!(feed(&mut m, &["hello world"]), ("hel".into(), true));
        assert_eq!(m.matched(), Some("lo"));
        let mut m = StopMatcher::new(vec!["cd".into(), "bcx".into(), "b".into()]);
        assert_eq!(feed(&mut m, &["a", "bcd"]), ("a".into(), true));
        assert_eq!(m.matched(), Some("b"));
        let mut m = StopMatcher::new(vec!["\n\n".into(), "END".into()]);
        assert_eq!(feed(&mut m, &["line\n", "E", "N", "D\n\n"]), ("line\n".into(), true));
        assert_eq!(m.matched(), Some("END"));
    }

    #[test]
    fn held_back_text_is_released_without_match() {
        let mut m = StopMatcher::new(vec!["abc".into()]);
        assert_eq!(m.push("xab"), StopResult { emit: "x".into(), stopped: false });
        assert_eq!(m.push("d"), StopResult { emit: "abd".into(), stopped: false });
        assert_eq!(m.push("ab"), StopResult { emit: "".into(), stopped: false });
        assert_eq!(m.flush(), "ab");
        assert_eq!(m.flush(), "");
        let mut m = StopMatcher::new(vec!["abc".into()]);
        assert_eq!(feed(&mut m, &["a", "b", "x", "a"]), ("abxa".into(), false));
    }

    #[test]
    fn multibyte_stop_strings() {
        let mut m = StopMatcher::new(vec!["你好".into()]);
        assert_eq!(feed(&mut m, &["héllo ", "你", "好", "!"]), ("héllo ".into(), true));
        let mut m = StopMatcher::new(vec!["🎉🎉".into()]);
        assert_eq!(feed(&mut m, &["a🎉", "b🎉"]), ("a🎉b🎉".into(), false));
    }

    #[test]
    fn no_stops_is_pass_through() {
        let mut m = StopMatcher::new(vec![]);
        assert!(m.is_empty());
        assert_eq!(m.push("ab"), StopResult { emit: "ab".into(), stopped: false });
        assert_eq!(m.held_len(), 0);
        let mut m = StopMatcher::new(vec![String::new()]);
        assert!(m.is_empty());
        assert_eq!(m.push("x"), StopResult { emit: "x".into(), stopped: false });
    }

    #[test]
    fn decoder_and_matcher_together() {
        // Stop string "wö" split inside the multibyte 'ö' byte tokens.
        let v = ByteVocab::new();
        let ids = ByteVocab::encode(TEXT);
        let mut dec = IncrementalDecoder::new();
        let mut m = StopMatcher::new(vec!["wö".into()]);
        let mut out = String::new();
        let mut stopped = false;
        for &t in &ids {
            let r = m.push(&dec.push(&v, t));
            out.push_str(&r.emit);
            if r.stopped {
                stopped = true;
                break;
            }
        }
        assert!(stopped);
        assert_eq!(out, "héllo ");
    }
}
