//! Property tests: spec validation and path checks never panic on any input, and what they
//! accept keeps their promises. Each property runs `CASES` generated cases; inputs lean on
//! the characters that matter (`.`, `/`, `\`, `%`, NUL, glob syntax, unicode).

use drover_core::artifact_paths::{
    glob_matches, symlink_escapes, validate_artifact_path, validate_glob, validate_link_target,
};
use drover_core::convert::raw_spec_from_proto;
use drover_core::paths::validate_relative;
use drover_proto::v1 as pb;
use proptest::prelude::*;

const CASES: u32 = 2048;

fn config() -> ProptestConfig {
    ProptestConfig {
        cases: CASES,
        failure_persistence: None,
        ..ProptestConfig::default()
    }
}

/// Path-like text: mostly path punctuation, some arbitrary unicode, some very long.
fn pathy() -> impl Strategy<Value = String> {
    prop_oneof![
        4 => proptest::collection::vec(
            prop_oneof![
                Just(".".to_owned()),
                Just("..".to_owned()),
                Just("/".to_owned()),
                Just("\\".to_owned()),
                Just("%2e".to_owned()),
                Just("%2F".to_owned()),
                Just("%".to_owned()),
                Just("\0".to_owned()),
                Just("*".to_owned()),
                Just("**".to_owned()),
                Just("[".to_owned()),
                Just("]".to_owned()),
                Just("?".to_owned()),
                "[a-z]{1,8}",
                "\\PC{1,3}",
            ],
            0..12,
        )
        .prop_map(|parts| parts.concat()),
        1 => any::<String>(),
        1 => "[a-z/]{0,5000}",
    ]
}

fn text() -> impl Strategy<Value = String> {
    prop_oneof![
        any::<String>(),
        "[A-Za-z_][A-Za-z0-9_]{0,8}",
        Just(String::new())
    ]
}

prop_compose! {
    fn spec()(
        image in text(),
        command in proptest::collection::vec(text(), 0..4),
        env in proptest::collection::hash_map(text(), text(), 0..4),
        labels in proptest::collection::hash_map(text(), text(), 0..3),
        metadata in proptest::collection::hash_map(text(), text(), 0..3),
        pool in text(),
        network in text(),
        executor in text(),
        pull in text(),
        secrets in proptest::collection::vec(text(), 0..3),
        host_env in proptest::collection::vec(text(), 0..3),
        outputs in proptest::collection::vec(pathy(), 0..3),
        inputs in proptest::collection::vec(
            (pathy(), proptest::collection::vec(any::<u8>(), 0..16), any::<u32>()),
            0..3,
        ),
        inputs_from_run in text(),
        numbers in (any::<u32>(), any::<i32>(), any::<u32>(), any::<u32>(), any::<u32>(), any::<u32>()),
        floats in (any::<f64>(), any::<u64>(), any::<u32>(), any::<f64>(), any::<f64>()),
        flags in (any::<bool>(), any::<bool>(), any::<u32>()),
    ) -> pb::RunSpec {
        pb::RunSpec {
            image,
            command,
            env,
            resources: Some(pb::Resources { cpus: floats.0, memory_bytes: floats.1, pids: floats.2 }),
            timeout_seconds: numbers.0,
            pool,
            priority: numbers.1,
            max_attempts: numbers.2,
            labels,
            network,
            metadata,
            retry: Some(pb::RetryPolicy {
                initial_backoff_ms: u64::from(numbers.3),
                multiplier: floats.3,
                max_backoff_ms: u64::from(numbers.4),
                jitter: floats.4,
                retry_exit_codes: vec![numbers.1],
                retry_any_exit_code: flags.0,
            }),
            queue_timeout_seconds: numbers.5,
            cancel_grace_seconds: numbers.3,
            inputs_from_run,
            outputs,
            secrets,
            host_env,
            executor,
            mock: None,
            writable_rootfs: flags.1,
            image_pull_policy: pull,
            inputs: inputs
                .into_iter()
                .map(|(path, content, mode)| pb::InputFile { path, content, mode })
                .collect(),
            requires_approval: flags.0,
            approval_timeout_seconds: flags.2,
        }
    }
}

fn has_dot_segment(p: &str) -> bool {
    p.split('/').any(|s| s == ".." || s == "." || s.is_empty())
}

proptest! {
    #![proptest_config(config())]

    #[test]
    fn spec_validation_never_panics_and_accepted_specs_keep_their_bounds(s in spec()) {
        if let Ok(v) = raw_spec_from_proto(s).validate() {
            prop_assert!(!v.command.is_empty() && !v.command[0].is_empty());
            prop_assert!(!v.image.is_empty() && v.image.len() <= 512);
            prop_assert!(v.env.len() <= 128);
            prop_assert!(v.labels.len() <= 32);
            prop_assert!(v.max_attempts >= 1 && v.max_attempts <= 20);
            prop_assert!(v.resources.cpus.is_finite());
            for f in &v.inputs {
                prop_assert!(!f.path.starts_with('/') && !has_dot_segment(&f.path));
            }
            // The stored form hashes and round-trips through JSON.
            let json = serde_json::to_string(&v).expect("serialises");
            let back: drover_core::spec::RunSpec = serde_json::from_str(&json).expect("parses");
            prop_assert_eq!(back.canonical_hash(), v.canonical_hash());
        }
    }

    #[test]
    fn accepted_paths_are_relative_and_confined(p in pathy()) {
        if let Ok(ok) = validate_artifact_path(&p) {
            prop_assert!(!ok.starts_with('/'));
            prop_assert!(!has_dot_segment(ok));
            prop_assert!(!ok.contains('\\') && !ok.contains('\0'));
            // Nor does a layer that percent-decodes it find a traversal.
            let decoded = ok
                .replace("%2e", ".")
                .replace("%2E", ".")
                .replace("%2f", "/")
                .replace("%2F", "/");
            prop_assert!(!decoded.starts_with('/') && !has_dot_segment(&decoded), "{}", decoded);
        }
        if let Ok(n) = validate_relative(&p) {
            prop_assert!(!n.as_str().contains('%'));
            prop_assert!(!has_dot_segment(n.as_str()));
        }
    }

    #[test]
    fn globs_links_and_matching_never_panic(pattern in pathy(), path in pathy(), target in pathy()) {
        let _ = validate_glob(&pattern);
        let _ = validate_link_target(&target);
        if validate_artifact_path(&path).is_ok() && validate_link_target(&target).is_ok() {
            let _ = symlink_escapes(&path, &target);
        }
        if validate_glob(&pattern).is_ok() && validate_artifact_path(&path).is_ok() {
            let _ = glob_matches(&pattern, &path);
        }
    }
}
