"""Parses a Prometheus text exposition on stdin with the reference parser
(prometheus_client, tests/requirements.txt) and prints its families as
JSON: {name: {"type", "help", "samples": [[name, labels, value], ...]}}.

A scrape the parser refuses makes it raise: the exit status is non-zero
and the Rust test that ran it fails with the parser's message.
"""

import json
import math
import sys

from prometheus_client.parser import text_string_to_metric_families


def main() -> None:
    families = {}
    for family in text_string_to_metric_families(sys.stdin.read()):
        if family.name in families:
            raise SystemExit(f"family {family.name} appears twice")
        families[family.name] = {
            "type": family.type,
            "help": family.documentation,
            "samples": [
                # JSON has no infinity: +Inf only appears as a bucket bound.
                [s.name, s.labels, None if math.isinf(s.value) else s.value]
                for s in family.samples
            ],
        }
    json.dump(families, sys.stdout)


if __name__ == "__main__":
    main()
