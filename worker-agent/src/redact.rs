//! Masks secret values in a run's output before it leaves the host: every chunk bound for
//! the live log (`PushLogs`) and the completion report's output tail passes through here.
//!
//! For each value (tenant secrets and host pass-through values) the masked forms are:
//! - the value itself, and each line of a multi-line value (`\n` or `\r\n`);
//! - its base64 in the standard and URL-safe alphabets, with and without `=` padding;
//! - its base64 inside longer base64 text, at each of the 3 byte alignments: the characters
//!   that depend only on the value (the first 0, 2 or 3 characters and the partial last group
//!   depend on neighbouring bytes and are left as they are);
//! - its URL (percent-) encoding: every non-alphanumeric byte encoded, the RFC 3986 form
//!   that keeps `-._~`, and every byte encoded, each with upper- and lower-case hex, and the
//!   form encoding with `+` for spaces. (Not covered: URL encodings that leave other
//!   characters as they are, hex dumps, or any other transformation of a value.)
//!
//! A form (or a line) shorter than [`MIN_SECRET_VALUE_BYTES`] is not masked on its own, so a
//! short value never blanks innocent text; PutSecret refuses such tenant secrets, and a short
//! host value is delivered but not masked (the agent warns in its own log). Overlapping
//! occurrences are masked as one span. Each occurrence becomes [`MASK`].
//!
//! Matches split across chunks are caught: per stream, the end of the output that could be the
//! beginning of a form is held back until the next chunk (or the end of the stream) decides.

use std::collections::{BTreeSet, VecDeque};
use std::fmt;
use std::sync::Arc;

use aho_corasick::{AhoCorasick, MatchKind};
use base64::Engine;
use base64::engine::general_purpose::{STANDARD, STANDARD_NO_PAD, URL_SAFE, URL_SAFE_NO_PAD};
use drover_core::spec::MIN_SECRET_VALUE_BYTES;
use futures::StreamExt;
use percent_encoding::{AsciiSet, NON_ALPHANUMERIC, utf8_percent_encode};

use crate::executor::{OutputChunk, OutputSource, OutputStream};

/// What every occurrence is replaced with.
pub const MASK: &[u8] = b"[REDACTED]";

/// RFC 3986 component encoding: everything but unreserved characters.
const COMPONENT: &AsciiSet = &NON_ALPHANUMERIC
    .remove(b'-')
    .remove(b'.')
    .remove(b'_')
    .remove(b'~');

#[derive(Debug, thiserror::Error)]
#[error("cannot build the log redactor: {0}")]
pub struct RedactError(#[from] aho_corasick::BuildError);

/// The patterns of a set of secret values, compiled once per job.
pub struct Redactor {
    searcher: Option<AhoCorasick>,
    patterns: Vec<Vec<u8>>,
    /// First bytes of the patterns, to find quickly where a held-back suffix may start.
    first_bytes: [bool; 256],
    max_len: usize,
}

impl fmt::Debug for Redactor {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Redactor")
            .field("patterns", &self.patterns.len())
            .field("max_len", &self.max_len)
            .finish()
    }
}

impl Default for Redactor {
    fn default() -> Self {
        Self::none()
    }
}

impl Redactor {
    /// Masks nothing.
    pub fn none() -> Self {
        Self {
            searcher: None,
            patterns: Vec::new(),
            first_bytes: [false; 256],
            max_len: 0,
        }
    }

