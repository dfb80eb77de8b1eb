"""Drives Rapport's tracking API with the official Segment Python library
(segment-analytics-python), unchanged but for its host.

Usage: segment_client.py HOST WRITE_KEY RUN_ID

Sends identify, track, page, screen, group and alias calls, gzip-compressed,
in one flush, and prints a JSON line with the errors the library reported
(none is expected)."""

import json
import sys

from segment import analytics


def main():
    host, write_key, run = sys.argv[1], sys.argv[2], sys.argv[3]
    errors = []

    def on_error(error, items):
        errors.append(f"{error} ({len(items)} events)")

    analytics.write_key = write_key
    analytics.host = host
    analytics.on_error = on_error
    analytics.gzip = True
    analytics.max_retries = 0

    user = f"user-{run}"
    analytics.identify(user, {"email": f"ada-{run}@example.com", "first_name": "Ada", "plan": "pro"})
    analytics.track(user, "Order Completed", {"revenue": 42.5, "currency": "EUR"})
    analytics.page(user, category="Docs", name="Pricing", properties={"url": "https://acme.example/pricing"})
    analytics.screen(user, name="Home")
    analytics.group(user, f"company-{run}", {"name": "Acme"})
    analytics.alias(f"anon-{run}", user)
    analytics.flush()
    analytics.shutdown()
    print(json.dumps({"errors": errors}))
    return 1 if errors else 0


if __name__ == "__main__":
    sys.exit(main())
