-- loadtest/keys.lua: wrk script that spreads requests over many API keys.
--
--   wrk -t2 -c64 -d10s --latency -s loadtest/keys.lua URL -- KEYS_FILE [THREADS]
--
-- KEYS_FILE holds one API key (the clear key string) a line. Each wrk
-- thread walks the list round-robin from its own starting point
-- (thread i of THREADS starts at i * N / THREADS), so a run is
-- deterministic and the threads do not send the same key at the same
-- moment. The key goes in the X-API-Key header (HEADER in the
-- environment overrides the name); wrk.headers is set per key and the
-- request formatted once per key in init(), so request() only picks the
-- next prepared request and the load generator spends no time on string
-- building (the same for every target).
--
-- ORDER=random in the environment picks each request's key at random
-- instead (uniform over the list; thread i seeds its generator with i, so
-- a run is still repeatable).
--
-- wrk counts non-2xx/3xx responses itself ("Non-2xx or 3xx responses");
-- loadtest/bench-limits turns that line into a warning.

local counter = 0

function setup(thread)
    thread:set("id", counter)
    counter = counter + 1
end

local reqs = {}
local n, i = 0, 0
local random_order = false

function init(args)
    local path = args[1]
    if path == nil then
        error("keys.lua: usage: wrk ... -s keys.lua URL -- KEYS_FILE [THREADS]")
    end
    local nthreads = tonumber(args[2] or "1")
    local header = os.getenv("HEADER") or "X-API-Key"
    local f = assert(io.open(path, "r"))
    for line in f:lines() do
        if line ~= "" then
            n = n + 1
            wrk.headers[header] = line
            reqs[n] = wrk.format()
        end
    end
    f:close()
    if n == 0 then
        error("keys.lua: no keys in " .. path)
    end
    -- start of this thread's walk (0-based), then request() adds 1 first
    i = math.floor((id or 0) * n / nthreads) % n
    local order = os.getenv("ORDER") or "roundrobin"
    if order == "random" then
        random_order = true
        math.randomseed(1 + (id or 0))
    elseif order ~= "roundrobin" then
        error("keys.lua: ORDER must be roundrobin or random, not " .. order)
    end
end

function request()
    if random_order then
        return reqs[math.random(n)]
    end
    i = i + 1
    if i > n then
        i = 1
    end
    return reqs[i]
end
