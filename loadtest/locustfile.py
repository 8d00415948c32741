"""Locust scenarios against tollgate fronting the sample leads API.

    /usr/bin/python3 -m locust -f loadtest/locustfile.py --headless \
        -u 50 -r 10 -t 30s --host http://127.0.0.1:8080

User classes: one per tier (BasicUser, ProUser, EnterpriseUser: one class
per tier of the run file, named after it), each sending the keys of its
tier, and BadKeyUser, which sends an unknown key, no key, an unknown
Bearer token or (if the run has one) a disabled key. Every tier user runs
the sample app's endpoint mix (loadtest/upstream/app.py), by weight:
GET /leads 5, GET /leads/{id} 3, POST /leads 1, GET /leads/{missing id}
1 (404), POST /leads invalid 1 (422), GET /health 1.

Expected outcomes are successes, under their own names in Locust's table:
429 ("429 rate-limited") for any tier user, 401 ("401 bad key") and 403
("403 disabled key") for BadKeyUser. Anything else unexpected (5xx,
timeouts, a 401 for a good key, a 200 for a bad one) is a failure and
makes locust exit 1.

At the end the file prints a per-tier table: requests sent, admitted (got
past the limiter: every answer but 401, 403, 429, 503), 429s, and the bound
the tier's limits permit: per key, burst + floor(window / T), T = the
tier's emission interval (ceil(60e6 / requests_per_minute) us, as tollgate
computes it) and window = first request sent .. last answer received for
that key, summed over the tier's keys. The bound counts one token per
request: it holds for a tollgate config whose only bucket per request is
the tier's (no `routes` with costs or limits, no `global_limit` that
binds), with fresh buckets at the start of the run.

Environment
  TG_RUN       run file written by loadtest/mkkeys (run.json: tiers with
               their limits and clear keys, bad and disabled keys). Without
               it: the demo keys of conf/keys.yaml with the demo tiers of
               conf/demo.yaml (whose routes make the table's bound
               approximate: it says so).
  TG_USERS_PER_KEY  if set, each tier class gets exactly that many users per
               key (Locust fixed_count) and BadKeyUser TG_BAD_USERS (1);
               then -u must be their sum (the table prints it). Unset: the
               classes share -u by weight (BadKeyUser weight 1, each tier 3).
  TG_OVERSUBSCRIBE  if set (e.g. 3), a tier user paces itself so that the
               users of one key together offer that many times the key's
               refill rate (needs TG_USERS_PER_KEY). Unset: every user waits
               TG_WAIT_MIN..TG_WAIT_MAX seconds (0.1..0.5) between tasks.
  TG_BAD_RPS   requests per second of one BadKeyUser (default 2)
  TG_LEAD_IDS  highest seeded lead id to read (default 100, see app.py)
  TG_REPORT    if set, the table is also written there as JSON
"""

import json
import os
import random
import sys
import time

from locust import between, constant_throughput, events, task
from locust.contrib.fasthttp import FastHttpUser

MAX_LEAD_ID = int(os.environ.get("TG_LEAD_IDS", "100"))
WAIT_MIN = float(os.environ.get("TG_WAIT_MIN", "0.1"))
WAIT_MAX = float(os.environ.get("TG_WAIT_MAX", "0.5"))
USERS_PER_KEY = int(os.environ.get("TG_USERS_PER_KEY", "0") or 0)
BAD_USERS = int(os.environ.get("TG_BAD_USERS", "1"))
OVERSUBSCRIBE = float(os.environ.get("TG_OVERSUBSCRIBE", "0") or 0)
BAD_RPS = float(os.environ.get("TG_BAD_RPS", "2"))
REPORT = os.environ.get("TG_REPORT", "")

