# loadtest/lib.sh: shared by the loadtest scripts (sourced, bash).
#
# Everything started through these functions runs on ephemeral 127.0.0.1
# ports under $TMP and is killed by lt_cleanup (installed as the EXIT trap
# by lt_init). The system nginx, haproxy and redis are never touched.
#
#   . "$(dirname "$0")/lib.sh"
#   lt_init bench                 # names messages, makes $TMP, sets traps
#   lt_start_testup               # -> UP_PORT TESTUP_PID
#   lt_start_origin_nginx         # the same from an nginx origin (TESTUP_PID: its master)
#   lt_gen_keys 10000             # -> $TMP/keys.txt, $TMP/keys.yaml (tier bench)
#   lt_start_redis [PORT]         # -> REDIS_PORT REDIS_PID (PORT: a restart)
#   lt_start_nginx NAME proxy|limit_req   # -> PORT[NAME]
#   lt_start_nginx NAME kong      # the Kong-shaped peer (nginx + Lua, Redis EVALSHA)
#   lt_start_haproxy NAME         # -> PORT[NAME]
#   lt_start_tollgate NAME proxy|local|redis [EXTRA_YAML_FILE]  # -> PORT[NAME] ADMIN[NAME]
#   lt_gen_cert                   # -> $TMP/tls-cert.pem, $TMP/tls-key.pem (P-256)
#   LT_TLS=1 lt_start_nginx|lt_start_tollgate ...   # the listener speaks TLS
#   LT_BIN=other/tollgate lt_start_tollgate ...     # another tollgate binary
#   lt_run_wrk URL SECONDS LOGFILE  # -> "rps p50_ms p99_ms non2xx errors requests"
#   lt_wrk_max LOGFILE            # -> max latency (ms) of the last run logged
# shellcheck shell=bash

LT_HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
LT_PY=/usr/bin/python3
LT_NAME=loadtest
LT_PIDS=()
declare -A PORT ADMIN PID SCHEME

lt_die() { echo "$LT_NAME: $*" >&2; exit 1; }
lt_log() { echo "$LT_NAME: $*" >&2; }

lt_cleanup() {
    local pid
    trap - EXIT
    for pid in "${LT_PIDS[@]}"; do
        kill "$pid" 2>/dev/null || true
        kill -CONT "$pid" 2>/dev/null || true   # a SIGSTOPped one holds SIGTERM
    done
    for pid in "${LT_PIDS[@]}"; do
        wait "$pid" 2>/dev/null || true
    done
    if [[ ${KEEP_TMP:-0} == 1 ]]; then
        lt_log "kept $TMP"
    elif [[ -n ${TMP:-} && -d $TMP ]]; then
        rm -rf "$TMP"
    fi
}

# lt_init NAME: message prefix, temp dir, traps.
lt_init() {
    LT_NAME=$1
    TMP=$(mktemp -d "/tmp/tg-$LT_NAME.XXXXXX")
    trap lt_cleanup EXIT
    trap 'exit 130' INT TERM
}

# An unused port on 127.0.0.1 (the kernel picks; a tiny race is accepted).
lt_free_port() {
    "$LT_PY" -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'
}

# lt_spawn NAME CMD...: CMD in the background, output in $TMP/NAME.log,
# killed on exit; its pid in LAST_PID.
lt_spawn() {
    local name=$1; shift
    "$@" >"$TMP/$name.log" 2>&1 &
    LAST_PID=$!
    LT_PIDS+=("$LAST_PID")
}

# lt_wait_http NAME URL PID [WANT]: until URL answers (any status, or WANT),
# bounded at ~10 s; fails early if PID died.
lt_wait_http() {
    local name=$1 url=$2 pid=$3 want=${4:-} i code=
    for ((i = 0; i < 100; i++)); do
        code=$(curl -sk -o /dev/null -w '%{http_code}' -m 1 "$url" || true)
        if [[ $code != 000 && ( -z $want || $code == "$want" ) ]]; then
            return 0
        fi
        kill -0 "$pid" 2>/dev/null || lt_die "$name exited during startup: $(tail -n 5 "$TMP/$name.log" 2>/dev/null)"
        sleep 0.1
    done
    lt_die "$name: $url did not answer ${want:-at all} within 10 s (last: $code)"
}

# ---------------------------------------------------------------- servers

