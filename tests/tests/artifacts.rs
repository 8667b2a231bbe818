//! Artifacts end to end through the real API binary, with a scripted agent (FakeAgent) playing
//! the worker: uploads are verified and staged, committed only with the terminal state,
//! refused whole when anything is wrong (hash, size, path, epoch), served back byte-exact by
//! ListArtifacts / GetArtifact and to a follow-up run by DownloadInputs, and reachable from
//! the `drover artifacts` CLI. Every path that enters from outside is checked.

#![allow(
    clippy::unwrap_used,
    reason = "test code: a failed unwrap is a failed test"
)]

use std::path::Path;
use std::time::Duration;

use drover_proto::v1 as pb;
use drover_tests::fake_agent::{
    FakeAgent, UploadFile, collect_artifacts, in_state, sha256_hex, submit, wait_run,
};
use drover_tests::{Stack, StackOptions};
use futures::StreamExt;
use tonic::Code;

const WAIT: Duration = Duration::from_secs(30);

fn spec() -> pb::RunSpec {
    pb::RunSpec {
        image: "drover/busybox:latest".into(),
        command: vec!["true".into()],
        ..Default::default()
    }
}

/// A stack without the real agent, its artifact store in `root`, with small limits and a
/// fast garbage collector so the tests can reach them.
async fn fake_stack(root: &Path) -> Stack {
    Stack::start_with(StackOptions {
        agent: false,
        env: vec![
            ("DROVER_ARTIFACTS__ROOT".into(), root.display().to_string()),
            ("DROVER_ARTIFACTS__MAX_FILE_BYTES".into(), "4194304".into()),
            (
                "DROVER_ARTIFACTS__MAX_UPLOAD_BYTES".into(),
                "6291456".into(),
            ),
            ("DROVER_ARTIFACTS__MAX_FILES".into(), "20".into()),
            ("DROVER_ARTIFACTS__GC_INTERVAL_SECS".into(), "1".into()),
            ("DROVER_ARTIFACTS__UPLOAD_IDLE_SECS".into(), "2".into()),
        ],
        ..Default::default()
    })
    .await
}

/// Submits `spec`, waits for the assignment to the fake agent, reports it started.
async fn leased(stack: &Stack, agent: &mut FakeAgent, spec: pb::RunSpec) -> (String, u64) {
    let run = submit(stack, spec).await;
    let assigned = wait_run(stack, &run, WAIT, in_state(pb::RunState::Assigned)).await;
    agent.started(&run, assigned.lease_epoch).await.unwrap();
    (run, assigned.lease_epoch)
}

async fn list(stack: &Stack, run: &str) -> Result<Vec<pb::ArtifactEntry>, tonic::Status> {
    stack
        .client()
        .await
        .list_artifacts(pb::ListArtifactsRequest { run_id: run.into() })
        .await
        .map(|r| r.into_inner().entries)
}

async fn get(
    stack: &Stack,
    run: &str,
    path: &str,
) -> Result<(pb::ArtifactEntry, Vec<u8>), tonic::Status> {
    let stream = stack
        .client()
        .await
        .get_artifact(pb::GetArtifactRequest {
            run_id: run.into(),
            path: path.into(),
        })
        .await?
        .into_inner();
    let mut got = collect_artifacts(stream).await?;
    assert_eq!(got.len(), 1, "GetArtifact streams exactly one entry");
    Ok(got.remove(0))
}

async fn upload_rows(stack: &Stack) -> i64 {
    sqlx::query_scalar("SELECT count(*) FROM artifact_uploads")
        .fetch_one(&stack.db)
        .await
        .unwrap()
}

fn staged_dirs(root: &Path) -> usize {
    std::fs::read_dir(root.join("uploads"))
        .map(|d| d.count())
        .unwrap_or(0)
}

