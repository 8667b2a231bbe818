//! Path safety for everything artifact-related that enters from outside: upload headers,
//! GetArtifact requests and the spec's `outputs` globs (issue 4, item 6).
//!
//! A path is accepted only in its one canonical form: relative, `/`-separated, no empty, `.`
//! or `..` segment, no backslash, no NUL or other control character, no Windows drive prefix,
//! bounded in length and depth. Nothing is normalised silently (`a//b` or `./a` are refused,
//! not rewritten), so the path stored is exactly the path the client gave. Because clients,
//! proxies and shells percent-decode at different layers, the path is also percent-decoded
//! (repeatedly, to catch `%252e`) and every decoded form must pass the same checks: `%2e%2e%2f`
//! is refused like `../`, while `100%.txt` or `a%20b` stay legal names.
//!
//! Symlinks are not resolved here: the artifact store records them as entries with a target
//! and never follows them; [`symlink_escapes`] tells a consumer (the agent seeding a
//! workspace) whether a target would leave the root.

/// Longest accepted path, in bytes (Linux `PATH_MAX` is 4096; artifacts stay well below).
pub const MAX_PATH_BYTES: usize = 1024;
/// Longest accepted segment, in bytes (`NAME_MAX` on common file systems).
pub const MAX_SEGMENT_BYTES: usize = 255;
/// Deepest accepted path, in segments.
pub const MAX_DEPTH: usize = 64;
/// Longest accepted symlink target, in bytes.
pub const MAX_LINK_TARGET_BYTES: usize = 4096;
/// How many rounds of percent-decoding are checked (`%25` nests one level per round).
const DECODE_ROUNDS: usize = 4;

/// Why a path was refused. The message is safe to return to clients (it never echoes the
/// path, which may be large or binary).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PathError {
    #[error("must not be empty")]
    Empty,
    #[error("must be at most {MAX_PATH_BYTES} bytes")]
    TooLong,
    #[error("must be at most {MAX_DEPTH} segments deep")]
    TooDeep,
    #[error("each segment must be at most {MAX_SEGMENT_BYTES} bytes")]
    SegmentTooLong,
    #[error("must be relative (no leading '/')")]
    Absolute,
    #[error("must not contain a backslash")]
    Backslash,
    #[error("must not contain NUL or control characters")]
    Control,
    #[error("must not contain empty segments ('//' or a trailing '/')")]
    EmptySegment,
    #[error("must not contain '.' segments")]
    DotSegment,
    #[error("must not contain '..' segments")]
    Traversal,
    #[error("must not start with a drive letter")]
    Drive,
    #[error("is unsafe once percent-decoded: {0}")]
    Encoded(Box<PathError>),
    #[error("glob: {0}")]
    Glob(&'static str),
    #[error("appears twice in the upload")]
    Duplicate,
    #[error("conflicts with another entry (a file or symlink cannot also be a directory)")]
    Conflict,
}

/// The paths of one manifest, checked as they are added: no duplicates, and no entry below
/// another entry — a file `a` and a file `a/b` cannot both exist, and a file cannot be
/// reached through a symlink of the same manifest (`link -> /etc` then `link/passwd`).
#[derive(Debug, Default)]
pub struct ManifestPaths {
    paths: std::collections::BTreeSet<String>,
}

impl ManifestPaths {
    /// Validates `path` ([`validate_artifact_path`]) and records it.
    pub fn insert(&mut self, path: &str) -> Result<(), PathError> {
        validate_artifact_path(path)?;
        if self.paths.contains(path) {
            return Err(PathError::Duplicate);
        }
        let mut prefix_end = 0;
        while let Some(i) = path[prefix_end..].find('/') {
            prefix_end += i;
            if self.paths.contains(&path[..prefix_end]) {
                return Err(PathError::Conflict);
            }
            prefix_end += 1;
        }
        let below = format!("{path}/");
        if self
            .paths
            .range(below.clone()..)
            .next()
            .is_some_and(|p| p.starts_with(&below))
        {
            return Err(PathError::Conflict);
        }
        self.paths.insert(path.to_owned());
        Ok(())
    }

    pub fn len(&self) -> usize {
        self.paths.len()
    }

    pub fn is_empty(&self) -> bool {
        self.paths.is_empty()
    }
}

/// Checks an artifact path (upload header, GetArtifact request). Returns it unchanged.
pub fn validate_artifact_path(path: &str) -> Result<&str, PathError> {
    check_plain(path)?;
    check_decoded(path)?;
    Ok(path)
}