# lt_start_testup: the fast C upstream (TESTUP, TESTUP_THREADS) -> UP_PORT,
# TESTUP_PID.
lt_start_testup() {
    local i
    [[ -x $TESTUP ]] || lt_die "test upstream not found at $TESTUP (meson compile -C build)"
    "$TESTUP" -p 0 -t "${TESTUP_THREADS:-1}" >"$TMP/testup.out" 2>"$TMP/testup.log" &
    TESTUP_PID=$!
    LT_PIDS+=("$TESTUP_PID")
    UP_PORT=
    for ((i = 0; i < 100; i++)); do
        # the shell may not have created the file yet: not an error
        UP_PORT=$(sed -n 's/^PORT=//p' "$TMP/testup.out" 2>/dev/null || true)
        [[ -n $UP_PORT ]] && break
        kill -0 "${LT_PIDS[-1]}" 2>/dev/null || lt_die "tg-testup failed: $(cat "$TMP/testup.log")"
        sleep 0.05
    done
    [[ -n $UP_PORT ]] || lt_die "tg-testup printed no PORT="
    lt_wait_http tg-testup "http://127.0.0.1:$UP_PORT/" "${LT_PIDS[-1]}"
}

# lt_nginx_head DIR WORKERS [MODULES]: the start of an nginx.conf of ours,
# up to and inside "http {": everything under DIR, keep-alive for long runs.
lt_nginx_head() {
    # As root nginx would drop its workers to "nobody": stay root so the
    # temp dir needs no permission games.
    if [[ $(id -u) == 0 ]]; then echo "user root;"; fi
    cat <<EOF
${3:-}
worker_processes $2;
pid $1/nginx.pid;
error_log $1/error.log warn;
daemon off;
events { worker_connections 8192; }
http {
    access_log off;
    client_body_temp_path $1/tmp/body;
    proxy_temp_path       $1/tmp/proxy;
    fastcgi_temp_path     $1/tmp/fastcgi;
    uwsgi_temp_path       $1/tmp/uwsgi;
    scgi_temp_path        $1/tmp/scgi;
    keepalive_requests 1000000;
EOF
}

# lt_start_origin_nginx: an nginx that answers every request itself (200,
# "ok\n", text/plain: tg-testup's answer to GET /) with TESTUP_THREADS
# workers -> UP_PORT, TESTUP_PID (its master; the workers are its children).
# The issue's own figures were taken behind such an upstream: nginx parses a
# forwarded header in a fraction of what tg-testup's evhttp spends.
lt_start_origin_nginx() {
    local dir=$TMP/origin
    [[ -x ${NGINX:=/usr/sbin/nginx} ]] || lt_die "nginx not found at $NGINX (apt-get install nginx-light)"
    UP_PORT=$(lt_free_port)
    mkdir -p "$dir/tmp"
    {
        lt_nginx_head "$dir" "${TESTUP_THREADS:-1}"
        cat <<EOF
    keepalive_timeout 300s;
    server_tokens off;
    server {
        listen 127.0.0.1:$UP_PORT;
        location / { default_type text/plain; return 200 "ok\n"; }
    }
}
EOF
    } >"$dir/nginx.conf"
    "$NGINX" -t -q -p "$dir" -e "$dir/error.log" -c "$dir/nginx.conf" ||
        lt_die "origin: nginx config test failed: $(cat "$dir/error.log")"
    lt_spawn origin "$NGINX" -p "$dir" -e "$dir/error.log" -c "$dir/nginx.conf"
    TESTUP_PID=$LAST_PID
    lt_wait_http origin "http://127.0.0.1:$UP_PORT/" "$LAST_PID"
}

# lt_gen_keys N: $TMP/keys.txt (clear keys, one a line, for keys.lua) and
# $TMP/keys.yaml (tollgate's keys file, every key in tier "bench").
lt_gen_keys() {
    "$LT_PY" - "$1" "$TMP/keys.txt" "$TMP/keys.yaml" <<'EOF'
import hashlib, sys
n, txt, yml = int(sys.argv[1]), sys.argv[2], sys.argv[3]
with open(txt, "w") as t, open(yml, "w") as y:
    y.write("keys:\n")
    for i in range(n):
        key = f"bench-key-{i:05d}-tollgate"
        t.write(key + "\n")
        h = hashlib.sha256(key.encode()).hexdigest()
        y.write(f'  - {{ id: k{i:05d}, tier: bench, sha256: "{h}" }}\n')
EOF
}