fn workspace_files() -> Vec<UploadFile> {
    let big: Vec<u8> = (0..(2 * 1024 * 1024 + 12_345))
        .map(|i: u32| (i % 251) as u8)
        .collect();
    let mut exe = UploadFile::file("bin/run.sh", b"#!/bin/sh\necho hi\n");
    exe.mode = 0o100755;
    vec![
        UploadFile::file("README.md", b"# demo\n"),
        UploadFile::file("app.py", b"print('hello')\n"),
        UploadFile::file("tests/test_cli.py", b"def test_it():\n    assert True\n"),
        UploadFile::file("data/big.bin", &big),
        UploadFile::file("empty.txt", b""),
        UploadFile::file(".drover/result.json", br#"{"status":"success"}"#),
        exe,
        UploadFile::symlink("latest", "data/big.bin"),
        UploadFile::symlink("escape", "../../etc/passwd"),
    ]
}

/// ListArtifacts shows exactly `files` (of attempt 1), and every regular one comes back
/// byte-exact from GetArtifact; returns the listing.
async fn assert_committed_exactly(
    stack: &Stack,
    run: &str,
    files: &[UploadFile],
) -> Vec<pb::ArtifactEntry> {
    let listed = list(stack, run).await.unwrap();
    let mut want: Vec<pb::ArtifactEntry> = files
        .iter()
        .map(|f| pb::ArtifactEntry {
            mode: f.mode & 0o777,
            attempt: 1,
            ..f.header()
        })
        .collect();
    want.sort_by(|a, b| a.path.cmp(&b.path));
    assert_eq!(listed, want, "ListArtifacts shows exactly the manifest");
    for f in files.iter().filter(|f| f.link_target.is_none()) {
        let (entry, data) = get(stack, run, &f.path).await.unwrap();
        assert_eq!(entry.path, f.path);
        assert_eq!(data, f.data, "{} comes back byte-exact", f.path);
        assert_eq!(sha256_hex(&data), entry.sha256);
        assert_eq!(entry.size, data.len() as u64);
    }
    listed
}

/// Unsafe paths, each refused with INVALID_ARGUMENT wherever a path enters.
fn bad_paths() -> Vec<String> {
    let mut v: Vec<String> = [
        "../etc/passwd",
        "../../../../../../etc/passwd",
        "a/../../etc/passwd",
        "a/..",
        "..",
        "./app.py",
        "a/./b",
        "/etc/passwd",
        "//etc/passwd",
        "..\\etc\\passwd",
        "dir\\file",
        "a\0b",
        "app.py\0.txt",
        "a//b",
        "dir/",
        "",
        "%2e%2e%2fetc%2fpasswd",
        "%2E%2E%2Fetc%2Fpasswd",
        "..%2fetc%2fpasswd",
        "%2e%2e/etc/passwd",
        "a/%2e%2e/%2e%2e/etc/passwd",
        "%252e%252e%252fetc%252fpasswd",
        "%2fetc%2fpasswd",
        "a%00b",
        "a%5c..%5cb",
        "C:/Windows/system32",
        "line\nbreak",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    v.push("a".repeat(5000));
    v.push(format!("{}/x", "b".repeat(300)));
    v.push(vec!["d"; 100].join("/"));
    v
}

#[tokio::test]
async fn upload_then_completion_commits_exactly_the_manifest() {
    let root = tempfile::tempdir().unwrap();
    let stack = fake_stack(root.path()).await;
    let mut agent = FakeAgent::register(&stack, "fake-art-1", 4, &[]).await;
    let _hb = agent.keep_alive(stack.db.clone());
    let (run, epoch) = leased(&stack, &mut agent, spec()).await;

    let files = workspace_files();
    let up = agent.upload(&run, epoch, &files).await.unwrap();
    assert_eq!(up.files as usize, files.len());
    assert_eq!(
        up.bytes,
        files.iter().map(|f| f.data.len() as u64).sum::<u64>()
    );
    assert!(
        list(&stack, &run).await.unwrap().is_empty(),
        "a staged upload is not the run's until the completion commits it"
    );

    let done = agent
        .complete_with_artifacts(&run, epoch, pb::Outcome::Succeeded, Some(0), &up.upload_id)
        .await
        .unwrap();
    assert_eq!(done.state, pb::RunState::Succeeded as i32);

    let listed = assert_committed_exactly(&stack, &run, &files).await;
    // Symlinks are stored as symlinks: metadata, no data, never followed.
    let (entry, data) = get(&stack, &run, "escape").await.unwrap();
    assert!(entry.is_symlink);
    assert_eq!(entry.link_target, "../../etc/passwd");
    assert!(data.is_empty(), "a symlink streams no content");
    let (entry, data) = get(&stack, &run, "latest").await.unwrap();
    assert!(entry.is_symlink && data.is_empty() && entry.link_target == "data/big.bin");

    // Content is verified as it is served: bytes changed at rest end the stream DATA_LOSS.
    let upload_dir = root.path().join("uploads").join(
        uuid::Uuid::parse_str(&up.upload_id)
            .unwrap()
            .simple()
            .to_string(),
    );
    let readme_blob = upload_dir.join("0"); // README.md, the first file uploaded
    assert_eq!(std::fs::read(&readme_blob).unwrap(), b"# demo\n");
    std::fs::write(&readme_blob, b"# tampered\n").unwrap();
    let err = get(&stack, &run, "README.md").await.unwrap_err();
    assert_eq!(err.code(), Code::DataLoss, "{err:?}");
    std::fs::write(&readme_blob, b"# demo\n").unwrap();

    // A repeated completion report with the same upload id is a no-op.
    let again = agent
        .complete_with_artifacts(&run, epoch, pb::Outcome::Succeeded, Some(0), &up.upload_id)
        .await
        .unwrap();
    assert_eq!(again.state, pb::RunState::Succeeded as i32);
    assert_eq!(list(&stack, &run).await.unwrap(), listed);

    // Path safety on GetArtifact: the corpus is INVALID_ARGUMENT, never NOT_FOUND or data.
    for p in bad_paths() {
        let err = get(&stack, &run, &p).await.unwrap_err();
        assert_eq!(err.code(), Code::InvalidArgument, "{p:?}: {err:?}");
    }
    // Well-formed but absent: NOT_FOUND, including a directory and a path below a symlink.
    for p in ["missing.txt", "tests", "latest/x", "%2e%2e.txt", "APP.PY"] {
        let err = get(&stack, &run, p).await.unwrap_err();
        assert_eq!(err.code(), Code::NotFound, "{p:?}: {err:?}");
    }
    let unknown = uuid::Uuid::now_v7().to_string();
    assert_eq!(
        get(&stack, &unknown, "app.py").await.unwrap_err().code(),
        Code::NotFound
    );
    assert_eq!(
        list(&stack, &unknown).await.unwrap_err().code(),
        Code::NotFound
    );
    assert_eq!(
        get(&stack, "not-a-uuid", "app.py")
            .await
            .unwrap_err()
            .code(),
        Code::InvalidArgument
    );
    stack.stop().await;
}

/// Small artifacts ride in the completion report: checked by the upload's rules, stored (in
/// Postgres up to 64 KiB, in the store beyond), and committed with the end in one call. A
/// refused report ends nothing and keeps nothing.
#[tokio::test]
async fn inline_artifacts_are_checked_stored_and_committed_with_the_end() {
    let root = tempfile::tempdir().unwrap();
    let stack = fake_stack(root.path()).await;
    let mut agent = FakeAgent::register(&stack, "fake-art-inline", 4, &[]).await;
    let _hb = agent.keep_alive(stack.db.clone());
    let (run, epoch) = leased(&stack, &mut agent, spec()).await;
    let files: Vec<UploadFile> = workspace_files()
        .into_iter()
        .filter(|f| f.path != "data/big.bin" && f.path != "latest")
        .collect();
    let ok = pb::Outcome::Succeeded;

    let mut lying = files.clone();
    lying[0].sha256 = Some(sha256_hex(b"something else"));
    let mut unsafe_path = files.clone();
    unsafe_path[1].path = "../etc/passwd".into();
    let too_big = vec![UploadFile::file("big.bin", &vec![7u8; 1024 * 1024 + 1])];
    for (what, bad) in [
        ("content not matching its sha256", &lying),
        ("an unsafe path", &unsafe_path),
        ("more than 1 MiB inline", &too_big),
    ] {
        let err = agent
            .complete_with_inline(&run, epoch, ok, Some(0), bad)
            .await
            .unwrap_err();
        assert_eq!(err.code(), Code::InvalidArgument, "{what}: {err:?}");
    }
    let up = agent.upload(&run, epoch, &files).await.unwrap();
    let both = pb::ReportCompletionRequest {
        artifact_upload_id: up.upload_id.clone(),
        inline_artifacts: vec![pb::InlineArtifact {
            entry: Some(files[0].header()),
            content: files[0].data.clone(),
        }],
        agent_id: agent.id.clone(),
        run_id: run.clone(),
        lease_epoch: epoch,
        outcome: ok as i32,
        exit_code: Some(0),
        ..Default::default()
    };
    let err = agent.client.report_completion(both).await.unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument, "{err:?}");
    let err = agent
        .complete_with_inline(&run, epoch + 1, ok, Some(0), &files)
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::FailedPrecondition, "stale epoch: {err:?}");
    assert_eq!(
        upload_rows(&stack).await,
        1,
        "no refused report left an upload (the one is the streamed upload)"
    );
    assert_eq!(staged_dirs(root.path()), 1);
    let running = wait_run(&stack, &run, WAIT, in_state(pb::RunState::Running)).await;
    assert_eq!(
        running.lease_epoch, epoch,
        "no refused report ended the run"
    );

    let done = agent
        .complete_with_inline(&run, epoch, ok, Some(0), &files)
        .await
        .unwrap();
    assert_eq!(done.state, pb::RunState::Succeeded as i32);
    let listed = assert_committed_exactly(&stack, &run, &files).await;
    // Under 64 KiB in all: the bytes are in Postgres, one row per regular file, and the
    // store made no directory for them.
    let regular = files.iter().filter(|f| f.link_target.is_none()).count();
    assert_eq!(database_blobs(&stack, &run).await, regular as i64);
    assert!(
        !committed_upload_dir(&stack, root.path(), &run)
            .await
            .exists()
    );
    // They are verified as they are served, as the store's are: bytes changed at rest end
    // the stream DATA_LOSS.
    let tamper = |content: &'static [u8]| {
        sqlx::query(
            "UPDATE artifact_blobs b SET content = $2 FROM artifacts a \
             WHERE a.run_id = $1::uuid AND a.path = 'README.md' \
             AND b.upload_id = a.upload_id AND b.blob = a.blob",
        )
        .bind(run.clone())
        .bind(content)
        .execute(&stack.db)
    };
    tamper(b"# tampered\n").await.unwrap();
    let err = get(&stack, &run, "README.md").await.unwrap_err();
    assert_eq!(err.code(), Code::DataLoss, "{err:?}");
    tamper(b"# demo\n").await.unwrap();
    // A repeat after a lost answer is told what stands, and stores nothing again.
    let again = agent
        .complete_with_inline(&run, epoch, ok, Some(0), &files)
        .await
        .unwrap();
    assert_eq!(again.state, pb::RunState::Succeeded as i32);
    assert_eq!(list(&stack, &run).await.unwrap(), listed);
    assert_eq!(database_blobs(&stack, &run).await, regular as i64);
    let (entry, data) = get(&stack, &run, "escape").await.unwrap();
    assert!(entry.is_symlink && data.is_empty());
    // The streamed upload nobody committed is garbage now that the run ended: its row and
    // its directory go; the inline upload, all in Postgres, stays.
    let collected = stack
        .wait_for(WAIT, || async {
            upload_rows(&stack).await == 1 && staged_dirs(root.path()) == 0
        })
        .await;
    assert!(collected, "only the committed inline upload is left");

    // Over 64 KiB inline (and under the 1 MiB an inline report may carry): the store holds
    // the bytes, Postgres none of them, and they are served the same.
    let (run2, epoch2) = leased(&stack, &mut agent, spec()).await;
    let larger = vec![
        UploadFile::file("data/medium.bin", &vec![3u8; 100 * 1024]),
        UploadFile::file("notes.txt", b"beside it\n"),
    ];
    let done = agent
        .complete_with_inline(&run2, epoch2, ok, Some(0), &larger)
        .await
        .unwrap();
    assert_eq!(done.state, pb::RunState::Succeeded as i32);
    assert_committed_exactly(&stack, &run2, &larger).await;
    assert_eq!(database_blobs(&stack, &run2).await, 0);
    assert!(
        committed_upload_dir(&stack, root.path(), &run2)
            .await
            .is_dir()
    );
    stack.stop().await;
}

