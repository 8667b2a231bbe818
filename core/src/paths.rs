//! Checks for paths that enter drover from outside (inline inputs, mock output files, and
//! later artifact requests): a path must stay inside the workspace it is joined to, whatever
//! the joining code does. The check is purely lexical (no file system access), so it can run
//! in the API at submit time and again on the agent; symlinks on disk are the joining code's
//! concern.

use std::fmt;

/// Longest accepted path, in bytes (well under `PATH_MAX` once joined to a workspace root).
pub const MAX_PATH_BYTES: usize = 1024;
/// Longest accepted path component, in bytes (`NAME_MAX` on common file systems).
pub const MAX_COMPONENT_BYTES: usize = 255;

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
    #[error("must not be empty")]
    Empty,
    #[error("must be at most {MAX_PATH_BYTES} bytes")]
    TooLong,
    #[error("each component must be at most {MAX_COMPONENT_BYTES} bytes")]
    ComponentTooLong,
    #[error("must not contain NUL or control characters")]
    ControlCharacter,
    #[error("must be relative (no leading '/')")]
    Absolute,
    #[error("must not contain '..'")]
    ParentComponent,
    #[error("must be normalised (no empty or '.' components, no backslashes, no trailing '/')")]
    NotNormal,
    #[error("must not contain percent-encoded characters")]
    PercentEncoded,
}

/// Accepts `path` only if it is already a normal relative path; nothing is rewritten, so what
/// the client sent is exactly what is stored. Refused: empty, absolute, `..` anywhere, `.` or
/// empty components (`a//b`, `./a`, `a/`), backslashes (a Windows separator on some readers),
/// `%` escapes (a path decoded twice must not change meaning), NUL and control characters,
/// over-long paths and components.
pub fn validate_relative(path: &str) -> Result<NormalPath, PathError> {
    if path.is_empty() {
        return Err(PathError::Empty);
    }
    if path.len() > MAX_PATH_BYTES {
        return Err(PathError::TooLong);
    }
    if path.chars().any(char::is_control) {
        return Err(PathError::ControlCharacter);
    }
    if path.starts_with('/') {
        return Err(PathError::Absolute);
    }
    if path.contains('%') {
        return Err(PathError::PercentEncoded);
    }
    if path.contains('\\') {
        return Err(PathError::NotNormal);
    }
    for component in path.split('/') {
        match component {
            ".." => return Err(PathError::ParentComponent),
            "" | "." => return Err(PathError::NotNormal),
            c if c.len() > MAX_COMPONENT_BYTES => return Err(PathError::ComponentTooLong),
            _ => {}
        }
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
        let cases: Vec<(&str, PathError)> = vec![
            ("", PathError::Empty),
            ("/etc/passwd", PathError::Absolute),
            ("../etc/passwd", PathError::ParentComponent),
            ("a/../../b", PathError::ParentComponent),
            ("a/..", PathError::ParentComponent),
            ("..", PathError::ParentComponent),
            ("%2e%2e%2fetc", PathError::PercentEncoded),
            ("..%2fetc", PathError::PercentEncoded),
            ("a\\..\\b", PathError::NotNormal),
            ("./a", PathError::NotNormal),
            ("a//b", PathError::NotNormal),
            ("a/", PathError::NotNormal),
            ("a\0b", PathError::ControlCharacter),
            ("a\nb", PathError::ControlCharacter),
            (&long, PathError::TooLong),
            (&long_component, PathError::ComponentTooLong),
        ];
        for (p, want) in cases {
            assert_eq!(validate_relative(p), Err(want), "{p:?}");
        }
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