/// Checks an `outputs` glob: the same rules as a path, segment by segment, plus well-formed
/// glob syntax (`*`, `?`, `[...]`, and `**` only as a whole segment).
pub fn validate_glob(pattern: &str) -> Result<&str, PathError> {
    check_plain(pattern)?;
    check_decoded(pattern)?;
    for seg in pattern.split('/') {
        check_glob_segment(seg)?;
    }
    Ok(pattern)
}

fn check_plain(path: &str) -> Result<(), PathError> {
    if path.is_empty() {
        return Err(PathError::Empty);
    }
    if path.len() > MAX_PATH_BYTES {
        return Err(PathError::TooLong);
    }
    if path.chars().any(|c| c.is_control()) {
        return Err(PathError::Control);
    }
    if path.contains('\\') {
        return Err(PathError::Backslash);
    }
    if path.starts_with('/') {
        return Err(PathError::Absolute);
    }
    let b = path.as_bytes();
    if b.len() >= 2 && b[0].is_ascii_alphabetic() && b[1] == b':' {
        return Err(PathError::Drive);
    }
    let mut depth = 0;
    for seg in path.split('/') {
        depth += 1;
        match seg {
            "" => return Err(PathError::EmptySegment),
            "." => return Err(PathError::DotSegment),
            ".." => return Err(PathError::Traversal),
            s if s.len() > MAX_SEGMENT_BYTES => return Err(PathError::SegmentTooLong),
            _ => {}
        }
    }
    if depth > MAX_DEPTH {
        return Err(PathError::TooDeep);
    }
    Ok(())
}

fn check_decoded(path: &str) -> Result<(), PathError> {
    let mut current: Vec<u8> = path.as_bytes().to_vec();
    for _ in 0..DECODE_ROUNDS {
        let decoded = percent_decode(&current);
        if decoded == current {
            return Ok(());
        }
        // Decoded bytes that are not UTF-8 cannot name a traversal; check what they can.
        let text = String::from_utf8_lossy(&decoded);
        check_plain(&text).map_err(|e| PathError::Encoded(Box::new(e)))?;
        current = decoded;
    }
    Ok(())
}

/// One round of `%XX` decoding; malformed escapes are kept as they are.
fn percent_decode(input: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(input.len());
    let mut i = 0;
    while i < input.len() {
        if input[i] == b'%'
            && i + 2 < input.len()
            && let (Some(h), Some(l)) = (hex_val(input[i + 1]), hex_val(input[i + 2]))
        {
            out.push(h * 16 + l);
            i += 3;
            continue;
        }
        out.push(input[i]);
        i += 1;
    }
    out
}

fn hex_val(b: u8) -> Option<u8> {
    match b {
        b'0'..=b'9' => Some(b - b'0'),
        b'a'..=b'f' => Some(b - b'a' + 10),
        b'A'..=b'F' => Some(b - b'A' + 10),
        _ => None,
    }
}

fn check_glob_segment(seg: &str) -> Result<(), PathError> {
    if seg.contains("**") && seg != "**" {
        return Err(PathError::Glob("'**' must be a whole segment"));
    }
    let mut in_class = false;
    let mut class_len = 0;
    for c in seg.chars() {
        match (in_class, c) {
            (false, '[') => {
                in_class = true;
                class_len = 0;
            }
            (false, ']') => return Err(PathError::Glob("unmatched ']'")),
            (true, ']') if class_len > 0 => in_class = false,
            (true, '[') => return Err(PathError::Glob("nested '['")),
            (true, _) => class_len += 1,
            _ => {}
        }
    }
    if in_class {
        return Err(PathError::Glob("unclosed '['"));
    }
    Ok(())
}

/// Whether `path` matches the validated glob `pattern`: `*` and `?` never cross `/`, `**`
/// matches any number of whole segments, `[abc]`, `[a-z]` and `[!abc]` match one character.
pub fn glob_matches(pattern: &str, path: &str) -> bool {
    let pat: Vec<&str> = pattern.split('/').collect();
    let segs: Vec<&str> = path.split('/').collect();
    match_segments(&pat, &segs)
}

fn match_segments(pat: &[&str], segs: &[&str]) -> bool {
    match pat.split_first() {
        None => segs.is_empty(),
        Some((&"**", rest)) => (0..=segs.len()).any(|skip| match_segments(rest, &segs[skip..])),
        Some((p, rest)) => match segs.split_first() {
            Some((s, srest)) => {
                let p: Vec<char> = p.chars().collect();
                let s: Vec<char> = s.chars().collect();
                match_segment(&p, &s) && match_segments(rest, srest)
            }
            None => false,
        },
    }
}