# lt_gen_cert: a self-signed ECDSA P-256 certificate for 127.0.0.1 (one
# day) in $TMP/tls-cert.pem, its key in $TMP/tls-key.pem: what LT_TLS=1
# listeners serve (the same pair for nginx and tollgate).
lt_gen_cert() {
    [[ -f $TMP/tls-cert.pem ]] && return 0
    openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes \
        -keyout "$TMP/tls-key.pem" -out "$TMP/tls-cert.pem" -days 1 \
        -subj /CN=127.0.0.1 -addext subjectAltName=IP:127.0.0.1 \
        >"$TMP/openssl.log" 2>&1 || lt_die "openssl req failed: $(cat "$TMP/openssl.log")"
}

# lt_start_redis [PORT]: a private redis-server without persistence on a
# free port, or on PORT (a restart after a kill: log redis-N.log) ->
# REDIS_PORT, REDIS_PID.  Waits for PONG, bounded at ~10 s.
LT_REDIS_STARTS=0
lt_start_redis() {
    local i log=redis
    command -v "${REDIS_SERVER:-redis-server}" >/dev/null || lt_die "redis-server not found"
    command -v "${REDIS_CLI:-redis-cli}" >/dev/null || lt_die "redis-cli not found (apt-get install redis-tools)"
    REDIS_PORT=${1:-$(lt_free_port)}
    ((++LT_REDIS_STARTS > 1)) && log=redis-$LT_REDIS_STARTS
    lt_spawn "$log" "${REDIS_SERVER:-redis-server}" --port "$REDIS_PORT" --bind 127.0.0.1 \
        --save '' --appendonly no --dir "$TMP" ${REDIS_MODULE:+--loadmodule "$REDIS_MODULE"}
    REDIS_PID=$LAST_PID
    for ((i = 0; i < 200; i++)); do
        [[ $(lt_rcli PING 2>/dev/null || true) == PONG ]] && return 0
        kill -0 "$REDIS_PID" 2>/dev/null || lt_die "redis-server exited: $(cat "$TMP/$log.log")"
        sleep 0.05
    done
    lt_die "redis-server did not answer PING"
}
lt_rcli() { "${REDIS_CLI:-redis-cli}" -h 127.0.0.1 -p "$REDIS_PORT" "$@"; }

