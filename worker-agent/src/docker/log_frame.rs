//! Docker log frames read with `timestamps=true`: each frame's payload starts with the time
//! the container wrote it (RFC 3339, nanoseconds) and a space. The time lets an adopted
//! execution leave out of its live logs what an earlier life of the agent already shipped.

use chrono::{DateTime, Utc};

/// Splits a frame into its timestamp and the bytes the process wrote. A frame without a
/// readable timestamp is passed through whole, with no time.
pub fn split_timestamp(frame: &[u8]) -> (Option<DateTime<Utc>>, &[u8]) {
    // The longest RFC 3339 timestamp Docker writes is 35 bytes; look no further.
    let Some(space) = frame.iter().take(40).position(|&b| b == b' ') else {
        return (None, frame);
    };
    let parsed = std::str::from_utf8(&frame[..space])
        .ok()
        .and_then(|s| DateTime::parse_from_rfc3339(s).ok());
    match parsed {
        Some(at) => (Some(at.with_timezone(&Utc)), &frame[space + 1..]),
        None => (None, frame),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_timestamp_is_split_off() {
        let (at, data) = split_timestamp(b"2026-11-21T14:43:07.123456789Z hello world\n");
        let at = at.unwrap();
        assert_eq!(at.timestamp(), 1_795_272_187);
        assert_eq!(at.timestamp_subsec_nanos(), 123_456_789);
        assert_eq!(data, b"hello world\n");
    }

    #[test]
    fn frames_without_a_timestamp_pass_through() {
        assert_eq!(
            split_timestamp(b"hello world\n"),
            (None, &b"hello world\n"[..])
        );
        assert_eq!(split_timestamp(b"nospace"), (None, &b"nospace"[..]));
        assert_eq!(split_timestamp(b""), (None, &b""[..]));
        let (at, data) = split_timestamp(b"2026-11-21T14:43:07Z \n");
        assert!(at.is_some());
        assert_eq!(data, b"\n");
    }
}
