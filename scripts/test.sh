#!/usr/bin/env bash
# Sets up a fresh machine and runs every test: unit, end-to-end (real
# processes, real clients), lints. This is what CI runs.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
cargo fmt --all -- --check
cargo clippy --workspace --all-targets -- -D warnings
cargo test --workspace --all-targets
# The Node service package against the axion just built (target/debug/axion).
cargo build -p axion
node --test clients/node/test/