/// Where the store would keep the committed upload of `run`.
async fn committed_upload_dir(stack: &Stack, root: &Path, run: &str) -> std::path::PathBuf {
    let id: uuid::Uuid = sqlx::query_scalar(
        "SELECT id FROM artifact_uploads WHERE run_id = $1::uuid AND committed_at IS NOT NULL",
    )
    .bind(run)
    .fetch_one(&stack.db)
    .await
    .unwrap();
    root.join("uploads").join(id.simple().to_string())
}

/// Rows of `artifact_blobs` behind the committed manifest of `run`.
async fn database_blobs(stack: &Stack, run: &str) -> i64 {
    sqlx::query_scalar(
        "SELECT count(*) FROM artifact_blobs b JOIN artifacts a \
         ON b.upload_id = a.upload_id AND b.blob = a.blob WHERE a.run_id = $1::uuid",
    )
    .bind(run)
    .fetch_one(&stack.db)
    .await
    .unwrap()
}

#[tokio::test]
async fn refused_uploads_commit_nothing_and_leave_nothing_staged() {
    let root = tempfile::tempdir().unwrap();
    let stack = fake_stack(root.path()).await;
    let mut agent = FakeAgent::register(&stack, "fake-art-2", 4, &[]).await;
    let _hb = agent.keep_alive(stack.db.clone());
    let (run, epoch) = leased(&stack, &mut agent, spec()).await;

    let good = UploadFile::file("ok.txt", b"fine\n");
    let mut corrupt = UploadFile::file("app.py", b"print('hello')\n");
    corrupt.sha256 = Some(sha256_hex(b"something else"));
    let mut short = UploadFile::file("short.bin", &[7u8; 100]);
    short.size = Some(200);
    let mut long = UploadFile::file("long.bin", &[7u8; 100]);
    long.size = Some(50);
    let mut bad_hex = UploadFile::file("x.txt", b"x");
    bad_hex.sha256 = Some("zz".into());
    let mut link_with_data = UploadFile::symlink("l", "t");
    link_with_data.data = b"data".to_vec();
    let too_big = UploadFile::file("huge.bin", &vec![1u8; 4 * 1024 * 1024 + 1]);
    let cases: Vec<(&str, Vec<UploadFile>, Code)> = vec![
        (
            "corrupted sha256",
            vec![good.clone(), corrupt],
            Code::InvalidArgument,
        ),
        (
            "short file",
            vec![good.clone(), short],
            Code::InvalidArgument,
        ),
        ("more data than declared", vec![long], Code::InvalidArgument),
        ("malformed sha256", vec![bad_hex], Code::InvalidArgument),
        (
            "symlink with data",
            vec![link_with_data],
            Code::InvalidArgument,
        ),
        (
            "duplicate path",
            vec![good.clone(), good.clone()],
            Code::InvalidArgument,
        ),
        (
            "file through a symlink of the same upload",
            vec![
                UploadFile::symlink("etc", "/etc"),
                UploadFile::file("etc/passwd", b"root::0:0\n"),
            ],
            Code::InvalidArgument,
        ),
        (
            "file over the per-file limit",
            vec![too_big],
            Code::ResourceExhausted,
        ),
        (
            "upload over the per-upload limit",
            vec![
                UploadFile::file("a.bin", &vec![1u8; 3 * 1024 * 1024]),
                UploadFile::file("b.bin", &vec![2u8; 3 * 1024 * 1024 + 1]),
            ],
            Code::ResourceExhausted,
        ),
        (
            "too many files",
            (0..21)
                .map(|i| UploadFile::file(&format!("f{i}"), b"x"))
                .collect(),
            Code::ResourceExhausted,
        ),
    ];
    for (what, files, code) in cases {
        let err = agent.upload(&run, epoch, &files).await.unwrap_err();
        assert_eq!(err.code(), code, "{what}: {err:?}");
    }
    // Every spelling of an unsafe path in an upload header.
    for p in bad_paths() {
        let err = agent
            .upload(&run, epoch, &[UploadFile::file(&p, b"x")])
            .await
            .unwrap_err();
        assert_eq!(err.code(), Code::InvalidArgument, "{p:?}: {err:?}");
    }
    // Malformed streams.
    use pb::upload_artifacts_request::Item;
    let mut msgs = agent.upload_messages(&run, epoch, std::slice::from_ref(&good), 1024);
    msgs.remove(0);
    let err = agent.upload_raw(msgs).await.unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument, "no start: {err:?}");
    let mut msgs = agent.upload_messages(&run, epoch, &[], 1024);
    msgs.push(pb::UploadArtifactsRequest {
        item: Some(Item::Data(b"orphan".to_vec())),
    });
    let err = agent.upload_raw(msgs).await.unwrap_err();
    assert_eq!(
        err.code(),
        Code::InvalidArgument,
        "data before a header: {err:?}"
    );
    let big = UploadFile::file("big.bin", &vec![3u8; 1024 * 1024 + 1]);
    let msgs = agent.upload_messages(&run, epoch, &[big], 1024 * 1024 + 1);
    let err = agent.upload_raw(msgs).await.unwrap_err();
    assert_eq!(
        err.code(),
        Code::InvalidArgument,
        "chunk over 1 MiB: {err:?}"
    );

    // A stream the agent abandons half-way (it hung) is cut off after the idle limit and
    // discarded as well.
    let partial = UploadFile::file("partial.bin", &[9u8; 4096]);
    let mut msgs = agent.upload_messages(&run, epoch, &[partial], 1024);
    msgs.truncate(3); // start, header, one of four chunks
    let hanging = futures::stream::iter(msgs).chain(futures::stream::pending());
    let err = agent.upload_raw_stream(hanging).await.unwrap_err();
    assert_eq!(err.code(), Code::DeadlineExceeded, "{err:?}");
    let discarded = stack
        .wait_for(WAIT, || async { upload_rows(&stack).await == 0 })
        .await;
    assert!(discarded, "an abandoned upload is discarded");
    assert_eq!(
        upload_rows(&stack).await,
        0,
        "refused uploads are forgotten"
    );
    assert_eq!(staged_dirs(root.path()), 0, "and their files deleted");

    // Completion naming an unknown upload is refused and ends nothing; a malformed id too.
    let unknown = uuid::Uuid::now_v7().to_string();
    let err = agent
        .complete_with_artifacts(&run, epoch, pb::Outcome::Succeeded, Some(0), &unknown)
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::FailedPrecondition, "{err:?}");
    let err = agent
        .complete_with_artifacts(&run, epoch, pb::Outcome::Succeeded, Some(0), "nope")
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument, "{err:?}");
    let still = wait_run(&stack, &run, WAIT, |_| true).await;
    assert_eq!(still.state, pb::RunState::Running as i32);

    // Completion without an upload: SUCCEEDED, and no manifest at all.
    let done = agent
        .complete(&run, epoch, pb::Outcome::Succeeded, Some(0))
        .await
        .unwrap();
    assert_eq!(done.state, pb::RunState::Succeeded as i32);
    assert!(list(&stack, &run).await.unwrap().is_empty());
    let rows: i64 = sqlx::query_scalar("SELECT count(*) FROM artifacts")
        .fetch_one(&stack.db)
        .await
        .unwrap();
    assert_eq!(rows, 0);

    // An upload for a run that has ended is refused too.
    let err = agent.upload(&run, epoch, &[good]).await.unwrap_err();
    assert_eq!(err.code(), Code::FailedPrecondition, "{err:?}");
    stack.stop().await;
}

