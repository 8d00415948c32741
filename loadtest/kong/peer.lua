-- loadtest/kong/peer.lua: the "Kong-shaped peer" of loadtest/bench (target
-- kong): nginx + ngx_http_lua (Debian's libnginx-mod-http-lua, with
-- lua-resty-core), doing per request what Kong's key-auth + a Redis rate
-- limit policy do:
--
--   1. X-API-Key looked up in a Lua table of the bench's keys (loaded once
--      in init_by_lua, in the master, shared copy-on-write by the workers:
--      Kong's key-auth cache after warm-up), 401 with Kong's JSON body when
--      missing or unknown;
--   2. ONE EVALSHA per request to Redis: a GCRA token bucket per key (the
--      same tier as tollgate's bench tier: requests per minute, burst),
--      SHA computed once, EVAL (which loads the script) only after a
--      NOSCRIPT; the Redis connection comes from the cosocket keepalive
--      pool (connect() reuses an idle pooled one, setkeepalive() puts it
--      back), so there is no connect per request;
--   3. denied: 429, Retry-After, Kong's JSON body; Redis error or timeout:
--      503 (like tollgate's on_failure: deny, so a Redis problem shows as
--      errors in the report); allowed: the headers of Kong's
--      rate-limiting plugin (RateLimit-Limit/-Remaining/-Reset,
--      X-RateLimit-Limit/-Remaining-Minute) and Kong's X-Kong-Request-Id
--      on the response, $consumer_id set for proxy_set_header
--      X-Consumer-ID, then proxy_pass.
--
-- The headers are there so the peer makes the client and the upstream
-- parse what tollgate makes them parse (tollgate: five rate limit headers
-- and X-Request-ID on the response; X-Forwarded-For/-Proto, X-Request-ID,
-- X-Consumer-ID and -Tier to the upstream). Kong itself sends more by
-- default (X-Forwarded-Host/-Port/-Path, X-Real-IP, X-Credential-
-- Identifier, Via, X-Kong-*-Latency); those are left out.
--
-- No lua-resty-redis in Debian 12: the RESP of the one command is written
-- here (a request as a table of strings, sock:send() takes it without a
-- concat; the reply read line by line).
--
-- nginx.conf (lt_start_nginx NAME kong writes it):
--   lua_package_path "loadtest/kong/?.lua;;";
--   init_by_lua_block { require("peer").init{ keys = FILE, port = P,
--       rpm = R, burst = B, timeout_ms = T, pool = N } }
--   location / { set $consumer_id ""; access_by_lua_block { require("peer").access() }
--       proxy_set_header X-Consumer-ID $consumer_id; ...; proxy_pass ...; }

local M = {}

local tcp = ngx.socket.tcp
local byte, sub, fmt = string.byte, string.sub, string.format
local tonumber = tonumber
local ngx_header = ngx.header
local ngx_var = ngx.var
local ngx_exit, ngx_print, ngx_log, ngx_ERR = ngx.exit, ngx.print, ngx.log, ngx.ERR

-- GCRA over one key. KEYS[1]: the key's bucket. ARGV: t (microseconds per
-- token), burst, cost. The key holds the theoretical arrival time (TAT,
-- microseconds, Redis clock), expiring when the bucket is full again.
-- Returns { allowed (1/0), remaining, reset s (allowed) | retry ms (denied) }.
local SCRIPT = [[
local tm = redis.call('TIME')
local now = tonumber(tm[1]) * 1000000 + tonumber(tm[2])
local t, burst, cost = tonumber(ARGV[1]), tonumber(ARGV[2]), tonumber(ARGV[3])
local v = redis.call('GET', KEYS[1])
local tat = v and tonumber(v) or now
if tat < now then tat = now end
local new = tat + cost * t
local over = new - t * burst - now
if over > 0 then
  return { 0, 0, math.ceil(over / 1000) }
end
redis.call('SET', KEYS[1], string.format('%d', new), 'PX', math.ceil((new - now) / 1000))
return { 1, math.floor((t * burst - (new - now)) / t), math.ceil((new - now) / 1000000) }
]]