fn match_segment(p: &[char], s: &[char]) -> bool {
    match p.split_first() {
        None => s.is_empty(),
        Some(('*', rest)) => (0..=s.len()).any(|skip| match_segment(rest, &s[skip..])),
        Some(('?', rest)) => !s.is_empty() && match_segment(rest, &s[1..]),
        Some(('[', rest)) => {
            let Some(close) = rest.iter().skip(1).position(|&c| c == ']').map(|i| i + 1) else {
                return false;
            };
            let Some(&c) = s.first() else { return false };
            let (negate, class) = match rest[..close].split_first() {
                Some(('!', cls)) => (true, cls),
                _ => (false, &rest[..close]),
            };
            let mut hit = false;
            let mut i = 0;
            while i < class.len() {
                if i + 2 < class.len() && class[i + 1] == '-' {
                    hit |= class[i] <= c && c <= class[i + 2];
                    i += 3;
                } else {
                    hit |= class[i] == c;
                    i += 1;
                }
            }
            hit != negate && match_segment(&rest[close + 1..], &s[1..])
        }
        Some((&lit, rest)) => s.first() == Some(&lit) && match_segment(rest, &s[1..]),
    }
}

/// Checks a symlink's target as recorded by the store: non-empty, no NUL or control
/// characters, bounded. Any target is recorded (absolute ones too — virtualenvs link to
/// `/usr/bin/python3`); the store never follows it.
pub fn validate_link_target(target: &str) -> Result<&str, PathError> {
    if target.is_empty() {
        return Err(PathError::Empty);
    }
    if target.len() > MAX_LINK_TARGET_BYTES {
        return Err(PathError::TooLong);
    }
    if target.chars().any(|c| c.is_control()) {
        return Err(PathError::Control);
    }
    Ok(target)
}

