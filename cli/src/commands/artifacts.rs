//! `drover artifacts ls ID [--json]` and `drover artifacts get ID PATH [-o FILE]`: the files a
//! run produced, as committed with the attempt that ended it.
//!
//! `get` writes the content to stdout, or with `-o` to FILE (through a temporary file renamed
//! into place once the SHA-256 matched, with the recorded permission bits). A symlink has no
//! content: with `-o` it is recreated as a symlink, without it `get` says where it points and
//! exits non-zero.

use std::io::Write;
use std::path::{Path, PathBuf};

use anyhow::{Context, bail};
use clap::Subcommand;
use drover_proto::v1 as pb;
use serde_json::json;
use sha2::{Digest, Sha256};
use tonic::{Code, Status};

use crate::client::{self, Client, Subject};

#[derive(Subcommand, Debug)]
pub enum ArtifactsCommand {
    /// List a run's artifacts.
    Ls {
        id: String,
        /// One JSON object per line.
        #[arg(long)]
        json: bool,
    },
    /// Download one artifact to stdout (or to FILE with -o).
    Get {
        id: String,
        path: String,
        /// Write to this file instead of stdout.
        #[arg(short = 'o', long = "output")]
        output: Option<PathBuf>,
    },
}

pub async fn run(client: &mut Client, cmd: ArtifactsCommand) -> anyhow::Result<()> {
    match cmd {
        ArtifactsCommand::Ls { id, json } => ls(client, &id, json).await,
        ArtifactsCommand::Get { id, path, output } => {
            get(client, &id, &path, output.as_deref()).await
        }
    }
}

fn fail(action: String, status: &Status) -> anyhow::Error {
    if status.code() == Code::NotFound {
        // The server says which: "run not found" or "artifact not found".
        anyhow::anyhow!("{action}: {}", status.message())
    } else {
        client::failed(action, Subject::Other, status)
    }
}

async fn ls(client: &mut Client, id: &str, json: bool) -> anyhow::Result<()> {
    let entries = client
        .list_artifacts(pb::ListArtifactsRequest { run_id: id.into() })
        .await
        .map_err(|s| fail(format!("cannot list artifacts of run {id}"), &s))?
        .into_inner()
        .entries;
    let mut out = std::io::stdout().lock();
    if json {
        for e in &entries {
            writeln!(
                out,
                "{}",
                json!({
                    "path": e.path,
                    "size": e.size,
                    "sha256": e.sha256,
                    "mode": format!("{:o}", e.mode),
                    "is_symlink": e.is_symlink,
                    "link_target": e.link_target,
                    "attempt": e.attempt,
                })
            )?;
        }
    } else if entries.is_empty() {
        writeln!(out, "no artifacts")?;
    } else {
        writeln!(out, "{:<5} {:>12}  {:<12}  PATH", "MODE", "SIZE", "SHA256")?;
        for e in &entries {
            let (mode, sha) = if e.is_symlink {
                ("link".to_owned(), "-".to_owned())
            } else {
                (
                    format!("{:04o}", e.mode),
                    e.sha256.chars().take(12).collect(),
                )
            };
            let path = if e.is_symlink {
                format!("{} -> {}", e.path, e.link_target)
            } else {
                e.path.clone()
            };
            writeln!(out, "{mode:<5} {:>12}  {sha:<12}  {path}", e.size)?;
        }
    }
    Ok(())
}

async fn get(
    client: &mut Client,
    id: &str,
    path: &str,
    output: Option<&Path>,
) -> anyhow::Result<()> {
    let action = || format!("cannot get {path} of run {id}");
    let mut stream = client
        .get_artifact(pb::GetArtifactRequest {
            run_id: id.into(),
            path: path.into(),
        })
        .await
        .map_err(|s| fail(action(), &s))?
        .into_inner();
    let entry = match stream.message().await.map_err(|s| fail(action(), &s))? {
        Some(pb::ArtifactChunk {
            item: Some(pb::artifact_chunk::Item::Entry(e)),
        }) => e,
        _ => bail!("{}: the server sent no entry first", action()),
    };
    if entry.is_symlink {
        let Some(out) = output else {
            bail!(
                "{path} is a symlink to {} (stored as a link, never followed); use -o to recreate it",
                entry.link_target
            );
        };
        std::os::unix::fs::symlink(&entry.link_target, out)
            .with_context(|| format!("cannot create symlink {}", out.display()))?;
        return Ok(());
    }
    let mut hasher = Sha256::new();
    let (mut sink, tmp): (Box<dyn Write>, Option<PathBuf>) = match output {
        None => (Box::new(std::io::stdout().lock()), None),
        Some(out) => {
            let mut name = out.as_os_str().to_owned();
            name.push(".drover-partial");
            let tmp = PathBuf::from(name);
            let f = std::fs::File::create(&tmp)
                .with_context(|| format!("cannot create {}", tmp.display()))?;
            (Box::new(std::io::BufWriter::new(f)), Some(tmp))
        }
    };
    let written = async {
        let mut n = 0u64;
        while let Some(chunk) = stream.message().await.map_err(|s| fail(action(), &s))? {
            let Some(pb::artifact_chunk::Item::Data(d)) = chunk.item else {
                bail!("{}: unexpected message after the data", action());
            };
            hasher.update(&d);
            n += d.len() as u64;
            sink.write_all(&d)?;
        }
        sink.flush()?;
        drop(sink);
        if n != entry.size || hex::encode(hasher.finalize()) != entry.sha256 {
            bail!(
                "{}: the content does not match its size and sha256",
                action()
            );
        }
        Ok(())
    }
    .await;
    match (written, tmp, output) {
        (Ok(()), Some(tmp), Some(out)) => {
            use std::os::unix::fs::PermissionsExt;
            std::fs::set_permissions(&tmp, std::fs::Permissions::from_mode(entry.mode & 0o777))?;
            std::fs::rename(&tmp, out)
                .with_context(|| format!("cannot move the download to {}", out.display()))
        }
        (Ok(()), _, _) => Ok(()),
        (Err(e), tmp, _) => {
            if let Some(tmp) = tmp {
                let _ = std::fs::remove_file(tmp);
            }
            Err(e)
        }
    }
}
