//! Following a container's output so that nothing is lost when Docker's own follow stream
//! ends early. Under load the daemon can close a `follow=true` log stream when the container
//! exits before it has sent everything the json-file log holds (seen here: 2.2 MB of a 25 MB
//! run's stdout, with no error). So when a stream ends (or breaks), the reader asks again —
//! following again while the container runs, a plain read once it has exited — and skips, by
//! their nanosecond timestamps, the frames it already passed on.
//!
//! Timestamps are monotonic within stdout and within stderr, not across them (Docker copies
//! each stream on its own), so there is one [`Cursor`] per stream, and the re-read starts a
//! second before the older of the two streams' last frames. A stream that had shown nothing
//! yet had nothing delivered, so all of its frames in the re-read are new. A bounded number of
//! resumptions keeps a daemon that keeps closing streams from looping forever.

use bollard::Docker;
use bollard::container::LogOutput;
use bollard::query_parameters::LogsOptions;
use chrono::{DateTime, Utc};
use futures::stream::BoxStream;
use futures::{StreamExt, stream};

use super::log_frame;
use crate::executor::{ExecError, OutputChunk, OutputSource, OutputStream};

/// Most times one execution's output is resumed after its stream ended.
const MAX_RESUMES: u32 = 8;

/// Where the reader is in the log: the newest timestamp passed on and how many frames carried
/// exactly that timestamp.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Cursor {
    last: Option<DateTime<Utc>>,
    at_last: usize,
    /// While re-reading: frames stamped `last` skipped so far.
    skipped_at_last: usize,
}

impl Cursor {
    /// Whether a frame stamped `at` is new. While `resuming`, frames at or before the cursor
    /// were passed on already (and frames without a time cannot be told apart, so they are
    /// dropped); otherwise every frame is new.
    pub fn admit(&mut self, at: Option<DateTime<Utc>>, resuming: bool) -> bool {
        let Some(t) = at else {
            return !resuming;
        };
        match self.last {
            Some(l) if t < l => !resuming,
            Some(l) if t == l => {
                if resuming && self.skipped_at_last < self.at_last {
                    self.skipped_at_last += 1;
                    return false;
                }
                self.at_last += 1;
                self.skipped_at_last = self.at_last;
                true
            }
            _ => {
                self.last = Some(t);
                self.at_last = 1;
                self.skipped_at_last = 1;
                true
            }
        }
    }

    /// A new read starts: the frames at `last` are to be skipped again.
    fn restart(&mut self) {
        self.skipped_at_last = 0;
    }
}

/// Where to start reading again: a second before the older stream's last frame (the streams'
/// clocks interleave), or the beginning when neither has shown anything.
fn since(cursors: &[Cursor; 2]) -> i32 {
    cursors
        .iter()
        .filter_map(|c| c.last)
        .map(|t| t.timestamp() - 1)
        .min()
        .map_or(0, |s| i32::try_from(s.max(0)).unwrap_or(i32::MAX))
}

type Frames = BoxStream<'static, Result<LogOutput, bollard::errors::Error>>;

fn open(docker: &Docker, id: &str, follow: bool, since: i32) -> Frames {
    let options = LogsOptions {
        follow,
        stdout: true,
        stderr: true,
        timestamps: true,
        since,
        ..Default::default()
    };
    docker.logs(id, Some(options)).boxed()
}

struct State {
    docker: Docker,
    id: String,
    frames: Option<Frames>,
    /// stdout's and stderr's.
    cursors: [Cursor; 2],
    resuming: bool,
    resumes: u32,
    /// The current read is the last one (the container had exited when it began).
    last_read: bool,
}

fn chunk(source: OutputSource, frame: &[u8]) -> OutputChunk {
    let (at, data) = log_frame::split_timestamp(frame);
    OutputChunk {
        source,
        data: data.to_vec(),
        at,
    }
}

