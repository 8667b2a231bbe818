//! The last bytes of a run's combined output, kept in memory for the completion report (the
//! proto allows at most 64 KiB). Full logs go to the API as they flow; this is only the tail.

use std::collections::VecDeque;

/// What `ReportCompletionRequest.output` may hold.
pub const TAIL_BYTES: usize = 64 * 1024;

/// A byte ring: pushes beyond the capacity drop the oldest bytes and set `truncated`.
#[derive(Debug, Clone)]
pub struct OutputTail {
    buf: VecDeque<u8>,
    capacity: usize,
    truncated: bool,
}

impl OutputTail {
    pub fn new(capacity: usize) -> Self {
        Self {
            buf: VecDeque::with_capacity(capacity.min(TAIL_BYTES)),
            capacity,
            truncated: false,
        }
    }

    pub fn push(&mut self, data: &[u8]) {
        if self.capacity == 0 {
            self.truncated |= !data.is_empty();
            return;
        }
        // Only the last `capacity` bytes of `data` can survive.
        let keep = &data[data.len().saturating_sub(self.capacity)..];
        if keep.len() < data.len() {
            self.truncated = true;
        }
        let overflow = (self.buf.len() + keep.len()).saturating_sub(self.capacity);
        if overflow > 0 {
            self.buf.drain(..overflow);
            self.truncated = true;
        }
        self.buf.extend(keep);
    }

    /// True when bytes were dropped, i.e. the tail is not the whole output.
    pub fn truncated(&self) -> bool {
        self.truncated
    }

    pub fn len(&self) -> usize {
        self.buf.len()
    }

    pub fn is_empty(&self) -> bool {
        self.buf.is_empty()
    }

    /// The kept bytes, oldest first, and whether older ones were dropped.
    pub fn into_parts(self) -> (Vec<u8>, bool) {
        (self.buf.into_iter().collect(), self.truncated)
    }
}

impl Default for OutputTail {
    fn default() -> Self {
        Self::new(TAIL_BYTES)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keeps_everything_under_capacity() {
        let mut t = OutputTail::new(10);
        t.push(b"hello");
        t.push(b"\n");
        assert_eq!(t.len(), 6);
        assert_eq!(t.into_parts(), (b"hello\n".to_vec(), false));
    }

    #[test]
    fn exactly_full_is_not_truncated() {
        let mut t = OutputTail::new(4);
        t.push(b"ab");
        t.push(b"cd");
        assert_eq!(t.into_parts(), (b"abcd".to_vec(), false));
    }

    #[test]
    fn drops_oldest_bytes_across_pushes() {
        let mut t = OutputTail::new(4);
        t.push(b"abc");
        t.push(b"def");
        assert!(t.truncated());
        assert_eq!(t.into_parts(), (b"cdef".to_vec(), true));
    }

    #[test]
    fn a_single_huge_push_keeps_its_end() {
        let mut t = OutputTail::new(3);
        t.push(b"0123456789");
        assert_eq!(t.into_parts(), (b"789".to_vec(), true));
    }

    #[test]
    fn default_capacity_is_the_proto_limit() {
        let mut t = OutputTail::default();
        t.push(&vec![b'x'; TAIL_BYTES]);
        assert!(!t.truncated());
        t.push(b"y");
        let (bytes, truncated) = t.into_parts();
        assert_eq!(bytes.len(), TAIL_BYTES);
        assert_eq!(bytes.last(), Some(&b'y'));
        assert!(truncated);
    }

    #[test]
    fn zero_capacity_only_records_truncation() {
        let mut t = OutputTail::new(0);
        t.push(b"");
        assert!(!t.truncated());
        t.push(b"x");
        assert!(t.is_empty());
        assert!(t.truncated());
    }
}
