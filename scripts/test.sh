#!/usr/bin/env bash
# Sets up a fresh machine and runs every test: unit, end-to-end (real
# processes, real clients), lints. This is what CI runs.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
cargo fmt --all -- --check
cargo clippy --workspace --all-targets -- -D warnings
cargo test --workspace --all-targets
# The Python package: lint, then its end-to-end tests against
# target/debug/axion (already built by the tests above: `--workspace`
# resolves features as they did, so nothing compiles twice). They include
# the cross-language test, which runs Node workers and both legacy clients
# beside the Python ones (node and the npm packages from setup.sh).
cargo build -q --workspace --bin axion
python3 -m ruff check clients/python
python3 -m ruff format --check clients/python
AXION_BIN="${AXION_BIN:-${CARGO_TARGET_DIR:-target}/debug/axion}" python3 -m pytest -q clients/python
# The Node package's end-to-end tests against the same axion.
AXION_BIN="${AXION_BIN:-${CARGO_TARGET_DIR:-target}/debug/axion}" node --test clients/node/test/
