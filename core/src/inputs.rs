//! The file-carrying parts of a run spec: inline input files written into the workspace before
//! a run starts, and the mock executor's simulated behaviour (which also writes files). Both
//! are bounded and their paths checked with [`crate::paths::validate_relative`].

use std::collections::BTreeSet;

use serde::{Deserialize, Serialize};

use crate::paths::validate_relative;
use crate::spec::{MAX_TIMEOUT_SECS, ValidationError};

/// Most inline input files per run.
pub const MAX_INPUT_FILES: usize = 1000;
/// Most bytes of inline input content per run. Kept under gRPC's default 4 MiB message limit
/// (the API's SubmitRun and GetRun, the agent's GetAssignment all carry the whole spec).
pub const MAX_INPUT_BYTES: usize = 3 * 1024 * 1024;
/// Mode given to an input whose mode is 0.
pub const DEFAULT_INPUT_MODE: u32 = 0o644;
/// The workspace directory drover itself writes (request and result files); runs' files may
/// not be placed there.
pub const DROVER_DIR: &str = ".drover";
/// Most log lines a mock run prints (per stream), and the longest line.
pub const MAX_MOCK_LINES: usize = 100_000;
pub const MAX_MOCK_LINE_BYTES: usize = 16 * 1024;
/// Most bytes of a mock run's lines and files together (the spec stays small).
pub const MAX_MOCK_BYTES: usize = 512 * 1024;

/// One file put into the workspace. Content is stored base64-encoded in the spec's JSON.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct InputFile {
    /// Validated relative path.
    pub path: String,
    #[serde(with = "base64_bytes")]
    pub content: Vec<u8>,
    /// Unix permission bits, `0o644` when the client sent 0.
    pub mode: u32,
}

/// A simulated run for the mock executor.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct MockBehavior {
    pub duration_ms: u64,
    pub exit_code: i32,
    #[serde(default)]
    pub stdout: Vec<String>,
    #[serde(default)]
    pub stderr: Vec<String>,
    /// Written into the workspace when the simulated process exits.
    #[serde(default)]
    pub files: Vec<InputFile>,
}

impl MockBehavior {
    pub fn is_empty(&self) -> bool {
        self == &MockBehavior::default()
    }
}

fn invalid(field: &'static str, message: impl Into<String>) -> ValidationError {
    ValidationError {
        field,
        message: message.into(),
    }
}

/// Checks inline files: count, total size, paths (relative, normalised, confined, not under
/// `.drover/`, unique, none a directory of another) and modes.
pub fn validate_files(
    field: &'static str,
    files: Vec<InputFile>,
) -> Result<Vec<InputFile>, ValidationError> {
    if files.len() > MAX_INPUT_FILES {
        return Err(invalid(
            field,
            format!("at most {MAX_INPUT_FILES} files, got {}", files.len()),
        ));
    }
    let total: usize = files.iter().map(|f| f.content.len()).sum();
    if total > MAX_INPUT_BYTES {
        return Err(invalid(
            field,
            format!("at most {MAX_INPUT_BYTES} bytes of content in all, got {total}"),
        ));
    }
    let mut seen = BTreeSet::new();
    let mut out = Vec::with_capacity(files.len());
    for f in files {
        let path = validate_relative(&f.path)
            .map_err(|e| invalid(field, format!("path {:?}: {e}", f.path)))?;
        if path.starts_with(DROVER_DIR) {
            return Err(invalid(
                field,
                format!("path {path:?}: {DROVER_DIR}/ is reserved for drover"),
            ));
        }
        if !seen.insert(path.as_str().to_owned()) {
            return Err(invalid(field, format!("path {path:?} is given twice")));
        }
        let mode = if f.mode == 0 {
            DEFAULT_INPUT_MODE
        } else {
            f.mode
        };
        if mode > 0o777 {
            return Err(invalid(
                field,
                format!("path {path:?}: mode must be permission bits (at most 0777)"),
            ));
        }
        out.push(InputFile {
            path: path.into_string(),
            content: f.content,
            mode,
        });
    }
    // "a" and "a/b" cannot both be files.
    for p in &seen {
        let mut prefix = String::new();
        for c in p.split('/') {
            if !prefix.is_empty() && seen.contains(&prefix) {
                return Err(invalid(
                    field,
                    format!("path {prefix:?} is a file but also a directory of {p:?}"),
                ));
            }
            if !prefix.is_empty() {
                prefix.push('/');
            }
            prefix.push_str(c);
        }
    }
    Ok(out)
}

