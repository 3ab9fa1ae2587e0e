"""Parses a metrics exposition read from stdin with the Prometheus project's Python parser
and prints every sample as one JSON object per line: {"name", "labels", "value"}.

    python3 parse_metrics.py openmetrics|text < metrics.txt

A parse error exits non-zero with the parser's message.
"""

import json
import sys

from prometheus_client.openmetrics.parser import (
    text_string_to_metric_families as parse_openmetrics,
)
from prometheus_client.parser import text_string_to_metric_families as parse_text


def main() -> None:
    parse = {"openmetrics": parse_openmetrics, "text": parse_text}[sys.argv[1]]
    for family in parse(sys.stdin.read()):
        for sample in family.samples:
            print(json.dumps({"name": sample.name, "labels": sample.labels, "value": sample.value}))


if __name__ == "__main__":
    main()