#[tokio::test]
async fn uploads_under_a_stale_epoch_are_refused_and_collected() {
    let root = tempfile::tempdir().unwrap();
    let stack = fake_stack(root.path()).await;
    let mut agent = FakeAgent::register(&stack, "fake-art-3", 4, &[]).await;
    let _hb = agent.keep_alive(stack.db.clone());
    let (run, first) = leased(&stack, &mut agent, spec()).await;

    // Upload under the first lease, then hand the run back: the end re-queues, so the upload
    // is accepted as named but not committed.
    let old = agent
        .upload(
            &run,
            first,
            &[UploadFile::file("old.txt", b"from lease 1\n")],
        )
        .await
        .unwrap();
    let handed = agent
        .complete_with_artifacts(&run, first, pb::Outcome::HandedBack, None, &old.upload_id)
        .await
        .unwrap();
    assert_eq!(handed.state, pb::RunState::Queued as i32);
    let again = wait_run(&stack, &run, WAIT, |r| {
        r.state == pb::RunState::Assigned as i32 && r.lease_epoch > first
    })
    .await;
    let second = again.lease_epoch;
    agent.started(&run, second).await.unwrap();

    let err = agent
        .upload(&run, first, &[UploadFile::file("late.txt", b"x")])
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::FailedPrecondition, "stale epoch: {err:?}");

    // The old lease's upload cannot complete the new lease.
    let err = agent
        .complete_with_artifacts(
            &run,
            second,
            pb::Outcome::Succeeded,
            Some(0),
            &old.upload_id,
        )
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::FailedPrecondition, "{err:?}");
    // Refused for its epoch, or — if the collector was quicker — as unknown.
    assert!(
        err.message().contains("epoch") || err.message().contains("not known"),
        "{err:?}"
    );

    // The collector deletes it: its lease is gone, it can never be committed.
    let old_id = uuid::Uuid::parse_str(&old.upload_id).unwrap();
    let collected = stack
        .wait_for(WAIT, || async {
            let n: i64 = sqlx::query_scalar("SELECT count(*) FROM artifact_uploads WHERE id = $1")
                .bind(old_id)
                .fetch_one(&stack.db)
                .await
                .unwrap();
            n == 0
        })
        .await;
    assert!(collected, "the stale upload was garbage-collected");
    assert!(
        !root
            .path()
            .join("uploads")
            .join(old_id.simple().to_string())
            .exists()
    );

    let new = agent
        .upload(
            &run,
            second,
            &[UploadFile::file("new.txt", b"from lease 2\n")],
        )
        .await
        .unwrap();
    agent
        .complete_with_artifacts(
            &run,
            second,
            pb::Outcome::Succeeded,
            Some(0),
            &new.upload_id,
        )
        .await
        .unwrap();
    let listed = list(&stack, &run).await.unwrap();
    assert_eq!(
        listed.iter().map(|e| e.path.as_str()).collect::<Vec<_>>(),
        vec!["new.txt"]
    );
    stack.stop().await;
}

