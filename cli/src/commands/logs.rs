//! `drover logs ID [--follow] [--from OFFSET]`: the run's output, stdout to stdout and stderr
//! to stderr, byte for byte. With `--follow` it streams live until the run ends and, if the
//! stream breaks (API restarted), resumes from the last offset it printed.

use std::io::Write;
use std::time::Duration;

use drover_proto::v1 as pb;
use tonic::Code;

use crate::client::{self, Client};

/// Reconnects tried, one second apart, when a followed stream breaks.
const RESUMES: u32 = 5;

/// Prints the log from `from` on; returns the last offset printed (`from` if none).
pub async fn print(
    client: &mut Client,
    run_id: &str,
    follow: bool,
    from: u64,
) -> anyhow::Result<u64> {
    let mut offset = from;
    let mut resumes = 0;
    loop {
        match print_once(client, run_id, follow, &mut offset).await {
            Ok(()) => return Ok(offset),
            Err(status) => {
                let transient = matches!(status.code(), Code::Unavailable | Code::Unknown);
                if !follow || !transient || resumes >= RESUMES {
                    return Err(client::failed(
                        format!("cannot stream the logs of run {run_id}"),
                        client::Subject::Run,
                        &status,
                    ));
                }
                resumes += 1;
                eprintln!(
                    "log stream broke off ({}); resuming from offset {offset}",
                    status.code()
                );
                tokio::time::sleep(Duration::from_secs(1)).await;
            }
        }
    }
}

async fn print_once(
    client: &mut Client,
    run_id: &str,
    follow: bool,
    offset: &mut u64,
) -> Result<(), tonic::Status> {
    let mut stream = client
        .stream_logs(pb::StreamLogsRequest {
            run_id: run_id.to_owned(),
            follow,
            from_offset: *offset,
        })
        .await?
        .into_inner();
    while let Some(msg) = stream.message().await? {
        for entry in msg.entries {
            let written = if entry.stream == pb::LogStream::Stderr as i32 {
                let mut err = std::io::stderr().lock();
                err.write_all(&entry.data).and_then(|()| err.flush())
            } else {
                let mut out = std::io::stdout().lock();
                out.write_all(&entry.data).and_then(|()| out.flush())
            };
            if let Err(e) = written {
                // A closed pipe (`drover logs … | head`): stop quietly.
                if e.kind() == std::io::ErrorKind::BrokenPipe {
                    return Ok(());
                }
                return Err(tonic::Status::internal(format!("cannot write output: {e}")));
            }
            *offset = entry.offset;
        }
    }
    Ok(())
}