    pub fn new<'a>(values: impl IntoIterator<Item = &'a str>) -> Result<Self, RedactError> {
        let mut set = BTreeSet::new();
        for value in values {
            forms(value, &mut set);
        }
        let patterns: Vec<Vec<u8>> = set.into_iter().collect();
        if patterns.is_empty() {
            return Ok(Self::none());
        }
        let searcher = AhoCorasick::builder()
            .match_kind(MatchKind::Standard)
            .build(&patterns)?;
        let mut first_bytes = [false; 256];
        for p in &patterns {
            first_bytes[usize::from(p[0])] = true;
        }
        let max_len = patterns.iter().map(Vec::len).max().unwrap_or(0);
        Ok(Self {
            searcher: Some(searcher),
            patterns,
            first_bytes,
            max_len,
        })
    }

    /// True when there is nothing to mask.
    pub fn is_empty(&self) -> bool {
        self.searcher.is_none()
    }

    /// `data` with every occurrence masked (a complete text, e.g. a reason).
    pub fn redact(&self, data: &[u8]) -> Vec<u8> {
        let (out, _) = self.redact_prefix(data, data.len());
        out
    }

    /// Like [`Redactor::redact`], for text.
    pub fn redact_str(&self, text: &str) -> String {
        if self.is_empty() {
            return text.to_owned();
        }
        String::from_utf8_lossy(&self.redact(text.as_bytes())).into_owned()
    }

    /// Masks `buf` up to `cut` (moved earlier if an occurrence straddles it); returns the
    /// masked part and where it ended in `buf`.
    fn redact_prefix(&self, buf: &[u8], cut: usize) -> (Vec<u8>, usize) {
        let Some(searcher) = &self.searcher else {
            return (buf[..cut].to_vec(), cut);
        };
        // The union of all occurrences, as disjoint spans in order. (Overlapping search
        // reports matches by end, so they are sorted by start first.)
        let mut found: Vec<(usize, usize)> = searcher
            .find_overlapping_iter(buf)
            .map(|m| (m.start(), m.end()))
            .collect();
        found.sort_unstable();
        let mut spans: Vec<(usize, usize)> = Vec::with_capacity(found.len());
        for (s, e) in found {
            match spans.last_mut() {
                Some(last) if s <= last.1 => last.1 = last.1.max(e),
                _ => spans.push((s, e)),
            }
        }
        let mut cut = cut;
        if let Some(&(s, _)) = spans.iter().find(|(s, e)| *s < cut && *e > cut) {
            cut = s;
        }
        let mut out = Vec::with_capacity(cut);
        let mut at = 0;
        for &(s, e) in spans.iter().take_while(|(_, e)| *e <= cut) {
            out.extend_from_slice(&buf[at..s]);
            out.extend_from_slice(MASK);
            at = e;
        }
        out.extend_from_slice(&buf[at..cut]);
        (out, cut)
    }

    /// Where the longest suffix of `buf` that is a proper prefix of some pattern begins
    /// (`buf.len()` if none): the part that must wait for more output.
    fn hold_from(&self, buf: &[u8]) -> usize {
        let start = buf.len().saturating_sub(self.max_len.saturating_sub(1));
        (start..buf.len())
            .find(|&p| {
                self.first_bytes[usize::from(buf[p])] && {
                    let tail = &buf[p..];
                    self.patterns
                        .iter()
                        .any(|pat| pat.len() > tail.len() && pat.starts_with(tail))
                }
            })
            .unwrap_or(buf.len())
    }
}

/// Adds every masked form of `value` to `set` (see the module doc).
fn forms(value: &str, set: &mut BTreeSet<Vec<u8>>) {
    let mut add = |form: Vec<u8>| {
        if form.len() >= MIN_SECRET_VALUE_BYTES {
            set.insert(form);
        }
    };
    let bytes = value.as_bytes();
    if bytes.len() < MIN_SECRET_VALUE_BYTES {
        // Not even its longer encodings: a short value is not masked at all.
        return;
    }
    add(bytes.to_vec());
    if value.contains('\n') {
        for line in value.split('\n') {
            add(line.trim_end_matches('\r').as_bytes().to_vec());
        }
    }
    for engine in [&STANDARD, &STANDARD_NO_PAD, &URL_SAFE, &URL_SAFE_NO_PAD] {
        add(engine.encode(bytes).into_bytes());
    }
    for engine in [&STANDARD_NO_PAD, &URL_SAFE_NO_PAD] {
        for shift in 1..=2usize {
            // Encode behind `shift` unknown bytes: the first characters mix them in, as does
            // the last group if incomplete; the characters in between depend on the value only.
            let mut shifted = vec![0u8; shift];
            shifted.extend_from_slice(bytes);
            let encoded = engine.encode(&shifted).into_bytes();
            let skip = if shift == 1 { 2 } else { 3 };
            let end = 4 * (shifted.len() / 3);
            if end > skip {
                add(encoded[skip..end].to_vec());
            }
        }
        // Aligned but followed by more bytes: the complete groups only.
        let encoded = engine.encode(bytes).into_bytes();
        add(encoded[..4 * (bytes.len() / 3)].to_vec());
    }
    for set_ in [NON_ALPHANUMERIC, COMPONENT] {
        let upper = utf8_percent_encode(value, set_).to_string();
        if upper != value {
            add(lower_hex(&upper).into_bytes());
            if value.contains(' ') {
                add(upper.replace("%20", "+").into_bytes());
            }
            add(upper.into_bytes());
        }
    }
    // Every byte encoded (what `od`/`xxd`-style encoders produce).
    let every: String = bytes.iter().map(|b| format!("%{b:02X}")).collect();
    add(every.to_ascii_lowercase().into_bytes());
    add(every.into_bytes());
}