#[tokio::test]
async fn a_follow_up_run_downloads_the_first_runs_workspace() {
    let root = tempfile::tempdir().unwrap();
    let stack = fake_stack(root.path()).await;
    let mut agent = FakeAgent::register(&stack, "fake-art-4", 4, &[]).await;
    let _hb = agent.keep_alive(stack.db.clone());
    let (run1, e1) = leased(&stack, &mut agent, spec()).await;
    let v1 = vec![
        UploadFile::file("README.md", b"# project\n"),
        UploadFile::file("app.py", b"print('v1')\n"),
        UploadFile::file("tests/test_cli.py", b"def test_cli():\n    pass\n"),
    ];

    // Run 2 is submitted while run 1 is still running: its inputs are not ready yet.
    let (run2, e2) = leased(
        &stack,
        &mut agent,
        pb::RunSpec {
            inputs_from_run: run1.clone(),
            outputs: vec!["**".into()],
            ..spec()
        },
    )
    .await;
    let err = agent.download_inputs(&run2, e2).await.unwrap_err();
    assert_eq!(err.code(), Code::FailedPrecondition, "{err:?}");

    let up = agent.upload(&run1, e1, &v1).await.unwrap();
    agent
        .complete_with_artifacts(&run1, e1, pb::Outcome::Succeeded, Some(0), &up.upload_id)
        .await
        .unwrap();

    // Run 2's agent seeds its workspace from run 1, edits app.py, uploads the result.
    let inputs = agent.download_inputs(&run2, e2).await.unwrap();
    let mut seeded: Vec<UploadFile> = inputs
        .iter()
        .map(|(e, data)| {
            assert_eq!(sha256_hex(data), e.sha256, "{} arrives intact", e.path);
            UploadFile::file(&e.path, data)
        })
        .collect();
    assert_eq!(
        seeded.iter().map(|f| f.path.as_str()).collect::<Vec<_>>(),
        vec!["README.md", "app.py", "tests/test_cli.py"]
    );
    for f in &mut seeded {
        if f.path == "app.py" {
            f.data.extend_from_slice(b"# appended by run 2\n");
        }
    }
    seeded.push(UploadFile::file(
        ".drover/result.json",
        br#"{"status":"success","modified_files":["app.py"]}"#,
    ));
    let up2 = agent.upload(&run2, e2, &seeded).await.unwrap();
    // Another run's upload cannot complete this one.
    let err = agent
        .complete_with_artifacts(&run2, e2, pb::Outcome::Succeeded, Some(0), &up.upload_id)
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::FailedPrecondition, "{err:?}");
    agent
        .complete_with_artifacts(&run2, e2, pb::Outcome::Succeeded, Some(0), &up2.upload_id)
        .await
        .unwrap();

    let a1 = list(&stack, &run1).await.unwrap();
    let a2 = list(&stack, &run2).await.unwrap();
    let sha = |v: &[pb::ArtifactEntry], p: &str| {
        v.iter()
            .find(|e| e.path == p)
            .map(|e| e.sha256.clone())
            .unwrap()
    };
    assert_ne!(sha(&a1, "app.py"), sha(&a2, "app.py"), "app.py modified");
    assert_eq!(sha(&a1, "README.md"), sha(&a2, "README.md"));
    assert_eq!(sha(&a1, "tests/test_cli.py"), sha(&a2, "tests/test_cli.py"));
    let (_, app) = get(&stack, &run2, "app.py").await.unwrap();
    assert_eq!(app, b"print('v1')\n# appended by run 2\n");
    assert_eq!(a1.len(), 3, "run 1's manifest is untouched");

    // Unknown or foreign inputs_from_run: refused at submit, naming the field.
    let mut client = stack.client().await;
    let unknown = uuid::Uuid::now_v7().to_string();
    let other_tenant = uuid::Uuid::now_v7();
    let foreign = uuid::Uuid::now_v7();
    let mut tx = stack.db.begin().await.unwrap();
    sqlx::query("INSERT INTO tenants (id, name) VALUES ($1, $2)")
        .bind(other_tenant)
        .bind(format!("other-{other_tenant}"))
        .execute(&mut *tx)
        .await
        .unwrap();
    sqlx::query("CREATE TEMP TABLE copy ON COMMIT DROP AS SELECT * FROM runs WHERE id = $1")
        .bind(uuid::Uuid::parse_str(&run1).unwrap())
        .execute(&mut *tx)
        .await
        .unwrap();
    sqlx::query("UPDATE copy SET id = $1, tenant_id = $2, idempotency_key = NULL")
        .bind(foreign)
        .bind(other_tenant)
        .execute(&mut *tx)
        .await
        .unwrap();
    sqlx::query("INSERT INTO runs SELECT * FROM copy")
        .execute(&mut *tx)
        .await
        .unwrap();
    tx.commit().await.unwrap();
    for (what, id) in [
        ("unknown", unknown.clone()),
        ("foreign", foreign.to_string()),
        ("malformed", "run-1".to_owned()),
    ] {
        let err = client
            .submit_run(pb::SubmitRunRequest {
                spec: Some(pb::RunSpec {
                    inputs_from_run: id,
                    ..spec()
                }),
                idempotency_key: String::new(),
            })
            .await
            .unwrap_err();
        // A malformed id is a bad argument; an unknown run and another tenant's run are the
        // same NOT_FOUND, so nothing confirms that the other tenant's run exists.
        let want = if what == "malformed" {
            Code::InvalidArgument
        } else {
            Code::NotFound
        };
        assert_eq!(err.code(), want, "{what}: {err:?}");
        assert!(err.message().contains("inputs_from_run"), "{what}: {err:?}");
    }
    // Bad output globs are refused at submit as well.
    for glob in ["../*", "/etc/*", "%2e%2e%2f*", "a\\*", "x/**y"] {
        let err = client
            .submit_run(pb::SubmitRunRequest {
                spec: Some(pb::RunSpec {
                    outputs: vec![glob.into()],
                    ..spec()
                }),
                idempotency_key: String::new(),
            })
            .await
            .unwrap_err();
        assert_eq!(err.code(), Code::InvalidArgument, "{glob}: {err:?}");
    }

    // A run naming no inputs has none to download.
    let (run3, e3) = leased(&stack, &mut agent, spec()).await;
    let err = agent.download_inputs(&run3, e3).await.unwrap_err();
    assert_eq!(err.code(), Code::FailedPrecondition, "{err:?}");
    // A source that left the tenant after the submit is not served (checked at download).
    let (run4, e4) = leased(
        &stack,
        &mut agent,
        pb::RunSpec {
            inputs_from_run: run1.clone(),
            ..spec()
        },
    )
    .await;
    sqlx::query("UPDATE runs SET tenant_id = $1 WHERE id = $2")
        .bind(other_tenant)
        .bind(uuid::Uuid::parse_str(&run1).unwrap())
        .execute(&stack.db)
        .await
        .unwrap();
    let err = agent.download_inputs(&run4, e4).await.unwrap_err();
    assert_eq!(err.code(), Code::NotFound, "{err:?}");
    // A run that has ended cannot download.
    let err = agent.download_inputs(&run2, e2).await.unwrap_err();
    assert_eq!(err.code(), Code::FailedPrecondition, "{err:?}");
    stack.stop().await;
}

