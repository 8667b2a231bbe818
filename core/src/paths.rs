//! Checks for paths that enter drover from outside as names of files to create (inline
//! inputs, mock output files): a path must stay inside the workspace it is joined to, whatever
//! the joining code does. The check is purely lexical (no file system access), so it can run
//! in the API at submit time and again on the agent; symlinks on disk are the joining code's
//! concern.

use std::fmt;

/// A validated relative path: `/`-separated, no empty, `.` or `..` components, no leading or
/// trailing slash. Joining it to a directory never leaves that directory lexically.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct NormalPath(String);

impl NormalPath {
    pub fn as_str(&self) -> &str {
        &self.0
    }

    pub fn into_string(self) -> String {
        self.0
    }

    /// Its components, outermost first.
    pub fn components(&self) -> impl Iterator<Item = &str> {
        self.0.split('/')
    }

    /// True when the path is `prefix` or lies under the directory `prefix`.
    pub fn starts_with(&self, prefix: &str) -> bool {
        self.0 == prefix
            || (self.0.starts_with(prefix) && self.0.as_bytes().get(prefix.len()) == Some(&b'/'))
    }
}

impl fmt::Display for NormalPath {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// Why a path was refused. The message is safe to return to clients.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PathError {
    /// One of the rules every path from outside follows ([`crate::artifact_paths`]).
    #[error(transparent)]
    Unsafe(#[from] crate::artifact_paths::PathError),
    #[error("must not contain percent-encoded characters")]
    PercentEncoded,
}

/// Accepts `path` only if it is already a normal relative path; nothing is rewritten, so what
/// the client sent is exactly what is stored. The rules are those of artifact paths
/// ([`crate::artifact_paths::validate_artifact_path`]: empty, absolute, `..`, `.` or empty
/// segments, backslashes, NUL and control characters, over-long paths are refused), plus no
/// `%` at all: an input path is a name the client chose, never something a layer decodes.
pub fn validate_relative(path: &str) -> Result<NormalPath, PathError> {
    crate::artifact_paths::validate_artifact_path(path)?;
    if path.contains('%') {
        return Err(PathError::PercentEncoded);
    }
    Ok(NormalPath(path.to_owned()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn normal_paths_pass_unchanged() {
        for p in [
            "a",
            "README.md",
            "src/app.py",
            "tests/test_cli.py",
            ".hidden/x",
            "a..b",
        ] {
            assert_eq!(validate_relative(p).unwrap().as_str(), p);
        }
    }

    #[test]
    fn hostile_paths_are_refused() {
        let long = "a/".repeat(600) + "b";
        let long_component = "x".repeat(256);
        for p in [
            "",
            "/etc/passwd",
            "../etc/passwd",
            "a/../../b",
            "a/..",
            "..",
            "a\\..\\b",
            "./a",
            "a//b",
            "a/",
            "a\0b",
            "a\nb",
            &long,
            &long_component,
        ] {
            assert!(
                matches!(validate_relative(p), Err(PathError::Unsafe(_))),
                "{p:?}"
            );
        }
        for p in ["%2e%2e%2fetc", "..%2fetc", "100%.txt"] {
            assert!(validate_relative(p).is_err(), "{p:?}");
        }
        assert_eq!(
            validate_relative("100%.txt"),
            Err(PathError::PercentEncoded)
        );
    }

    #[test]
    fn prefix_is_per_component() {
        let p = validate_relative(".drover/request.json").unwrap();
        assert!(p.starts_with(".drover"));
        assert!(
            !validate_relative(".droverx/a")
                .unwrap()
                .starts_with(".drover")
        );
        assert!(validate_relative(".drover").unwrap().starts_with(".drover"));
    }
}
