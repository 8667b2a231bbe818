//! Packing output into `PushLogs` requests within the contract's limits: chunks of at most
//! 64 KiB, at most 64 chunks per request. Small writes to the same stream are merged so a
//! chatty process costs few chunks; a request is also capped in bytes so it stays well under
//! tonic's default 4 MiB message limit on the server.

use std::collections::VecDeque;

use drover_proto::v1 as pb;

use crate::executor::{OutputChunk, OutputSource};

pub const MAX_CHUNK_BYTES: usize = 64 * 1024;
pub const MAX_CHUNKS_PER_REQUEST: usize = 64;
pub const MAX_REQUEST_BYTES: usize = 2 * 1024 * 1024;

/// Output waiting to be pushed, already split and merged into wire chunks.
#[derive(Debug, Default)]
pub struct LogBatch {
    chunks: VecDeque<pb::LogChunk>,
    bytes: usize,
}

impl LogBatch {
    pub fn new() -> Self {
        Self::default()
    }

    pub fn push(&mut self, chunk: OutputChunk) {
        let stream = i32::from(match chunk.source {
            OutputSource::Stdout => pb::LogStream::Stdout,
            OutputSource::Stderr => pb::LogStream::Stderr,
        });
        self.bytes += chunk.data.len();
        let mut data = chunk.data.as_slice();
        // Top up the last chunk when it is the same stream and has room.
        if let Some(last) = self.chunks.back_mut()
            && last.stream == stream
        {
            let room = MAX_CHUNK_BYTES.saturating_sub(last.data.len());
            let (head, rest) = data.split_at(room.min(data.len()));
            last.data.extend_from_slice(head);
            data = rest;
        }
        for piece in data.chunks(MAX_CHUNK_BYTES) {
            self.chunks.push_back(pb::LogChunk {
                stream,
                data: piece.to_vec(),
            });
        }
    }

    pub fn is_empty(&self) -> bool {
        self.chunks.is_empty()
    }

    /// Bytes waiting, across all chunks.
    pub fn pending_bytes(&self) -> usize {
        self.bytes
    }

    /// True when a full request is ready, so it should be sent without waiting for the timer.
    pub fn has_full_request(&self) -> bool {
        self.chunks.len() > MAX_CHUNKS_PER_REQUEST || self.bytes >= MAX_REQUEST_BYTES
    }

    /// Takes the chunks for one request (oldest first, within both limits).
    pub fn take_request(&mut self) -> Vec<pb::LogChunk> {
        let mut out = Vec::new();
        let mut bytes = 0;
        while let Some(front) = self.chunks.front() {
            let fits = out.len() < MAX_CHUNKS_PER_REQUEST
                && (out.is_empty() || bytes + front.data.len() <= MAX_REQUEST_BYTES);
            if !fits {
                break;
            }
            let Some(chunk) = self.chunks.pop_front() else {
                break;
            };
            bytes += chunk.data.len();
            out.push(chunk);
        }
        self.bytes -= bytes;
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn out(data: &[u8]) -> OutputChunk {
        OutputChunk {
            source: OutputSource::Stdout,
            data: data.to_vec(),
            at: None,
        }
    }

    fn err(data: &[u8]) -> OutputChunk {
        OutputChunk {
            source: OutputSource::Stderr,
            data: data.to_vec(),
            at: None,
        }
    }

    #[test]
    fn merges_same_stream_and_keeps_order_across_streams() {
        let mut b = LogBatch::new();
        b.push(out(b"a"));
        b.push(out(b"b"));
        b.push(err(b"c"));
        b.push(out(b"d"));
        let req = b.take_request();
        let got: Vec<(i32, &[u8])> = req.iter().map(|c| (c.stream, c.data.as_slice())).collect();
        assert_eq!(got, vec![(1, &b"ab"[..]), (2, &b"c"[..]), (1, &b"d"[..])]);
        assert!(b.is_empty());
        assert_eq!(b.pending_bytes(), 0);
    }

    #[test]
    fn splits_big_writes_into_64k_chunks() {
        let mut b = LogBatch::new();
        b.push(out(&[b'x'; 10]));
        b.push(out(&vec![b'y'; 3 * MAX_CHUNK_BYTES]));
        let req = b.take_request();
        assert_eq!(req.len(), 4);
        assert!(req.iter().all(|c| c.data.len() <= MAX_CHUNK_BYTES));
        assert_eq!(req[0].data.len(), MAX_CHUNK_BYTES);
        assert_eq!(req[3].data.len(), 10);
        let total: usize = req.iter().map(|c| c.data.len()).sum();
        assert_eq!(total, 3 * MAX_CHUNK_BYTES + 10);
    }

    #[test]
    fn requests_respect_chunk_count_and_byte_caps() {
        let mut b = LogBatch::new();
        // Alternate streams so nothing merges: 100 tiny chunks.
        for i in 0..100 {
            b.push(if i % 2 == 0 { out(b"o") } else { err(b"e") });
        }
        assert!(b.has_full_request());
        assert_eq!(b.take_request().len(), MAX_CHUNKS_PER_REQUEST);
        assert!(!b.has_full_request());
        assert_eq!(b.take_request().len(), 36);

        b.push(out(&vec![b'z'; 3 * MAX_REQUEST_BYTES]));
        assert!(b.has_full_request());
        let req = b.take_request();
        let bytes: usize = req.iter().map(|c| c.data.len()).sum();
        assert!(bytes <= MAX_REQUEST_BYTES);
        assert_eq!(b.pending_bytes(), 3 * MAX_REQUEST_BYTES - bytes);
    }

    #[test]
    fn empty_writes_cost_nothing_on_the_wire() {
        let mut b = LogBatch::new();
        b.push(out(b""));
        assert!(b.take_request().iter().all(|c| !c.data.is_empty()));
    }
}