async fn drover(stack: &Stack, args: &[&str]) -> (i32, Vec<u8>, String) {
    stack.cli(args).await
}

#[tokio::test]
async fn cli_artifacts_ls_and_get() {
    let root = tempfile::tempdir().unwrap();
    let stack = fake_stack(root.path()).await;
    let mut agent = FakeAgent::register(&stack, "fake-art-5", 4, &[]).await;
    let _hb = agent.keep_alive(stack.db.clone());
    let (run, epoch) = leased(&stack, &mut agent, spec()).await;
    let files = workspace_files();
    let up = agent.upload(&run, epoch, &files).await.unwrap();
    agent
        .complete_with_artifacts(&run, epoch, pb::Outcome::Succeeded, Some(0), &up.upload_id)
        .await
        .unwrap();

    let (code, out, err) = drover(&stack, &["artifacts", "ls", &run]).await;
    assert_eq!(code, 0, "{err}");
    let out = String::from_utf8(out).unwrap();
    for f in &files {
        assert!(out.contains(&f.path), "{} listed:\n{out}", f.path);
    }
    assert!(out.contains("escape -> ../../etc/passwd"), "{out}");
    assert!(out.contains("0755"), "{out}");

    let (code, out, err) = drover(&stack, &["artifacts", "ls", &run, "--json"]).await;
    assert_eq!(code, 0, "{err}");
    let lines: Vec<serde_json::Value> = String::from_utf8(out)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(lines.len(), files.len());

    let (code, out, err) = drover(&stack, &["artifacts", "get", &run, "app.py"]).await;
    assert_eq!(code, 0, "{err}");
    assert_eq!(out, b"print('hello')\n", "stdout is the content");

    let dir = tempfile::tempdir().unwrap();
    let dest = dir.path().join("big.bin");
    let (code, out, err) = drover(
        &stack,
        &[
            "artifacts",
            "get",
            &run,
            "data/big.bin",
            "-o",
            dest.to_str().unwrap(),
        ],
    )
    .await;
    assert_eq!(code, 0, "{err}");
    assert!(out.is_empty());
    let big = files.iter().find(|f| f.path == "data/big.bin").unwrap();
    assert_eq!(std::fs::read(&dest).unwrap(), big.data);

    let exe = dir.path().join("run.sh");
    let (code, _, err) = drover(
        &stack,
        &[
            "artifacts",
            "get",
            &run,
            "bin/run.sh",
            "-o",
            exe.to_str().unwrap(),
        ],
    )
    .await;
    assert_eq!(code, 0, "{err}");
    use std::os::unix::fs::PermissionsExt;
    assert_eq!(
        std::fs::metadata(&exe).unwrap().permissions().mode() & 0o777,
        0o755
    );

    let (code, out, err) = drover(&stack, &["artifacts", "get", &run, "escape"]).await;
    assert_ne!(code, 0);
    assert!(out.is_empty());
    assert!(
        err.contains("symlink") && err.contains("../../etc/passwd"),
        "{err}"
    );
    let link = dir.path().join("escape");
    let (code, _, err) = drover(
        &stack,
        &[
            "artifacts",
            "get",
            &run,
            "escape",
            "-o",
            link.to_str().unwrap(),
        ],
    )
    .await;
    assert_eq!(code, 0, "{err}");
    assert_eq!(
        std::fs::read_link(&link).unwrap().to_str(),
        Some("../../etc/passwd"),
        "recreated as a link, not followed"
    );

    let (code, _, err) = drover(&stack, &["artifacts", "get", &run, "../etc/passwd"]).await;
    assert_ne!(code, 0);
    assert!(err.contains("invalid"), "{err}");
    let (code, _, err) = drover(&stack, &["artifacts", "get", &run, "missing.txt"]).await;
    assert_ne!(code, 0);
    assert!(err.contains("artifact not found"), "{err}");
    let unknown = uuid::Uuid::now_v7().to_string();
    let (code, _, err) = drover(&stack, &["artifacts", "ls", &unknown]).await;
    assert_ne!(code, 0);
    assert!(err.contains("run not found"), "{err}");
    stack.stop().await;
}