# lt_start_nginx NAME proxy|limit_req|kong: nginx with WORKERS workers in front
# of UP_PORT, keep-alive both sides, own prefix; limit_req: one state per
# X-API-Key value (no key check), rate and burst far above any load.
# kong: the Kong-shaped peer (loadtest/kong/peer.lua, Debian's
# libnginx-mod-http-lua): X-API-Key looked up in $TMP/keys.txt (401 if
# unknown), then one EVALSHA per request to the Redis of lt_start_redis
# (GCRA, RPM and BURST like tollgate's tier bench; Redis connections from
# a cosocket keepalive pool, timeouts REDIS_TIMEOUT_MS), 429 + Retry-After
# when denied; to the upstream X-Forwarded-For/-Proto, X-Request-ID and
# X-Consumer-ID, like tollgate (peer.lua says which headers and why).
# LT_TLS=1: the listener speaks TLS 1.3 only (lt_gen_cert's pair,
# nginx's default session settings), SCHEME[NAME]=https.
lt_start_nginx() {
    local name=$1 kind=$2 port dir limit_zone='' limit='' ssl='' sslconf='' mods='' lua='' fwd=''
    [[ -x ${NGINX:=/usr/sbin/nginx} ]] || lt_die "nginx not found at $NGINX (apt-get install nginx-light)"
    port=$(lt_free_port)
    dir=$TMP/$name
    mkdir -p "$dir/tmp"
    if [[ $kind == limit_req ]]; then
        limit_zone="limit_req_zone \$http_x_api_key zone=k:20m rate=100000r/s;"
        limit="limit_req zone=k burst=100000 nodelay;"
    elif [[ $kind == kong ]]; then
        [[ -f ${NGINX_MODULES:=/usr/lib/nginx/modules}/ngx_http_lua_module.so ]] ||
            lt_die "$name: no ngx_http_lua_module.so in $NGINX_MODULES (apt-get install libnginx-mod-http-lua)"
        [[ -n ${REDIS_PORT:-} ]] || lt_die "$name: needs lt_start_redis first"
        mods="load_module $NGINX_MODULES/ndk_http_module.so; load_module $NGINX_MODULES/ngx_http_lua_module.so;"
        lua="lua_package_path \"$LT_HERE/kong/?.lua;;\";
    init_by_lua_block {
        require(\"peer\").init{ keys = \"$TMP/keys.txt\", port = $REDIS_PORT, rpm = ${RPM:-6000000},
            burst = ${BURST:-100000}, timeout_ms = ${REDIS_TIMEOUT_MS:-50}, pool = ${KONG_POOL:-128} }
    }"
        limit="set \$consumer_id '';
            access_by_lua_block { require(\"peer\").access() }
            proxy_set_header X-Forwarded-For \$proxy_add_x_forwarded_for;
            proxy_set_header X-Forwarded-Proto \$scheme;
            proxy_set_header X-Request-ID \$request_id;
            proxy_set_header X-Consumer-ID \$consumer_id;"
    fi
    if [[ ${NGINX_FWD:-0} != 0 && $kind != kong ]]; then
        # what a production proxy_pass config forwards (and tollgate
        # always does): the upstream then parses as much as behind tollgate
        fwd="proxy_set_header X-Forwarded-For \$proxy_add_x_forwarded_for;
            proxy_set_header X-Forwarded-Proto \$scheme;
            proxy_set_header X-Request-ID \$request_id;"
    fi
    if [[ ${NGINX_FWD:-0} == same && $kind != kong ]]; then
        # the rest of tollgate's header work, so that the upstream and the
        # client parse the same bytes behind both: the consumer's id and
        # tier to the upstream, the key not passed on, and the request id
        # and the five rate-limit headers to the client (nginx cannot
        # compute them: fixed values as long as tollgate's for tier bench)
        fwd+="
            proxy_set_header X-Consumer-ID k00000;
            proxy_set_header X-Consumer-Tier bench;
            proxy_set_header X-API-Key \"\";
            add_header X-Request-ID \$request_id;
            add_header RateLimit-Policy '\"bench\";q=100000;w=1';
            add_header RateLimit '\"bench\";r=99999;t=1';
            add_header X-RateLimit-Limit 100000;
            add_header X-RateLimit-Remaining 99999;
            add_header X-RateLimit-Reset 1;"
    fi
    SCHEME[$name]=http
    if [[ ${LT_TLS:-0} == 1 ]]; then
        lt_gen_cert
        ssl=" ssl"
        sslconf="ssl_certificate $TMP/tls-cert.pem; ssl_certificate_key $TMP/tls-key.pem; ssl_protocols TLSv1.3;"
        SCHEME[$name]=https
    fi
    {
        lt_nginx_head "$dir" "${WORKERS:-2}" "$mods"
        cat <<EOF
    $limit_zone
    $lua
    upstream testup {
        server 127.0.0.1:$UP_PORT;
        keepalive 64;
        keepalive_requests 1000000;
    }
    server {
        listen 127.0.0.1:$port$ssl;
        $sslconf
        location / {
            $limit
            $fwd
            proxy_pass http://testup;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
        }
    }
}
EOF
    } >"$dir/nginx.conf"
    "$NGINX" -t -q -p "$dir" -e "$dir/error.log" -c "$dir/nginx.conf" ||
        lt_die "$name: nginx config test failed: $(cat "$dir/error.log")"
    lt_spawn "$name" "$NGINX" -p "$dir" -e "$dir/error.log" -c "$dir/nginx.conf"
    PID[$name]=$LAST_PID
    PORT[$name]=$port
    lt_wait_http "$name" "${SCHEME[$name]}://127.0.0.1:$port/" "$LAST_PID"
}

# lt_start_haproxy NAME: HAProxy (WORKERS threads) in front of UP_PORT with a
# stick-table rate limit per X-API-Key (http_req_rate over 1 s, deny with
# 429 above HAPROXY_RATE, default 100000: far above any load), server
# connections reused.
lt_start_haproxy() {
    local name=$1 port dir
    command -v "${HAPROXY:=haproxy}" >/dev/null || lt_die "haproxy not found (apt-get install haproxy)"
    port=$(lt_free_port)
    dir=$TMP/$name
    mkdir -p "$dir"
    cat >"$dir/haproxy.cfg" <<EOF
global
    nbthread ${WORKERS:-2}
    maxconn 4096
defaults
    mode http
    option http-keep-alive
    timeout connect 5s
    timeout client 60s
    timeout server 60s
    timeout http-keep-alive 60s
frontend fe
    bind 127.0.0.1:$port
    stick-table type string len 64 size 100k expire 60s store http_req_rate(1s)
    http-request track-sc0 req.hdr(x-api-key)
    http-request deny deny_status 429 if { sc_http_req_rate(0) gt ${HAPROXY_RATE:-100000} }
    default_backend be
backend be
    http-reuse always
    server up 127.0.0.1:$UP_PORT
EOF
    "$HAPROXY" -c -q -f "$dir/haproxy.cfg" >"$dir/check.log" 2>&1 ||
        lt_die "$name: haproxy config check failed: $(cat "$dir/check.log")"
    lt_spawn "$name" "$HAPROXY" -db -f "$dir/haproxy.cfg"
    PID[$name]=$LAST_PID
    PORT[$name]=$port
    SCHEME[$name]=http
    lt_wait_http "$name" "http://127.0.0.1:$port/" "$LAST_PID"
}

# lt_start_tollgate NAME proxy|local|redis [EXTRA]: tollgate (WORKERS
# workers, upstream keep-alive TG_KEEPALIVE: 64, or auto, 32, ...) in front of UP_PORT. proxy: no keys, no
# tiers; log_level TG_LOG_LEVEL (warn); local/redis: $TMP/keys.yaml, tier bench (RPM, BURST), buckets in
# process memory or in the Redis of lt_start_redis (on_failure: deny, so a
# Redis problem shows as errors; ON_FAILURE overrides). EXTRA: a YAML file appended to the
# config (TG_CONF_EXTRA is appended to every one); TIER_EXTRA: more keys
# of tier bench (e.g. "lease: { size: 64 }"). LT_TLS=1: the listener
# speaks TLS (lt_gen_cert's pair), SCHEME[NAME]=https. LT_BIN: run that
# tollgate binary instead of TOLLGATE (an A/B against another build).
# Waits for /readyz 200.
lt_start_tollgate() {
    local name=$1 kind=$2 extra=${3:-} port admin conf tls='' bin=${LT_BIN:-$TOLLGATE}
    [[ -x $bin ]] || lt_die "tollgate not found at $bin (meson compile -C build)"
    port=$(lt_free_port)
    admin=$(lt_free_port)
    conf=$TMP/$name.yaml
    SCHEME[$name]=http
    if [[ ${LT_TLS:-0} == 1 ]]; then
        lt_gen_cert
        tls=", tls: { cert: $TMP/tls-cert.pem, key: $TMP/tls-key.pem }"
        SCHEME[$name]=https
    fi
    {
        cat <<EOF
listen: [ { address: 127.0.0.1:$port$tls } ]
admin: { address: 127.0.0.1:$admin }
workers: ${WORKERS:-2}
log_level: ${TG_LOG_LEVEL:-warn}
upstream: { servers: [127.0.0.1:$UP_PORT], keepalive: ${TG_KEEPALIVE:-64} }
EOF
        case $kind in
        proxy) echo "store: local" ;;
        local | redis)
            echo "rate_limits: { bench: { requests_per_minute: ${RPM:-6000000}, burst_limit: ${BURST:-100000}${TIER_EXTRA:+, $TIER_EXTRA} } }"
            echo "auth: { keys_file: $TMP/keys.yaml }"
            echo "store: $kind"
            ;;
        *) lt_die "lt_start_tollgate: unknown kind $kind" ;;
        esac
        if [[ $kind == redis ]]; then
            echo "redis: { url: \"redis://127.0.0.1:$REDIS_PORT/0\", timeout_ms: ${REDIS_TIMEOUT_MS:-50}, on_failure: ${ON_FAILURE:-deny}${MAX_BATCH:+, max_batch: $MAX_BATCH}${REDIS_NATIVE:+, native: $REDIS_NATIVE} }"
        fi
        if [[ -n $extra ]]; then cat "$extra"; fi
        if [[ -n ${TG_CONF_EXTRA:-} ]]; then cat "$TG_CONF_EXTRA"; fi
    } >"$conf"
    "$bin" -t -c "$conf" >"$TMP/$name-check.log" 2>&1 ||
        lt_die "tollgate rejected $name's config: $(cat "$TMP/$name-check.log")"
    lt_spawn "$name" "$bin" -c "$conf"
    PID[$name]=$LAST_PID
    PORT[$name]=$port
    ADMIN[$name]=$admin
    lt_wait_http "$name" "${SCHEME[$name]}://127.0.0.1:$port/" "$LAST_PID"
    lt_wait_http "$name /readyz" "http://127.0.0.1:$admin/readyz" "$LAST_PID" 200
}

