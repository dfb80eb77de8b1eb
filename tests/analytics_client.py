"""Drives Rapport's tracking API with an official client library, unchanged
but for its host: Segment's (segment-analytics-python) or RudderStack's
(rudder-sdk-python).

Usage: analytics_client.py segment|rudderstack HOST WRITE_KEY RUN_ID

Sends identify, track, page, screen, group and alias calls, gzip-compressed,
in one flush, and prints a JSON line with the errors the library reported
(none is expected)."""

import json
import sys


def main():
    library, host, write_key, run = sys.argv[1], sys.argv[2], sys.argv[3], sys.argv[4]
    if library == "segment":
        from segment import analytics
    elif library == "rudderstack":
        import rudderstack.analytics as analytics
    else:
        raise SystemExit(f"unknown library {library}")
    errors = []

    def on_error(error, items):
        errors.append(f"{error} ({len(items)} events)")

    analytics.write_key = write_key
    if library == "rudderstack":
        analytics.dataPlaneUrl = host
    else:
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