#[tokio::test]
async fn a_redriven_run_that_ends_again_replaces_its_manifest() {
    let root = tempfile::tempdir().unwrap();
    let stack = fake_stack(root.path()).await;
    let mut agent = FakeAgent::register(&stack, "fake-redrive", 4, &[]).await;
    let retried = pb::RunSpec {
        max_attempts: 1,
        retry: Some(pb::RetryPolicy {
            retry_exit_codes: vec![3],
            ..Default::default()
        }),
        ..spec()
    };

    // The only attempt fails retryably with its artifacts: dead-lettered, manifest committed.
    let (run, epoch) = leased(&stack, &mut agent, retried).await;
    let first = agent
        .upload(&run, epoch, &[UploadFile::file("first.txt", b"one")])
        .await
        .unwrap()
        .upload_id;
    let ended = agent
        .complete_with_artifacts(&run, epoch, pb::Outcome::Failed, Some(3), &first)
        .await
        .unwrap();
    assert_eq!(ended.state, pb::RunState::DeadLettered as i32);
    let paths = |entries: Vec<pb::ArtifactEntry>| -> Vec<String> {
        entries.into_iter().map(|e| e.path).collect()
    };
    assert_eq!(paths(list(&stack, &run).await.unwrap()), ["first.txt"]);

    // Redriven, it succeeds with other artifacts: they replace the first manifest whole.
    stack
        .admin()
        .await
        .redrive_run(pb::RedriveRunRequest {
            run_id: run.clone(),
            reason: "again".into(),
        })
        .await
        .unwrap();
    let assigned = wait_run(&stack, &run, WAIT, |r| {
        r.attempt == 2 && r.state == pb::RunState::Assigned as i32
    })
    .await;
    let epoch = assigned.lease_epoch;
    agent.started(&run, epoch).await.unwrap();
    let second = agent
        .upload(&run, epoch, &[UploadFile::file("second.txt", b"two")])
        .await
        .unwrap()
        .upload_id;
    let ended = agent
        .complete_with_artifacts(&run, epoch, pb::Outcome::Succeeded, Some(0), &second)
        .await
        .unwrap();
    assert_eq!(ended.state, pb::RunState::Succeeded as i32);
    assert_eq!(paths(list(&stack, &run).await.unwrap()), ["second.txt"]);
    let committed: Vec<String> = sqlx::query_scalar(
        "SELECT id::text FROM artifact_uploads WHERE run_id = $1 AND committed_at IS NOT NULL",
    )
    .bind(uuid::Uuid::parse_str(&run).unwrap())
    .fetch_all(&stack.db)
    .await
    .unwrap();
    assert_eq!(committed, [second], "one committed upload: the last");
    stack.stop().await;
}

