"""Parses a Prometheus text exposition from stdin with the reference parser
(prometheus_client) and prints its samples as JSON; exits non-zero when the
text does not parse."""

import json
import sys

from prometheus_client.parser import text_string_to_metric_families


def main():
    samples = []
    for family in text_string_to_metric_families(sys.stdin.read()):
        for sample in family.samples:
            samples.append(
                {
                    "family": family.name,
                    "type": family.type,
                    "name": sample.name,
                    "labels": sample.labels,
                    "value": sample.value,
                }
            )
    json.dump(samples, sys.stdout)


if __name__ == "__main__":
    main()
