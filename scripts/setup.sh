#!/usr/bin/env bash
# Installs everything Axion's build, tests and benchmarks need on a fresh
# Debian machine: a C compiler (ring), the Rust toolchain with rustfmt and
# clippy, Mosquitto (reference broker and mosquitto_pub/sub), ejabberd (a
# clustered broker for tests/cluster.rs), tmux (the
# dashboard test), procps (`kill`), Python paho-mqtt + websockets +
# prometheus-client (the parser the /metrics test reads scrapes with), and
# Node with the packages locked in tests/package-lock.json.
# Idempotent: skips what is already there.
set -euo pipefail
cd "$(dirname "$0")/.."

SUDO=""
[ "$(id -u)" -ne 0 ] && SUDO="sudo"

need_apt=()
command -v cc >/dev/null 2>&1 || need_apt+=(build-essential)
command -v curl >/dev/null 2>&1 || need_apt+=(curl ca-certificates)
command -v mosquitto >/dev/null 2>&1 || need_apt+=(mosquitto)
command -v mosquitto_sub >/dev/null 2>&1 || need_apt+=(mosquitto-clients)
# A clustered MQTT broker that is not Axion (tests/cluster.rs).
ls -d /usr/lib/x86_64-linux-gnu/ejabberd-* >/dev/null 2>&1 || need_apt+=(ejabberd)
command -v tmux >/dev/null 2>&1 || need_apt+=(tmux)
# The tests run /bin/kill (not the shell builtin); minimal images lack it.
[ -x /bin/kill ] || [ -x /usr/bin/kill ] || need_apt+=(procps)
command -v python3 >/dev/null 2>&1 || need_apt+=(python3)
python3 -m pip --version >/dev/null 2>&1 || need_apt+=(python3-pip)
command -v node >/dev/null 2>&1 || need_apt+=(nodejs)
command -v npm >/dev/null 2>&1 || need_apt+=(npm)
# The fleet view page's test drives a real headless Chromium.
command -v chromium >/dev/null 2>&1 || need_apt+=(chromium)
if ((${#need_apt[@]})); then
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends "${need_apt[@]}" >/dev/null
fi
# Debian starts a system mosquitto on 1883; tests use their own on free ports.
if command -v systemctl >/dev/null 2>&1; then $SUDO systemctl stop mosquitto >/dev/null 2>&1 || true; fi
# Likewise ejabberd: tests/cluster.rs starts its own nodes.
if command -v systemctl >/dev/null 2>&1; then $SUDO systemctl stop ejabberd >/dev/null 2>&1 || true; fi

if ! command -v cargo >/dev/null 2>&1 && [ -x "$HOME/.cargo/bin/cargo" ]; then
  export PATH="$HOME/.cargo/bin:$PATH"
fi
if ! command -v cargo >/dev/null 2>&1; then
  curl -sSf https://sh.rustup.rs | sh -s -- -y -q --profile minimal -c rustfmt -c clippy
  # scripts/test.sh runs us as a child and cannot see our PATH: put the
  # toolchain's proxies on the default one.
  for tool in cargo rustc rustdoc rustup rustfmt cargo-fmt cargo-clippy clippy-driver; do
    $SUDO ln -sf "$HOME/.cargo/bin/$tool" "/usr/local/bin/$tool"
  done
elif command -v rustup >/dev/null 2>&1; then
  rustup component add rustfmt clippy >/dev/null 2>&1
fi

if [ -f tests/requirements.txt ]; then
  # Debian's python3 is "externally managed" (PEP 668); these test-only
  # packages go next to it all the same (pip ignores the variable when it
  # does not know it, and installs per user when site-packages is read-only).
  PIP_BREAK_SYSTEM_PACKAGES=1 PIP_ROOT_USER_ACTION=ignore python3 -m pip install -q --disable-pip-version-check -r tests/requirements.txt
fi
# The Python service runtime, editable so its tests run the tree's code,
# with its test runner and linter (PEP 668 as above).
PIP_BREAK_SYSTEM_PACKAGES=1 PIP_ROOT_USER_ACTION=ignore python3 -m pip install -q --disable-pip-version-check pytest ruff -e clients/python
if [ -f tests/package.json ]; then
  if [ -f tests/package-lock.json ]; then
    npm ci --prefix tests --silent --no-audit --no-fund
  else
    npm install --prefix tests --silent --no-audit --no-fund
  fi
fi
# The Node service package (clients/node): MQTT.js, and TypeScript for its type check.
npm ci --prefix clients/node --silent --no-audit --no-fund
# MQTT.js's browser bundle, which the fleet view page embeds (bridge/build.rs
# copies it into the binary; without it the page says how to get it).
npm ci --prefix bridge/web --silent --no-audit --no-fund
