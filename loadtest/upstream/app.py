"""Sample upstream for tollgate: the "leads" API of the original design.

A small FastAPI app that tollgate fronts in demos, load tests and
integration tests. Run it with ./run (uvicorn, several workers).

Endpoints
  GET  /health                     liveness, {"status": "ok"}
  GET  /leads?limit=N              list of leads (1 <= N <= 1000, default 20)
  GET  /leads/{id}                 one lead, 404 if unknown
  POST /leads                      create a lead (JSON, validated), 201
  GET  /slow?ms=M                  answer after M ms (asyncio.sleep)
  GET  /stream?chunks=K&delay_ms=D chunked response of K lines, D ms apart
  GET  /status/{code}              answer with that status code
  POST /echo                       the request body, byte-exact
  GET  /headers                    the request headers as a JSON object

The store is in memory and per worker process: every worker is seeded
with the same leads 1..SEED_LEADS, but a lead created by POST lives only
in the worker that handled it (ids are tagged with the worker's pid so
they never collide).
"""

import asyncio
import itertools
import os
import re
from datetime import datetime, timezone
from typing import Dict, List, Optional

from fastapi import FastAPI, HTTPException, Query, Request, Response
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import BaseModel, Field, validator

SEED_LEADS = int(os.environ.get("SEED_LEADS", "100"))
MAX_ECHO_BYTES = int(os.environ.get("MAX_ECHO_BYTES", str(64 * 1024 * 1024)))
MAX_SLOW_MS = 600_000
MAX_STREAM_CHUNKS = 100_000

EMAIL_RE = re.compile(r"^[^@\s]+@[^@\s]+\.[^@\s]+$")
STATUSES = ("new", "contacted", "qualified", "won", "lost")

app = FastAPI(title="leads", version="1.0.0", docs_url=None, redoc_url=None)


class LeadIn(BaseModel):
    name: str = Field(..., min_length=1, max_length=200)
    email: str = Field(..., max_length=320)
    company: Optional[str] = Field(None, max_length=200)
    phone: Optional[str] = Field(None, max_length=50)
    source: str = Field("api", max_length=50)
    score: int = Field(0, ge=0, le=100)
    status: str = "new"

    @validator("email")
    def _email(cls, v: str) -> str:
        if not EMAIL_RE.match(v):
            raise ValueError("not an email address")
        return v.lower()

    @validator("status")
    def _status(cls, v: str) -> str:
        if v not in STATUSES:
            raise ValueError("status must be one of " + ", ".join(STATUSES))
        return v


class Lead(LeadIn):
    id: int
    created_at: str


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def _seed(n: int) -> Dict[int, Lead]:
    companies = ("Acme", "Globex", "Initech", "Umbrella", "Hooli", "Stark")
    leads = {}
    for i in range(1, n + 1):
        company = companies[i % len(companies)]
        leads[i] = Lead(
            id=i,
            name=f"Lead {i}",
            email=f"lead{i}@{company.lower()}.example",
            company=company,
            phone=f"+1-555-{i:04d}",
            source=("web", "referral", "event")[i % 3],
            score=(i * 37) % 101,
            status=STATUSES[i % len(STATUSES)],
            created_at="2024-01-01T00:00:00+00:00",
        )
    return leads


LEADS: Dict[int, Lead] = _seed(SEED_LEADS)
# New ids: above the seed range, low digits = pid, so workers never collide.
_next_seq = itertools.count(1)


def _new_id() -> int:
    return (SEED_LEADS + next(_next_seq)) * 1_000_000 + os.getpid() % 1_000_000


@app.get("/health")
async def health():
    return {"status": "ok", "leads": len(LEADS)}


@app.get("/leads", response_model=List[Lead])
async def list_leads(limit: int = Query(20, ge=1, le=1000)):
    return list(itertools.islice(LEADS.values(), limit))


@app.get("/leads/{lead_id}", response_model=Lead)
async def get_lead(lead_id: int):
    lead = LEADS.get(lead_id)
    if lead is None:
        raise HTTPException(status_code=404, detail="lead not found")
    return lead


@app.post("/leads", response_model=Lead, status_code=201)
async def create_lead(body: LeadIn):
    lead = Lead(id=_new_id(), created_at=_now(), **body.dict())
    LEADS[lead.id] = lead
    return lead


@app.get("/slow")
async def slow(ms: int = Query(1000, ge=0, le=MAX_SLOW_MS)):
    await asyncio.sleep(ms / 1000.0)
    return {"slept_ms": ms}


@app.get("/stream")
async def stream(chunks: int = Query(5, ge=0, le=MAX_STREAM_CHUNKS),
                 delay_ms: int = Query(100, ge=0, le=MAX_SLOW_MS)):
    async def gen():
        for i in range(chunks):
            if i and delay_ms:
                await asyncio.sleep(delay_ms / 1000.0)
            yield f"chunk {i}\n".encode()

    # No Content-Length: uvicorn frames it with Transfer-Encoding: chunked.
    return StreamingResponse(gen(), media_type="text/plain")


@app.api_route("/status/{code}", methods=["GET", "POST", "PUT", "DELETE",
                                          "PATCH", "HEAD"])
async def status(code: int):
    if code < 200 or code > 599:
        raise HTTPException(status_code=400, detail="code must be 200..599")
    if code in (204, 304):
        return Response(status_code=code)
    return JSONResponse({"status": code}, status_code=code)


@app.post("/echo")
async def echo(request: Request):
    # Read as a stream so the size cap applies before the body is all in.
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > MAX_ECHO_BYTES:
            raise HTTPException(status_code=413, detail="body too large")
    return Response(bytes(body), media_type="application/octet-stream",
                    headers={"X-Echo-Length": str(len(body))})


@app.get("/headers")
async def headers(request: Request):
    # Names lower-cased (as ASGI gives them); repeated headers joined ", ".
    out: Dict[str, str] = {}
    for name, value in request.headers.items():
        out[name] = out[name] + ", " + value if name in out else value
    # The target as received (before percent-decoding), for tests of what
    # a proxy in front forwarded.
    target = request.scope.get("raw_path", b"").decode("latin-1")
    if request.scope.get("query_string"):
        target += "?" + request.scope["query_string"].decode("latin-1")
    return JSONResponse(out, headers={"X-Echo-Target": target})