# ---------------------------------------------------------------- wrk

# lt_run_wrk URL SECONDS LOG [KEYS_FILE]: wrk -t WRK_THREADS -c CONNS
# --latency (and -H WRK_HEADER if set, e.g. "Connection: close": a new
# connection per request), with loadtest/keys.lua over KEYS_FILE if given (ORDER in the
# environment: roundrobin or random). Prints
# "rps p50_ms p99_ms non2xx errors requests". LT_WRK_CPU=FILE: writes the
# CPU clock ticks (user + system) wrk took to FILE (they are counted as the
# reaped children of this shell: call it in a subshell, $(...)).
lt_run_wrk() {
    local url=$1 secs=$2 logf=$3 keys=${4:-} out th=${WRK_THREADS:-2} c0=0 me=$BASHPID
    local args=(-t"$th" -c"${CONNS:-64}" -d"${secs}s" --latency)
    if [[ -n ${LT_WRK_CPU:-} ]]; then c0=$(lt_children_ticks "$me"); fi
    if [[ -n ${WRK_HEADER:-} ]]; then args+=(-H "$WRK_HEADER"); fi
    if [[ -n $keys ]]; then
        out=$(wrk "${args[@]}" -s "$LT_HERE/keys.lua" "$url" -- "$keys" "$th" 2>&1) ||
            lt_die "wrk failed on $url: $out"
    else
        out=$(wrk "${args[@]}" "$url" 2>&1) || lt_die "wrk failed on $url: $out"
    fi
    if [[ -n ${LT_WRK_CPU:-} ]]; then echo $(($(lt_children_ticks "$me") - c0)) >"$LT_WRK_CPU"; fi
    printf '%s\n' "$out" >>"$logf"
    printf '%s\n' "$out" | awk '
        function ms(v) {
            if (v ~ /us$/) return substr(v, 1, length(v) - 2) / 1000
            if (v ~ /ms$/) return substr(v, 1, length(v) - 2) + 0
            if (v ~ /s$/)  return substr(v, 1, length(v) - 1) * 1000
            if (v ~ /m$/)  return substr(v, 1, length(v) - 1) * 60000
            return -1
        }
        /requests in/                  { total = $1 }
        /^Requests\/sec:/              { rps = $2 }
        $1 == "50%"                    { p50 = ms($2) }
        $1 == "99%"                    { p99 = ms($2) }
        /Non-2xx or 3xx responses:/    { bad = $NF }
        /Socket errors:/ {
            for (i = 3; i <= NF; i++) if ($i ~ /^[0-9]+,?$/) err += $i
        }
        END { printf "%s %s %s %d %d %d\n", rps, p50, p99, bad, err, total }'
}