/// A mock run given no inputs has no workspace directory to start in: the agent makes its
/// `request.json` and `result.json` in memory and sends them as the run's artifacts, the same
/// records a directory would have held (and, under 64 KiB, the API keeps them in Postgres).
/// What the simulation writes, files or output, still arrives beside them.
#[tokio::test]
async fn a_mock_run_without_inputs_sends_its_records_made_in_memory() {
    let workspaces = tempfile::tempdir().unwrap();
    let stack = Stack::start_with(StackOptions {
        agent_executor: "mock".into(),
        agent_env: vec![(
            "DROVER_WORKSPACE_ROOT".into(),
            workspaces.path().display().to_string(),
        )],
        ..Default::default()
    })
    .await;
    let mock_spec = |mock: pb::MockBehavior| pb::RunSpec {
        image: "none".into(),
        command: vec!["true".into()],
        env: [("MODE".to_owned(), "quiet".to_owned())].into(),
        mock: Some(mock),
        ..Default::default()
    };
    let finish = |spec: pb::RunSpec| {
        let stack = &stack;
        async move {
            let run = submit(stack, spec).await;
            let done = wait_run(stack, &run, WAIT, |r| {
                r.state == pb::RunState::Succeeded as i32 || r.state == pb::RunState::Failed as i32
            })
            .await;
            assert_eq!(done.state, pb::RunState::Succeeded as i32, "{done:?}");
            let paths: Vec<String> = list(stack, &run)
                .await
                .unwrap()
                .into_iter()
                .map(|e| e.path)
                .collect();
            (run, paths)
        }
    };
    let json = |run: String, path: &'static str| {
        let stack = &stack;
        async move {
            let (entry, data) = get(stack, &run, path).await.unwrap();
            assert_eq!(entry.mode, 0o644, "{path}");
            serde_json::from_slice::<serde_json::Value>(&data).unwrap()
        }
    };

    // Silent, no files: the two records, and nothing else.
    let (quiet, paths) = finish(mock_spec(pb::MockBehavior::default())).await;
    assert_eq!(paths, [".drover/request.json", ".drover/result.json"]);
    let request = json(quiet.clone(), ".drover/request.json").await;
    assert_eq!(request["run_id"], quiet.as_str());
    assert_eq!(request["executor"], "mock");
    assert_eq!(
        request["env"]["MODE"], "present",
        "names only, never values"
    );
    assert_eq!(request["inputs"], serde_json::json!([]));
    let result = json(quiet.clone(), ".drover/result.json").await;
    assert_eq!(result["status"], "success");
    assert_eq!(result["exit_code"], 0);
    assert_eq!(result["created_files"], serde_json::json!([]));
    assert_eq!(database_blobs(&stack, &quiet).await, 2);

    // Output and a file: its stored log and the file beside the records, the file listed
    // as created.
    let (busy, paths) = finish(mock_spec(pb::MockBehavior {
        stdout: vec!["hello".into()],
        files: vec![pb::MockFile {
            path: "out/report.txt".into(),
            content: b"done\n".to_vec(),
        }],
        ..Default::default()
    }))
    .await;
    assert_eq!(
        paths,
        [
            ".drover/logs/stdout.log",
            ".drover/request.json",
            ".drover/result.json",
            "out/report.txt"
        ]
    );
    let result = json(busy.clone(), ".drover/result.json").await;
    assert_eq!(
        result["created_files"],
        serde_json::json!(["out/report.txt"])
    );
    let (_, log) = get(&stack, &busy, ".drover/logs/stdout.log").await.unwrap();
    assert_eq!(log, b"hello\n");
    let (_, report) = get(&stack, &busy, "out/report.txt").await.unwrap();
    assert_eq!(report, b"done\n");
    stack.stop().await;
}