local keys = {}             -- clear key -> RESP of its bucket name ("$N\r\nname\r\n")
local consumer = {}         -- clear key -> its id (X-Consumer-ID)
local host = "127.0.0.1"
local port, timeout_ms, pool, idle_ms
local limit_s               -- RateLimit-Limit
local evalsha_head          -- "*7\r\n$7\r\nEVALSHA\r\n$40\r\n<sha>\r\n$1\r\n1\r\n"
local eval_head             -- the same with EVAL and the script
local argv                  -- RESP of t, burst, cost (the same for every key)
local req = {}              -- the request being sent: head, key, argv

local function bulk(s)
    return "$" .. #s .. "\r\n" .. s .. "\r\n"
end

-- init{ keys, port, rpm, burst, timeout_ms, pool }: in init_by_lua.
function M.init(o)
    port, timeout_ms, pool = o.port, o.timeout_ms or 50, o.pool or 128
    idle_ms = 60000
    local n = 0
    for line in assert(io.open(o.keys, "r")):lines() do
        if line ~= "" then
            keys[line] = bulk(fmt("kong:rl:%05d", n))
            consumer[line] = fmt("k%05d", n)
            n = n + 1
        end
    end
    assert(n > 0, "peer.lua: no keys in " .. o.keys)
    local sha = {}
    for i = 1, 20 do
        sha[i] = fmt("%02x", byte(ngx.sha1_bin(SCRIPT), i))
    end
    evalsha_head = "*7\r\n" .. bulk("EVALSHA") .. bulk(table.concat(sha)) .. bulk("1")
    eval_head = "*7\r\n" .. bulk("EVAL") .. bulk(SCRIPT) .. bulk("1")
    argv = bulk(fmt("%.6f", 60e6 / o.rpm)) .. bulk(tostring(o.burst)) .. bulk("1")
    limit_s = tostring(o.burst)
end

local function respond(status, msg)
    ngx.status = status
    ngx_header["Content-Type"] = "application/json; charset=utf-8"
    ngx_print('{"message":"', msg, '"}\n')
    return ngx_exit(status)
end

-- a reply ":N" -> N; anything else -> nil, the line
local function int(sock)
    local line, err = sock:receive()
    if not line then return nil, err end
    if byte(line, 1) ~= 58 then return nil, line end
    return tonumber(sub(line, 2))
end

-- one script call over sock -> allowed, remaining, reset|retry; or nil, error
local function charge(sock, bucket, head)
    req[1], req[2], req[3] = head, bucket, argv
    local ok, err = sock:send(req)
    if not ok then return nil, err end
    local line
    line, err = sock:receive()
    if not line then return nil, err end
    if line ~= "*3" then return nil, line end   -- "-NOSCRIPT ...", "-ERR ..."
    local a, b, c
    a, err = int(sock)
    if a then b, err = int(sock) end
    if b then c, err = int(sock) end
    if not c then return nil, err end
    return a, b, c
end

function M.access()
    local key = ngx_var.http_x_api_key
    if not key then
        return respond(401, "No API key found in request")
    end
    local bucket = keys[key]
    if not bucket then
        return respond(401, "Invalid authentication credentials")
    end
    local sock = tcp()
    sock:settimeouts(timeout_ms, timeout_ms, timeout_ms)
    local ok, err = sock:connect(host, port)
    if not ok then
        ngx_log(ngx_ERR, "redis connect: ", err)
        return respond(503, "rate limit store unavailable")
    end
    local allowed, rem, t = charge(sock, bucket, evalsha_head)
    if not allowed and rem and sub(rem, 1, 9) == "-NOSCRIPT" then
        allowed, rem, t = charge(sock, bucket, eval_head)
    end
    if not allowed then
        ngx_log(ngx_ERR, "redis: ", rem)
        sock:close()
        return respond(503, "rate limit store unavailable")
    end
    sock:setkeepalive(idle_ms, pool)
    ngx_header["X-Kong-Request-Id"] = ngx_var.request_id
    ngx_header["X-RateLimit-Limit-Minute"] = limit_s
    ngx_header["X-RateLimit-Remaining-Minute"] = rem
    ngx_header["RateLimit-Limit"] = limit_s
    ngx_header["RateLimit-Remaining"] = rem
    if allowed == 0 then
        ngx_header["RateLimit-Reset"] = 0
        ngx_header["Retry-After"] = math.ceil(t / 1000)
        return respond(429, "API rate limit exceeded")
    end
    ngx_header["RateLimit-Reset"] = t
    ngx_var.consumer_id = consumer[key]
end

return M