# lt_run_openloop URL SECONDS LOG KEYS_FILE RATE: LT_OPENLOOP (a build of
# loadtest/openloop.c) at RATE req/s over CONNS connections, keys at random
# from KEYS_FILE; prints what lt_run_wrk prints, the detail goes to LOG.
# LT_WRK_CPU as for lt_run_wrk.
lt_run_openloop() {
    local url=$1 secs=$2 logf=$3 keys=$4 rate=$5 out c0=0 me=$BASHPID
    if [[ -n ${LT_WRK_CPU:-} ]]; then c0=$(lt_children_ticks "$me"); fi
    out=$("$LT_OPENLOOP" -r "$rate" -d "$secs" -c "${CONNS:-64}" -k "$keys" "$url" 2>>"$logf") ||
        lt_die "openloop failed on $url: $(tail -n 2 "$logf")"
    if [[ -n ${LT_WRK_CPU:-} ]]; then echo $(($(lt_children_ticks "$me") - c0)) >"$LT_WRK_CPU"; fi
    printf '%s\n' "$out"
}

# lt_children_ticks PID: user + system clock ticks of the reaped children
# of shell PID (cutime + cstime of /proc/PID/stat; PID=$BASHPID taken
# before a $(...), which runs in a subshell of its own)
lt_children_ticks() {
    awk '{ print $16 + $17 }' "/proc/$1/stat"
}

# lt_wrk_max LOG: the max latency (ms) of the last wrk run lt_run_wrk
# logged in LOG (wrk's "Latency avg stdev max" line).
lt_wrk_max() {
    awk '
        function ms(v) {
            if (v ~ /us$/) return substr(v, 1, length(v) - 2) / 1000
            if (v ~ /ms$/) return substr(v, 1, length(v) - 2) + 0
            if (v ~ /s$/)  return substr(v, 1, length(v) - 1) * 1000
            if (v ~ /m$/)  return substr(v, 1, length(v) - 1) * 60000
            return -1
        }
        $1 == "Latency" && NF >= 4 { max = ms($4) }
        END { print max }' "$1"
}
