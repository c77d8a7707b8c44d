"""A service for the handler-thread test: each task's answer names the
thread that ran it; `{"block": true}` blocks that thread for good in a
system call."""

import os
import select
import sys
import threading

from axion_client import Service


def handle(task):
    if task.payload.get("block") is True:
        never, _ = os.pipe()
        select.select([never], [], [])
    return {"thread": threading.get_native_id()}


if __name__ == "__main__":
    sys.exit(Service("pool").queue("pool.jobs", handle).run())
