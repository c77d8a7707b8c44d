"""A service whose handler forks a child that outlives the job, as a
multiprocessing pool does: the child must not keep the service looking
alive once the service itself is gone."""

from __future__ import annotations

import os
import sys
import time
from typing import Any

from axion_client import Service, Task


def spawn(task: Task) -> dict[str, Any]:
    pid = os.fork()
    if pid == 0:
        time.sleep(60)
        os._exit(0)
    return {"child": pid}


if __name__ == "__main__":
    sys.exit(Service("forking").queue("fork.jobs", spawn).run())