/// The container's stdout and stderr, in log order, resumed as the module doc says.
pub fn follow(docker: Docker, id: String) -> OutputStream {
    let frames = Some(open(&docker, &id, true, 0));
    let state = State {
        docker,
        id,
        frames,
        cursors: [Cursor::default(); 2],
        resuming: false,
        resumes: 0,
        last_read: false,
    };
    stream::unfold(state, |mut st| async move {
        loop {
            if let Some(frames) = st.frames.as_mut() {
                match frames.next().await {
                    Some(Ok(LogOutput::StdOut { message } | LogOutput::Console { message })) => {
                        let c = chunk(OutputSource::Stdout, &message);
                        if st.cursors[0].admit(c.at, st.resuming) {
                            return Some((Ok(c), st));
                        }
                        continue;
                    }
                    Some(Ok(LogOutput::StdErr { message })) => {
                        let c = chunk(OutputSource::Stderr, &message);
                        if st.cursors[1].admit(c.at, st.resuming) {
                            return Some((Ok(c), st));
                        }
                        continue;
                    }
                    Some(Ok(LogOutput::StdIn { .. })) => continue,
                    Some(Err(e)) => {
                        st.frames = None;
                        if st.resumes >= MAX_RESUMES {
                            return Some((Err(ExecError::backend("follow container logs", e)), st));
                        }
                        tracing::warn!(error = %e, "container log stream broke; resuming it");
                    }
                    None => st.frames = None,
                }
            }
            if st.last_read || st.resumes >= MAX_RESUMES {
                return None;
            }
            st.resumes += 1;
            let running = match st.docker.inspect_container(&st.id, None).await {
                Ok(info) => info.state.and_then(|s| s.running).unwrap_or(false),
                // Gone (or unreadable): nothing more can be read.
                Err(_) => return None,
            };
            st.last_read = !running;
            tracing::debug!(
                container = %st.id,
                running,
                since = since(&st.cursors),
                "container log stream ended; reading on from the last frames seen"
            );
            st.resuming = true;
            st.cursors.iter_mut().for_each(Cursor::restart);
            st.frames = Some(open(&st.docker, &st.id, running, since(&st.cursors)));
        }
    })
    .boxed()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn t(nanos: i64) -> Option<DateTime<Utc>> {
        Some(DateTime::from_timestamp_nanos(
            1_700_000_000_000_000_000 + nanos,
        ))
    }

    #[test]
    fn a_re_read_skips_exactly_what_was_passed_on() {
        let mut c = Cursor::default();
        // First read: frames at 1, 2, 2, 3, 3 (two frames share each of the last stamps).
        for at in [t(1), t(2), t(2), t(3), t(3)] {
            assert!(c.admit(at, false));
        }
        // The re-read starts from the same second: 1, 2, 2, 3, 3 again, then 3 (a third frame
        // at that stamp that the first read never got), then 4.
        c.restart();
        let again: Vec<bool> = [t(1), t(2), t(2), t(3), t(3), t(3), t(4), None]
            .into_iter()
            .map(|at| c.admit(at, true))
            .collect();
        assert_eq!(
            again,
            [false, false, false, false, false, true, true, false]
        );
        // A second re-read skips the third frame at 3 as well.
        c.restart();
        let third: Vec<bool> = [t(3), t(3), t(3), t(4), t(5)]
            .into_iter()
            .map(|at| c.admit(at, true))
            .collect();
        assert_eq!(third, [false, false, false, false, true]);
    }

    #[test]
    fn the_re_read_starts_before_the_older_stream() {
        let mut out = Cursor::default();
        let mut err = Cursor::default();
        assert_eq!(since(&[out, err]), 0);
        out.admit(
            Some(DateTime::from_timestamp_nanos(1_700_000_010_000_000_000)),
            false,
        );
        assert_eq!(
            since(&[out, err]),
            1_700_000_009,
            "stderr showed nothing yet"
        );
        err.admit(
            Some(DateTime::from_timestamp_nanos(1_700_000_005_500_000_000)),
            false,
        );
        assert_eq!(since(&[out, err]), 1_700_000_004);
    }

    #[test]
    fn the_first_read_passes_everything_on() {
        let mut c = Cursor::default();
        assert!(c.admit(None, false));
        assert!(c.admit(t(5), false));
        assert!(c.admit(t(4), false), "out of order, still new");
        assert!(c.admit(t(5), false));
    }
}
