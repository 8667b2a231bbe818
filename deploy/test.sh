#!/usr/bin/env bash
# The whole test suite, from a fresh machine: services, lint, build, every test.
# This is the command the README gives and the one CI runs.
set -euo pipefail
cd "$(dirname "$0")/.."

bash deploy/local-services.sh
echo "== cargo fmt --check"
cargo fmt --all -- --check
echo "== cargo clippy"
cargo clippy --workspace --all-targets --locked -- -D warnings
echo "== build binaries (end-to-end tests start them)"
cargo build --workspace --bins --locked
echo "== tests"
profile=default
[ "${CI:-}" = true ] && profile=ci
cargo nextest run --workspace --locked --profile "$profile"
