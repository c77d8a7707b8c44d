#!/usr/bin/env bash
# Installs everything Axion's tests and benchmarks need on a fresh Debian
# machine: Mosquitto (reference broker and mosquitto_pub/sub), Python
# paho-mqtt + websockets, Node packages for the legacy-client tests.
# Idempotent: skips what is already there.
set -euo pipefail
cd "$(dirname "$0")/.."

need_apt=()
command -v mosquitto >/dev/null 2>&1 || need_apt+=(mosquitto)
command -v mosquitto_sub >/dev/null 2>&1 || need_apt+=(mosquitto-clients)
command -v tmux >/dev/null 2>&1 || need_apt+=(tmux)
if ((${#need_apt[@]})); then
  SUDO=""; [ "$(id -u)" -ne 0 ] && SUDO="sudo"
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq "${need_apt[@]}" >/dev/null
fi
# Debian starts a system mosquitto on 1883; tests use their own on free ports.
if command -v systemctl >/dev/null 2>&1; then systemctl stop mosquitto >/dev/null 2>&1 || true; fi

if [ -f tests/requirements.txt ]; then
  python3 -m pip install -q --disable-pip-version-check -r tests/requirements.txt
fi
if [ -f tests/package.json ] && command -v npm >/dev/null 2>&1; then
  if [ -f tests/package-lock.json ]; then npm ci --prefix tests --silent --no-audit --no-fund; else npm install --prefix tests --silent --no-audit --no-fund; fi
fi