# The demo: conf/keys.yaml's keys, conf/demo.yaml's tiers.
DEMO_RUN = {
    "tiers": {
        "basic": {"requests_per_minute": 100, "burst_limit": 20,
                  "keys": ["demo-basic-key"]},
        "pro": {"requests_per_minute": 500, "burst_limit": 100,
                "keys": ["demo-pro-key"]},
        "enterprise": {"requests_per_minute": 1000, "burst_limit": 200,
                       "keys": ["demo-enterprise-key"]},
    },
    "bad_keys": ["tg_not-a-key-of-this-run-0000000000000000000"],
    "disabled_keys": [],
    "note": "demo keys and tiers; conf/demo.yaml also has routes "
            "(POST costs 2, GET /leads has its own bucket), so the bound "
            "below is not exact for it, and the demo keys' buckets may not "
            "have been full at the start",
}


def _load_run():
    path = os.environ.get("TG_RUN", "")
    if not path:
        return DEMO_RUN
    with open(path) as f:
        run = json.load(f)
    if not run.get("tiers"):
        raise SystemExit(f"{path}: no tiers")
    for name, t in run["tiers"].items():
        if not t.get("keys"):
            raise SystemExit(f"{path}: tier {name} has no keys")
    run.setdefault("bad_keys", ["tg_not-a-key-of-this-run-0000000000000000000"])
    run.setdefault("disabled_keys", [])
    return run


RUN = _load_run()


def interval_us(rpm):
    """tollgate's emission interval: T = ceil(60e6 / rpm) microseconds."""
    return (60_000_000 + rpm - 1) // rpm


# ---- bookkeeping (gevent greenlets: no locks needed) ----------------------

class KeyStats:
    __slots__ = ("first", "last", "sent", "admitted", "limited", "other",
                 "errors")

    def __init__(self):
        self.first = None     # time.time() before the first request was sent
        self.last = None      # time.time() after the last answer came back
        self.sent = 0
        self.admitted = 0     # past the limiter: not 401/403/429/503/no answer
        self.limited = 0      # 429
        self.other = 0        # 401, 403, 503
        self.errors = 0       # no HTTP answer (connection error, timeout)
        # sent - the four counts: requests killed in flight when locust
        # stopped (their answers never came back)


KEY_STATS = {}                # api key -> KeyStats
STOP_TIME = [None]            # time.time() when the users had all stopped
BAD_STATS = {"sent": 0, "401": 0, "403": 0, "other": 0}
NOT_LIMITED = (401, 403, 429, 503)
CLOCK_ALLOWANCE_US = 1000


def _key_stats(key):
    ks = KEY_STATS.get(key)
    if ks is None:
        ks = KEY_STATS[key] = KeyStats()
    return ks


# ---- users ---------------------------------------------------------------

class TierUser(FastHttpUser):
    """A consumer of one tier; the tier's keys are dealt out round-robin."""
    abstract = True
    tier = ""
    keys = ()
    _next = 0

    def on_start(self):
        cls = type(self)
        self.api_key = cls.keys[cls._next % len(cls.keys)]
        cls._next += 1

    def _call(self, method, path, name, expected, **kw):
        ks = _key_stats(self.api_key)
        now = time.time()
        if ks.first is None:
            ks.first = now
        ks.sent += 1
        headers = {"X-API-Key": self.api_key}
        with self.client.request(method, path, name=name, headers=headers,
                                 catch_response=True, **kw) as resp:
            ks.last = time.time()
            code = resp.status_code or 0
            if code == 0:
                ks.errors += 1
            elif code == 429:
                ks.limited += 1
            elif code in NOT_LIMITED:
                ks.other += 1
            else:
                ks.admitted += 1
            if code == 429:
                # The limiter working: a success under its own name.
                resp.request_meta["name"] = "429 rate-limited"
                resp.success()
            elif code == expected:
                resp.success()
            else:
                resp.failure(f"HTTP {code} (expected {expected} or 429)")

    @task(5)
    def list_leads(self):
        self._call("GET", "/leads?limit=20", "/leads", 200)

    @task(3)
    def get_lead(self):
        lead_id = random.randint(1, MAX_LEAD_ID)
        self._call("GET", f"/leads/{lead_id}", "/leads/{id}", 200)

    @task(1)
    def get_missing_lead(self):
        lead_id = random.randint(MAX_LEAD_ID + 1, 10 * MAX_LEAD_ID)
        self._call("GET", f"/leads/{lead_id}", "/leads/{id} (missing)", 404)

    @task(1)
    def create_lead(self):
        n = random.randint(1, 1_000_000)
        lead = {"name": f"Load Test {n}", "email": f"load{n}@test.example",
                "company": "Locust", "source": "loadtest", "score": n % 101}
        self._call("POST", "/leads", "/leads", 201, json=lead)

    @task(1)
    def create_invalid_lead(self):
        self._call("POST", "/leads", "/leads (invalid)", 422,
                   json={"name": "No Email", "email": "not-an-address"})

    @task(1)
    def health(self):
        self._call("GET", "/health", "/health", 200)


