//! What a run's events channel carries (see [`crate::events`]): the newest event seq, as
//! text, and, when the publisher has them, the events that commit wrote, encoded as WatchRun
//! sends them (`WatchRunResponse`, length-delimited, the terminal one with the run).
//!
//! Why: a bare number made every watcher read Postgres once per wake-up (about 2.3 reads per
//! watched run, one of them between the run's end and the client hearing of it). With the
//! events in the message, a watcher whose delivered events are followed by carried ones
//! without a gap sends those and reads nothing. The message stays a hint: anything missing
//! (a lost message, a publisher that sent only the number, one too big to carry) leaves a
//! gap, and the watcher reads Postgres as before. What is carried is what the commit
//! returned, published only after it, so it is what Postgres holds.

use prost::Message;

use crate::convert;
use crate::ids::RunId;
use crate::repo::runs::{EventRecord, RunRecord};
use drover_proto::v1 as pb;

/// Messages bigger than this carry the number only (a run with a large spec): Redis pub/sub
/// copies each message to every subscriber, and a read costs less than shipping it around.
pub const MAX_CARRIED_BYTES: usize = 16 * 1024;

/// One message for a run's events channel.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Announcement {
    pub run: RunId,
    pub payload: Vec<u8>,
}

impl Announcement {
    /// Just the newest seq: watchers read the events from Postgres.
    pub fn hint(run: RunId, seq: i32) -> Self {
        Self {
            run,
            payload: seq.to_string().into_bytes(),
        }
    }

    /// The events one commit wrote (in seq order) and `run` as that commit left it, which
    /// goes with an event into a terminal state. Without events, or when too big, a hint.
    pub fn carrying(run: &RunRecord, events: &[&EventRecord]) -> Self {
        let Some(newest) = events.iter().map(|e| e.seq).max() else {
            return Self::hint(run.id, 0);
        };
        let msgs: Vec<pb::WatchRunResponse> = events
            .iter()
            .map(|event| pb::WatchRunResponse {
                event: Some(convert::event_to_proto(event)),
                run: (event.to_state.is_terminal() && run.state == event.to_state)
                    .then(|| convert::run_to_proto(run)),
            })
            .collect();
        match encode(newest, &msgs) {
            Some(payload) => Self {
                run: run.id,
                payload,
            },
            None => Self::hint(run.id, newest),
        }
    }
}

/// The message announcing `newest` and carrying `msgs`; `None` when it would be bigger than
/// [`MAX_CARRIED_BYTES`].
pub fn encode(newest: i32, msgs: &[pb::WatchRunResponse]) -> Option<Vec<u8>> {
    let mut payload = newest.to_string().into_bytes();
    payload.push(b'\n');
    for msg in msgs {
        // Encoding into a Vec cannot run out of room.
        msg.encode_length_delimited(&mut payload).ok()?;
        if payload.len() > MAX_CARRIED_BYTES {
            return None;
        }
    }
    Some(payload)
}

/// A parsed events-channel message: the newest seq announced and the events carried (none
/// for a bare hint, or when what follows the number does not decode).
#[derive(Debug, Default, PartialEq)]
pub struct Heard {
    pub newest: i64,
    pub events: Vec<pb::WatchRunResponse>,
}

/// Reads an events-channel message; `None` when it does not start with a number.
pub fn parse(payload: &[u8]) -> Option<Heard> {
    let (number, mut rest) = match payload.iter().position(|b| *b == b'\n') {
        Some(i) => (&payload[..i], &payload[i + 1..]),
        None => (payload, &[][..]),
    };
    let newest = std::str::from_utf8(number)
        .ok()?
        .trim()
        .parse::<i64>()
        .ok()?;
    let mut events = Vec::new();
    while !rest.is_empty() {
        match pb::WatchRunResponse::decode_length_delimited(&mut rest) {
            Ok(msg) if msg.event.is_some() => events.push(msg),
            // Garbled: keep nothing of it (a gap the watcher fills from Postgres).
            _ => {
                return Some(Heard {
                    newest,
                    events: Vec::new(),
                });
            }
        }
    }
    Some(Heard { newest, events })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn event(seq: u64, to: pb::RunState) -> pb::WatchRunResponse {
        pb::WatchRunResponse {
            event: Some(pb::RunEvent {
                seq,
                to_state: to.into(),
                reason: format!("event {seq}"),
                ..Default::default()
            }),
            run: None,
        }
    }

    #[test]
    fn carried_events_come_back_as_they_went() {
        let mut end = event(4, pb::RunState::Succeeded);
        end.run = Some(pb::Run {
            id: "r".into(),
            ..Default::default()
        });
        let msgs = vec![event(3, pb::RunState::Running), end];
        let payload = encode(4, &msgs).expect("small");
        let heard = parse(&payload).expect("starts with a number");
        assert_eq!(heard.newest, 4);
        assert_eq!(heard.events, msgs);
    }

    #[test]
    fn a_bare_number_is_a_hint_and_garbage_after_it_carries_nothing() {
        assert_eq!(
            parse(b"7"),
            Some(Heard {
                newest: 7,
                events: vec![]
            })
        );
        assert_eq!(
            parse(b"7\n\xff\xff\xff"),
            Some(Heard {
                newest: 7,
                events: vec![]
            })
        );
        assert_eq!(parse(b"not a number"), None);
        assert_eq!(parse(b""), None);
    }

    #[test]
    fn a_message_too_big_to_carry_is_refused() {
        let mut big = event(2, pb::RunState::Assigned);
        if let Some(e) = big.event.as_mut() {
            e.reason = "x".repeat(MAX_CARRIED_BYTES);
        }
        assert_eq!(encode(2, &[big]), None);
    }
}
