"""The benchmark's Python worker (`clients/node/bench/queue-throughput.js`):
acks every task of `BENCH_QUEUE` at once."""

import os
import sys

from axion_client import Service

if __name__ == "__main__":
    sys.exit(Service("bench-py").queue(os.environ.get("BENCH_QUEUE", "bench"), lambda task: None).run())