/// Whether the symlink at `link_path` (a validated relative path) pointing at `target` would
/// resolve outside the root it lives in, judged lexically: absolute targets escape, and `..`
/// segments that climb above the root escape. A consumer seeding a workspace must not write
/// through such a link.
pub fn symlink_escapes(link_path: &str, target: &str) -> bool {
    if target.starts_with('/') || target.contains('\\') {
        return true;
    }
    // Depth of the directory that holds the link.
    let mut depth: isize = link_path.split('/').count() as isize - 1;
    for seg in target.split('/') {
        match seg {
            "" | "." => {}
            ".." => {
                depth -= 1;
                if depth < 0 {
                    return true;
                }
            }
            _ => depth += 1,
        }
    }
    false
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accepts_ordinary_paths() {
        for p in [
            "README.md",
            "app.py",
            "tests/test_cli.py",
            ".drover/result.json",
            ".drover/logs/stdout.log",
            "a b/c d.txt",
            "100%.txt",
            "a%20b",
            "...",
            "..a",
            "a..",
            "ünïcödé/ファイル",
            "C",
            "ab:c/d:e",
        ] {
            assert_eq!(validate_artifact_path(p), Ok(p), "{p}");
        }
        let deep = vec!["d"; MAX_DEPTH].join("/");
        assert!(validate_artifact_path(&deep).is_ok());
    }

    #[test]
    fn refuses_the_corpus() {
        let long = "a".repeat(MAX_PATH_BYTES + 1);
        let long_seg = "b".repeat(MAX_SEGMENT_BYTES + 1);
        let too_deep = vec!["d"; MAX_DEPTH + 1].join("/");
        let cases: Vec<(&str, PathError)> = vec![
            ("", PathError::Empty),
            ("../etc/passwd", PathError::Traversal),
            ("a/../../etc/passwd", PathError::Traversal),
            ("a/..", PathError::Traversal),
            ("..", PathError::Traversal),
            ("/etc/passwd", PathError::Absolute),
            ("//etc/passwd", PathError::Absolute),
            ("..\\etc\\passwd", PathError::Backslash),
            ("a\\b", PathError::Backslash),
            ("a\0b", PathError::Control),
            ("a\nb", PathError::Control),
            ("a//b", PathError::EmptySegment),
            ("a/", PathError::EmptySegment),
            ("./a", PathError::DotSegment),
            ("a/./b", PathError::DotSegment),
            ("C:/Windows", PathError::Drive),
            ("c:", PathError::Drive),
            ("x:y", PathError::Drive),
            (&long, PathError::TooLong),
            (&long_seg, PathError::SegmentTooLong),
            (&too_deep, PathError::TooDeep),
        ];
        for (p, want) in cases {
            assert_eq!(validate_artifact_path(p), Err(want.clone()), "{p:?}");
        }
    }

    #[test]
    fn refuses_percent_encoded_traversal() {
        for p in [
            "%2e%2e%2fetc%2fpasswd",
            "%2E%2E/etc/passwd",
            "..%2fetc",
            "a/%2e%2e/%2e%2e/etc",
            "%252e%252e%252fetc",
            "%25252e%25252e%25252f",
            "%2fetc%2fpasswd",
            "a%00b",
            "a%5cb",
            "a%2f%2fb",
            "%2e/a",
        ] {
            let err = validate_artifact_path(p).unwrap_err();
            assert!(matches!(err, PathError::Encoded(_)), "{p:?}: {err:?}");
        }
    }

    #[test]
    fn malformed_escapes_are_literal() {
        for p in ["%", "a%", "a%2", "%zz", "%2g"] {
            assert_eq!(validate_artifact_path(p), Ok(p), "{p:?}");
        }
    }

    #[test]
    fn globs() {
        for g in [
            "**",
            "*.py",
            "src/**/*.rs",
            "out/[a-z]?.txt",
            "[!.]*",
            ".drover/*",
        ] {
            assert_eq!(validate_glob(g), Ok(g), "{g}");
        }
        for g in [
            "../*", "/abs/*", "a**", "x/**b", "[abc", "a]", "[[a]]", "a\\*", "%2e%2e/*",
        ] {
            assert!(validate_glob(g).is_err(), "{g}");
        }
        let yes = [
            ("*.py", "app.py"),
            ("**", "a/b/c"),
            ("**/*.py", "app.py"),
            ("**/*.py", "tests/test_cli.py"),
            ("src/**/*.rs", "src/a/b/main.rs"),
            ("src/**/*.rs", "src/main.rs"),
            ("out/[a-z]?.txt", "out/b1.txt"),
            ("[!.]*", "visible"),
            (".drover/*", ".drover/result.json"),
        ];
        for (g, p) in yes {
            assert!(glob_matches(g, p), "{g} should match {p}");
        }
        let no = [
            ("*.py", "tests/test_cli.py"),
            ("src/**/*.rs", "lib/main.rs"),
            ("out/[a-z]?.txt", "out/B1.txt"),
            ("[!.]*", ".hidden"),
            ("?", "ab"),
            (".drover/*", ".drover/logs/stdout.log"),
        ];
        for (g, p) in no {
            assert!(!glob_matches(g, p), "{g} should not match {p}");
        }
    }

    #[test]
    fn manifest_paths_refuse_duplicates_and_nesting() {
        let mut m = ManifestPaths::default();
        for p in [
            "README.md",
            "src/app.py",
            "src/lib/x.py",
            "link",
            "a.b",
            "a-b/c",
        ] {
            m.insert(p).unwrap();
        }
        assert_eq!(m.insert("README.md"), Err(PathError::Duplicate));
        assert_eq!(m.insert("link/passwd"), Err(PathError::Conflict));
        assert_eq!(m.insert("src/app.py/x"), Err(PathError::Conflict));
        assert_eq!(m.insert("src"), Err(PathError::Conflict));
        assert_eq!(m.insert("src/lib"), Err(PathError::Conflict));
        assert_eq!(m.insert("../x"), Err(PathError::Traversal));
        m.insert("a").unwrap();
        m.insert("src2/app.py").unwrap();
        assert_eq!(m.len(), 8);
    }

    #[test]
    fn link_targets_and_escapes() {
        assert!(validate_link_target("../x").is_ok());
        assert!(validate_link_target("/usr/bin/python3").is_ok());
        assert_eq!(validate_link_target(""), Err(PathError::Empty));
        assert_eq!(validate_link_target("a\0b"), Err(PathError::Control));
        assert_eq!(
            validate_link_target(&"t".repeat(MAX_LINK_TARGET_BYTES + 1)),
            Err(PathError::TooLong)
        );
        assert!(symlink_escapes("link", "/etc/passwd"));
        assert!(symlink_escapes("link", "../outside"));
        assert!(symlink_escapes("a/b/link", "../../../x"));
        assert!(!symlink_escapes("a/b/link", "../../x"));
        assert!(!symlink_escapes("link", "target.txt"));
        assert!(!symlink_escapes("a/link", "./b/../c"));
        assert!(symlink_escapes("a/link", "b/../../../c"));
    }
}