/// `%2F` → `%2f`: some encoders write lower-case hex.
fn lower_hex(encoded: &str) -> String {
    let mut out = String::with_capacity(encoded.len());
    let mut chars = encoded.chars();
    while let Some(c) = chars.next() {
        out.push(c);
        if c == '%' {
            for h in chars.by_ref().take(2) {
                out.push(h.to_ascii_lowercase());
            }
        }
    }
    out
}

/// Redacts one execution's output streams, holding back per stream what may be the start of
/// a secret until the next chunk of that stream (or the end) decides.
#[derive(Debug)]
pub struct StreamRedactor {
    redactor: Arc<Redactor>,
    held: [Vec<u8>; 2],
}

fn slot(source: OutputSource) -> usize {
    match source {
        OutputSource::Stdout => 0,
        OutputSource::Stderr => 1,
    }
}

impl StreamRedactor {
    pub fn new(redactor: Arc<Redactor>) -> Self {
        Self {
            redactor,
            held: [Vec::new(), Vec::new()],
        }
    }

    /// The masked output of `data` that can be released now.
    pub fn push(&mut self, source: OutputSource, data: &[u8]) -> Vec<u8> {
        if self.redactor.is_empty() {
            return data.to_vec();
        }
        let held = &mut self.held[slot(source)];
        held.extend_from_slice(data);
        let buf = std::mem::take(held);
        let hold = self.redactor.hold_from(&buf);
        let (out, cut) = self.redactor.redact_prefix(&buf, hold);
        *held = buf[cut..].to_vec();
        out
    }

    /// Everything still held for `source`, masked: the stream has ended.
    pub fn finish(&mut self, source: OutputSource) -> Vec<u8> {
        let buf = std::mem::take(&mut self.held[slot(source)]);
        self.redactor.redact(&buf)
    }
}

/// `output` with every chunk masked by `redactor`. Held-back bytes are released, masked, when
/// the inner stream ends or breaks.
pub fn redact_output(output: OutputStream, redactor: Arc<Redactor>) -> OutputStream {
    if redactor.is_empty() {
        return output;
    }
    struct State {
        inner: Option<OutputStream>,
        redactor: StreamRedactor,
        ready: VecDeque<Result<OutputChunk, crate::executor::ExecError>>,
    }
    let state = State {
        inner: Some(output),
        redactor: StreamRedactor::new(redactor),
        ready: VecDeque::new(),
    };
    futures::stream::unfold(state, |mut st| async move {
        loop {
            if let Some(item) = st.ready.pop_front() {
                return Some((item, st));
            }
            let inner = st.inner.as_mut()?;
            let next = inner.next().await;
            match next {
                Some(Ok(chunk)) => {
                    let data = st.redactor.push(chunk.source, &chunk.data);
                    if !data.is_empty() {
                        st.ready.push_back(Ok(OutputChunk { data, ..chunk }));
                    }
                }
                end => {
                    st.inner = None;
                    for source in [OutputSource::Stdout, OutputSource::Stderr] {
                        let data = st.redactor.finish(source);
                        if !data.is_empty() {
                            st.ready.push_back(Ok(OutputChunk {
                                source,
                                data,
                                at: None,
                            }));
                        }
                    }
                    if let Some(Err(e)) = end {
                        st.ready.push_back(Err(e));
                    }
                }
            }
        }
    })
    .boxed()
}

#[cfg(test)]
mod tests {
    use super::*;

    const PEM: &str = "-----BEGIN PRIVATE KEY-----\nMIIEvQIBADANBgkqhkiG9w0BAQEFAASCBKcwggSjAgEAAoIBAQC7\nVJTUt9Us8cKjMzEfYyjiWA4R4/M2bS1GB4t7NXp98C3SC6dVMvDu\n-----END PRIVATE KEY-----";

