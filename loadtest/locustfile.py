"""Locust scenarios against tollgate fronting the sample leads API.

    /usr/bin/python3 -m locust -f loadtest/locustfile.py --headless \
        -u 50 -r 10 -t 30s --host http://127.0.0.1:8080

Environment
  TG_KEYS      comma-separated API keys, sent as X-API-Key; users take them
               round-robin (default: the demo keys of conf/keys.yaml)
  TG_WAIT_MIN  seconds between a user's tasks, lower bound (default 0.1)
  TG_WAIT_MAX  upper bound (default 0.5)
  TG_LEAD_IDS  highest seeded lead id to read (default 100, see app.py)

A 429 from tollgate is the rate limiter doing its job, not an error: it is
reported as a success under the name "rate-limited" so the statistics show
how much traffic each run had refused, apart from the real endpoints.
Anything else outside 2xx (401, 403, 5xx, timeouts) is a failure.
"""

import itertools
import os
import random
import threading

from locust import HttpUser, between, task

DEFAULT_KEYS = "demo-basic-key,demo-pro-key,demo-enterprise-key"
KEYS = [k.strip() for k in os.environ.get("TG_KEYS", DEFAULT_KEYS).split(",")
        if k.strip()]
if not KEYS:
    raise SystemExit("TG_KEYS is empty")
MAX_LEAD_ID = int(os.environ.get("TG_LEAD_IDS", "100"))
RATE_LIMITED = "rate-limited"

_key_cycle = itertools.cycle(KEYS)
_key_lock = threading.Lock()


def _next_key() -> str:
    with _key_lock:
        return next(_key_cycle)


class LeadsUser(HttpUser):
    wait_time = between(float(os.environ.get("TG_WAIT_MIN", "0.1")),
                        float(os.environ.get("TG_WAIT_MAX", "0.5")))

    def on_start(self):
        self.api_key = _next_key()
        self.client.headers.update({"X-API-Key": self.api_key})

    def _check(self, resp, expected):
        """Classify one response (inside catch_response)."""
        if resp.status_code == 429:
            # Report under its own name; the request still counts once.
            resp.request_meta["name"] = RATE_LIMITED
            resp.success()
        elif resp.status_code == expected:
            resp.success()
        else:
            resp.failure(f"HTTP {resp.status_code}")

    @task(5)
    def list_leads(self):
        with self.client.get("/leads", params={"limit": 20}, name="/leads",
                             catch_response=True) as resp:
            self._check(resp, 200)

    @task(3)
    def get_lead(self):
        lead_id = random.randint(1, MAX_LEAD_ID)
        with self.client.get(f"/leads/{lead_id}", name="/leads/{id}",
                             catch_response=True) as resp:
            self._check(resp, 200)

    @task(1)
    def create_lead(self):
        n = random.randint(1, 1_000_000)
        lead = {"name": f"Load Test {n}", "email": f"load{n}@test.example",
                "company": "Locust", "source": "loadtest",
                "score": n % 101}
        with self.client.post("/leads", json=lead, name="/leads",
                              catch_response=True) as resp:
            self._check(resp, 201)