/// Checks a mock behaviour. Its duration may exceed the run's timeout (that is how a timeout
/// is simulated) but not the longest timeout a spec may have.
pub fn validate_mock(mock: MockBehavior) -> Result<MockBehavior, ValidationError> {
    const FIELD: &str = "spec.mock";
    if mock.duration_ms > u64::from(MAX_TIMEOUT_SECS) * 1000 {
        return Err(invalid(
            FIELD,
            format!(
                "duration_ms must be at most {} (24 h)",
                u64::from(MAX_TIMEOUT_SECS) * 1000
            ),
        ));
    }
    for lines in [&mock.stdout, &mock.stderr] {
        if lines.len() > MAX_MOCK_LINES {
            return Err(invalid(
                FIELD,
                format!("at most {MAX_MOCK_LINES} lines per stream"),
            ));
        }
        if lines.iter().any(|l| l.len() > MAX_MOCK_LINE_BYTES) {
            return Err(invalid(
                FIELD,
                format!("each line must be at most {MAX_MOCK_LINE_BYTES} bytes"),
            ));
        }
    }
    let total: usize = mock
        .stdout
        .iter()
        .chain(&mock.stderr)
        .map(String::len)
        .sum::<usize>()
        + mock.files.iter().map(|f| f.content.len()).sum::<usize>();
    if total > MAX_MOCK_BYTES {
        return Err(invalid(
            FIELD,
            format!("lines and files must be at most {MAX_MOCK_BYTES} bytes in all, got {total}"),
        ));
    }
    let files = validate_files("spec.mock.files", mock.files)?;
    Ok(MockBehavior { files, ..mock })
}

/// Bytes as standard base64 in JSON, so a 3 MiB input is not a 11 MiB array of numbers.
mod base64_bytes {
    use base64::Engine;
    use base64::engine::general_purpose::STANDARD;
    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(bytes: &[u8], s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&STANDARD.encode(bytes))
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<u8>, D::Error> {
        let text = String::deserialize(d)?;
        STANDARD.decode(text).map_err(serde::de::Error::custom)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn file(path: &str, size: usize) -> InputFile {
        InputFile {
            path: path.into(),
            content: vec![b'x'; size],
            mode: 0,
        }
    }

    #[test]
    fn good_inputs_get_default_modes() {
        let out =
            validate_files("spec.inputs", vec![file("a.txt", 3), file("src/b.py", 1)]).unwrap();
        assert_eq!(out[0].mode, 0o644);
        assert_eq!(out[1].path, "src/b.py");
    }

    #[test]
    fn bad_inputs_name_the_field() {
        let cases = vec![
            vec![file("../x", 1)],
            vec![file("/etc/passwd", 1)],
            vec![file(".drover/result.json", 1)],
            vec![file("a", 1), file("a", 1)],
            vec![file("a", 1), file("a/b", 1)],
            vec![file("a", MAX_INPUT_BYTES + 1)],
            (0..=MAX_INPUT_FILES)
                .map(|i| file(&format!("f{i}"), 0))
                .collect(),
            vec![InputFile {
                mode: 0o4755,
                ..file("a", 1)
            }],
        ];
        for files in cases {
            let err = validate_files("spec.inputs", files).unwrap_err();
            assert_eq!(err.field, "spec.inputs", "{err}");
        }
    }

    #[test]
    fn content_round_trips_as_base64() {
        let f = InputFile {
            path: "a".into(),
            content: vec![0, 255, 10],
            mode: 0o600,
        };
        let json = serde_json::to_string(&f).unwrap();
        assert!(json.contains("\"AP8K\""), "{json}");
        assert_eq!(serde_json::from_str::<InputFile>(&json).unwrap(), f);
    }

    #[test]
    fn mock_files_and_lines_are_bounded() {
        let ok = MockBehavior {
            duration_ms: 100,
            stdout: vec!["hi".into()],
            files: vec![file("out.txt", 2)],
            ..Default::default()
        };
        assert!(validate_mock(ok.clone()).is_ok());
        let long = MockBehavior {
            duration_ms: 86_400_001,
            ..ok.clone()
        };
        assert_eq!(validate_mock(long).unwrap_err().field, "spec.mock");
        let bad_file = MockBehavior {
            files: vec![file("../out", 1)],
            ..ok
        };
        assert_eq!(
            validate_mock(bad_file).unwrap_err().field,
            "spec.mock.files"
        );
    }
}