    /// The synthetic corpus: API-key shapes, connection strings, a PEM key, URL-ish values.
    fn corpus() -> Vec<&'static str> {
        vec![
            "sk-live-4eC39HqLyjWDarjtT1zdp7dc",
            "ghp_16C7e42F292c6912E7710c838347Ae178B4a",
            "AKIAIOSFODNN7EXAMPLE",
            "wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY",
            "postgres://app_user:p%40ss w0rd!@db.internal:5432/prod",
            "xoxb-123456789012-abcdefghijkl mnop?&=",
            PEM,
        ]
    }

    fn redactor() -> Arc<Redactor> {
        Arc::new(Redactor::new(corpus()).unwrap())
    }

    fn leaks(text: &[u8], value: &str) -> Vec<String> {
        let mut found = Vec::new();
        // The plain forms a reader would recognise: value, lines, full encodings.
        let mut check: Vec<Vec<u8>> = vec![value.as_bytes().to_vec()];
        for e in [&STANDARD, &STANDARD_NO_PAD, &URL_SAFE, &URL_SAFE_NO_PAD] {
            check.push(e.encode(value).into_bytes());
        }
        check.push(
            utf8_percent_encode(value, NON_ALPHANUMERIC)
                .to_string()
                .into_bytes(),
        );
        check.push(
            utf8_percent_encode(value, COMPONENT)
                .to_string()
                .into_bytes(),
        );
        check.push(
            value
                .bytes()
                .map(|b| format!("%{b:02x}"))
                .collect::<String>()
                .into_bytes(),
        );
        for line in value.lines().filter(|l| l.len() >= MIN_SECRET_VALUE_BYTES) {
            check.push(line.as_bytes().to_vec());
        }
        for c in check {
            if text.windows(c.len()).any(|w| w == c.as_slice()) {
                found.push(String::from_utf8_lossy(&c).into_owned());
            }
        }
        found
    }

    fn assert_clean(text: &[u8]) {
        for v in corpus() {
            let l = leaks(text, v);
            assert!(
                l.is_empty(),
                "leaked {l:?} in {}",
                String::from_utf8_lossy(text)
            );
        }
    }

    /// Output that prints every corpus value in many forms, with innocent text around.
    fn noisy_output() -> Vec<u8> {
        let mut out = String::from("starting; port 5432 ok true 1234 user=app\n");
        for v in corpus() {
            out.push_str(&format!("plain: {v}\n"));
            out.push_str(&format!("b64: {}\n", STANDARD.encode(v)));
            out.push_str(&format!("b64url: {}\n", URL_SAFE_NO_PAD.encode(v)));
            out.push_str(&format!(
                "pct: {}\n",
                utf8_percent_encode(v, NON_ALPHANUMERIC)
            ));
            out.push_str(&format!(
                "pct-component: {}\n",
                utf8_percent_encode(v, COMPONENT)
            ));
            let every: String = v.bytes().map(|b| format!("%{b:02x}")).collect();
            out.push_str(&format!("pct-every: {every}\n"));
            for shift in 1..=2 {
                let mut embedded = b"ab"[..shift].to_vec();
                embedded.extend_from_slice(v.as_bytes());
                embedded.extend_from_slice(b"zz");
                out.push_str(&format!("embedded-b64: {}\n", STANDARD.encode(&embedded)));
            }
        }
        for line in PEM.lines() {
            out.push_str(&format!("pem line alone: {line}\n"));
        }
        out.push_str("done: exit 0 true false 1234567\n");
        out.into_bytes()
    }

    #[test]
    fn masks_every_form_of_every_corpus_value() {
        let r = redactor();
        let out = r.redact(&noisy_output());
        assert_clean(&out);
        let text = String::from_utf8(out).unwrap();
        assert!(text.contains("plain: [REDACTED]"), "{text}");
        assert!(text.starts_with("starting; port 5432 ok true 1234 user=app\n"));
        assert!(text.ends_with("done: exit 0 true false 1234567\n"));
    }

    #[test]
    fn base64_inside_longer_base64_is_masked_at_every_alignment() {
        let r = redactor();
        let secret = "sk-live-4eC39HqLyjWDarjtT1zdp7dc";
        for shift in 0..3 {
            let mut blob = b"{\"auth\":\""[..3 + shift].to_vec();
            blob.extend_from_slice(secret.as_bytes());
            blob.extend_from_slice(b"\",\"more\":1}");
            let encoded = STANDARD.encode(&blob);
            let out = r.redact(encoded.as_bytes());
            assert!(
                out.windows(MASK.len()).any(|w| w == MASK),
                "shift {shift}: {encoded}"
            );
            // What is left cannot be decoded back into the secret.
            let left = String::from_utf8_lossy(&out).replace("[REDACTED]", "");
            assert!(left.len() < encoded.len() - 30, "shift {shift}: {left}");
        }
    }

    #[test]
    fn innocent_short_substrings_are_untouched() {
        let r = Redactor::new(["hunter2!", "abcdefgh12345678"]).unwrap();
        let text = b"hunter2 hunt abcdefg 1234 12345678 abcdefgh 2! true";
        assert_eq!(r.redact(text), text.to_vec());
        // Short values and short lines are never patterns.
        let short = Redactor::new(["1234", "true"]).unwrap();
        assert!(short.is_empty());
        let pem_like = Redactor::new(["-----BEGIN X-----\nab\n-----END X-----"]).unwrap();
        assert_eq!(pem_like.redact(b"ab ab ab"), b"ab ab ab".to_vec());
        assert_eq!(
            pem_like.redact(b"-----END X-----"),
            MASK.to_vec(),
            "long lines are masked on their own"
        );
    }

    #[test]
    fn overlapping_values_are_masked_as_one_span() {
        let r = Redactor::new(["AAAABBBBCCCC", "BBBBCCCCDDDD"]).unwrap();
        assert_eq!(
            r.redact(b"x AAAABBBBCCCCDDDD y"),
            b"x [REDACTED] y".to_vec()
        );
    }

    #[test]
    fn matches_split_across_chunks_are_masked() {
        let r = redactor();
        let input = noisy_output();
        // Every split point for two chunks, and byte-by-byte.
        for split in (0..input.len()).step_by(7) {
            let mut s = StreamRedactor::new(r.clone());
            let mut out = s.push(OutputSource::Stdout, &input[..split]);
            out.extend(s.push(OutputSource::Stdout, &input[split..]));
            out.extend(s.finish(OutputSource::Stdout));
            assert_clean(&out);
            assert_eq!(out, r.redact(&input), "split at {split}");
        }
        let mut s = StreamRedactor::new(r.clone());
        let mut out = Vec::new();
        for b in &input {
            out.extend(s.push(OutputSource::Stdout, std::slice::from_ref(b)));
        }
        out.extend(s.finish(OutputSource::Stdout));
        assert_eq!(out, r.redact(&input));
    }

    #[test]
    fn streams_are_held_back_separately_and_innocent_output_flows_at_once() {
        let r = Redactor::new(["sk-live-4eC39HqLyjWDarjtT1zdp7dc"]).unwrap();
        let mut s = StreamRedactor::new(Arc::new(r));
        assert_eq!(
            s.push(OutputSource::Stdout, b"hello\n"),
            b"hello\n".to_vec()
        );
        // "sk-li" may begin the secret: held back.
        assert_eq!(s.push(OutputSource::Stdout, b"key sk-li"), b"key ".to_vec());
        assert_eq!(
            s.push(OutputSource::Stderr, b"ve-4eC39"),
            b"ve-4eC39".to_vec()
        );
        assert_eq!(
            s.push(OutputSource::Stdout, b"ve-4eC39HqLyjWDarjtT1zdp7dc!\n"),
            b"[REDACTED]!\n".to_vec()
        );
        assert_eq!(s.push(OutputSource::Stdout, b"sk-live"), b"".to_vec());
        assert_eq!(s.finish(OutputSource::Stdout), b"sk-live".to_vec());
    }

    #[tokio::test]
    async fn the_wrapped_stream_releases_what_it_held_at_the_end() {
        let chunks = vec![
            Ok(OutputChunk {
                source: OutputSource::Stdout,
                data: b"token=sk-live-4eC3".to_vec(),
                at: None,
            }),
            Ok(OutputChunk {
                source: OutputSource::Stdout,
                data: b"9HqLyjWDarjtT1zdp7dc; tail sk-".to_vec(),
                at: None,
            }),
        ];
        let inner: OutputStream = futures::stream::iter(chunks).boxed();
        let out: Vec<u8> = redact_output(inner, redactor())
            .map(|c| c.unwrap().data)
            .concat()
            .await;
        assert_eq!(out, b"token=[REDACTED]; tail sk-".to_vec());
    }

    #[test]
    fn reasons_are_masked_too() {
        let r = redactor();
        assert_eq!(
            r.redact_str("failed: AKIAIOSFODNN7EXAMPLE rejected"),
            "failed: [REDACTED] rejected"
        );
        assert_eq!(Redactor::none().redact_str("as is"), "as is");
    }
}