class BadKeyUser(FastHttpUser):
    """A client without a valid key: 401, or 403 for a disabled key."""
    weight = 1
    fixed_count = BAD_USERS if USERS_PER_KEY else 0
    wait_time = (constant_throughput(BAD_RPS) if OVERSUBSCRIBE
                 else between(WAIT_MIN, WAIT_MAX))

    def _call(self, headers, name, expected):
        BAD_STATS["sent"] += 1
        with self.client.request("GET", "/leads", name=name, headers=headers,
                                 catch_response=True) as resp:
            code = resp.status_code or 0
            if code in (401, 403):
                BAD_STATS[str(code)] += 1
            else:
                BAD_STATS["other"] += 1
            if code == expected:
                resp.success()
            else:
                resp.failure(f"HTTP {code} (expected {expected})")

    def on_start(self):
        self._n = random.randrange(4)

    @task
    def bad_request(self):
        # The kinds in turn, so a short run sees each of them.
        self._n += 1
        kind = self._n % 4
        if kind == 3 and not RUN["disabled_keys"]:
            kind = 0
        if kind == 0:
            self._call({"X-API-Key": random.choice(RUN["bad_keys"])},
                       "401 unknown key", 401)
        elif kind == 1:
            self._call({}, "401 no key", 401)
        elif kind == 2:
            self._call({"Authorization": "Bearer " + random.choice(RUN["bad_keys"])},
                       "401 unknown bearer", 401)
        else:
            self._call({"X-API-Key": random.choice(RUN["disabled_keys"])},
                       "403 disabled key", 403)


def _tier_class(name, tier):
    keys = list(tier["keys"])
    rps_per_key = tier["requests_per_minute"] / 60.0
    attrs = {"tier": name, "keys": keys, "weight": 3, "_next": 0,
             "__module__": __name__}
    if USERS_PER_KEY:
        attrs["fixed_count"] = USERS_PER_KEY * len(keys)
    if OVERSUBSCRIBE:
        if not USERS_PER_KEY:
            raise SystemExit("TG_OVERSUBSCRIBE needs TG_USERS_PER_KEY")
        attrs["wait_time"] = constant_throughput(
            OVERSUBSCRIBE * rps_per_key / USERS_PER_KEY)
    else:
        attrs["wait_time"] = between(WAIT_MIN, WAIT_MAX)
    cls_name = "".join(p.capitalize() for p in name.replace("-", "_").split("_")) + "User"
    return type(cls_name, (TierUser,), attrs)


TIER_CLASSES = []
for _name, _tier in RUN["tiers"].items():
    _cls = _tier_class(_name, _tier)
    globals()[_cls.__name__] = _cls     # Locust finds User classes by name
    TIER_CLASSES.append(_cls)
del _name, _tier, _cls


# ---- the per-tier table --------------------------------------------------

def tier_report():
    """Per tier: sent, admitted, 429s, other, bound (see the module doc)."""
    rows = []
    for name, tier in RUN["tiers"].items():
        rpm, burst = tier["requests_per_minute"], tier["burst_limit"]
        t_us = interval_us(rpm)
        row = {"tier": name, "requests_per_minute": rpm, "burst_limit": burst,
               "keys": len(tier["keys"]), "keys_used": 0, "sent": 0,
               "admitted": 0, "limited": 0, "other": 0, "errors": 0,
               "bound": 0, "bound_allowed": 0, "window_s": 0.0}
        windows = []
        for key in tier["keys"]:
            ks = KEY_STATS.get(key)
            if ks is None or ks.first is None:
                continue
            row["keys_used"] += 1
            last = ks.last if ks.last is not None else ks.first
            lost = ks.sent - (ks.admitted + ks.limited + ks.other + ks.errors)
            if lost and STOP_TIME[0] is not None:
                # Killed in flight: tollgate may have admitted them after
                # the last answer; they were gone when the users were.
                last = max(last, STOP_TIME[0])
            window_us = max(0, int((last - ks.first) * 1e6))
            windows.append(window_us / 1e6)
            row["bound"] += burst + window_us // t_us
            # The same with CLOCK_ALLOWANCE_US more per key: the client's
            # time.time() and Redis TIME read the same clock; this only
            # covers the rounding of the timestamps.
            row["bound_allowed"] += burst + (window_us + CLOCK_ALLOWANCE_US) // t_us
            for f in ("sent", "admitted", "limited", "other", "errors"):
                row[f] += getattr(ks, f)
            row["errors"] += lost
        row["window_s"] = round(max(windows), 3) if windows else 0.0
        # What the users offered, against what the limits let through.
        row["offered_ratio"] = (round(row["sent"] / row["bound"], 2)
                                if row["bound"] else None)
        row["admitted_ratio"] = (round(row["admitted"] / row["bound"], 4)
                                 if row["bound"] else None)
        rows.append(row)
    return {"tiers": rows, "bad": dict(BAD_STATS), "note": RUN.get("note", ""),
            "users_needed": (sum(c.fixed_count for c in TIER_CLASSES) + BAD_USERS
                             if USERS_PER_KEY else None)}


def print_report(rep, out=sys.stdout):
    head = ("tier", "keys", "rpm/burst", "window s", "sent", "admitted",
            "429", "401/403/503", "no answer", "bound", "admitted/bound")
    lines = []
    for r in rep["tiers"]:
        ratio = ("n/a" if r["admitted_ratio"] is None
                 else f"{100 * r['admitted_ratio']:.1f} %")
        lines.append((r["tier"], f"{r['keys_used']}/{r['keys']}",
                      f"{r['requests_per_minute']}/{r['burst_limit']}",
                      f"{r['window_s']:.2f}", str(r["sent"]), str(r["admitted"]),
                      str(r["limited"]), str(r["other"]), str(r["errors"]),
                      str(r["bound"]), ratio))
    width = [max(len(h), *(len(l[i]) for l in lines)) if lines else len(h)
             for i, h in enumerate(head)]
    fmt = "  ".join("%-*s" if i == 0 else "%*s" for i in range(len(head)))

    def emit(cells):
        args = []
        for w, c in zip(width, cells):
            args += [w, c]
        print(fmt % tuple(args), file=out)

    print("", file=out)
    print("Admitted per tier vs what the limits permit "
          "(bound = sum over keys of burst + floor(window / T)):", file=out)
    emit(head)
    for l in lines:
        emit(l)
    b = rep["bad"]
    print(f"bad keys: {b['sent']} sent, {b['401']} x 401, {b['403']} x 403, "
          f"{b['other']} other", file=out)
    if rep["note"]:
        print(f"note: {rep['note']}", file=out)
    if rep["users_needed"] is not None:
        print(f"users: {rep['users_needed']} (fixed counts; -u must be this)",
              file=out)


@events.test_stop.add_listener
def _on_test_stop(**_kw):
    STOP_TIME[0] = time.time()


@events.quit.add_listener
def _on_quit(exit_code, **_kw):
    rep = tier_report()
    rep["locust_exit_code"] = exit_code
    print_report(rep)
    if REPORT:
        with open(REPORT, "w") as f:
            json.dump(rep, f, indent=1)
