# Shared by scripts/test and scripts/demo: dependency install and build.
# shellcheck shell=bash

TG_ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)

# Debian 12 packages tollgate builds, tests and demos with.
TG_PACKAGES=(
    meson ninja-build pkg-config gcc
    libevent-dev libevhtp-dev libhiredis-dev libssl-dev libyaml-dev
    libcurl4-openssl-dev libcriterion-dev libsystemd-dev clang libclang-rt-14-dev
    redis-server python3-fastapi python3-uvicorn curl openssl
)

# The version: meson's project(version:), its one source.
tg_version() {
    meson introspect --projectinfo "$TG_ROOT/meson.build" |
        python3 -c 'import json,sys; print(json.load(sys.stdin)["version"])'
}

tg_as_root() {
    if [ "$(id -u)" -eq 0 ]; then "$@"; else sudo "$@"; fi
}

# Install whatever is missing: one apt-get update, one apt-get install.
tg_install_deps() {
    local missing=() p
    for p in "${TG_PACKAGES[@]}" "$@"; do
        if ! dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed"; then
            missing+=("$p")
        fi
    done
    if [ ${#missing[@]} -eq 0 ]; then
        return 0
    fi
    echo "==> installing: ${missing[*]}"
    export DEBIAN_FRONTEND=noninteractive
    tg_as_root apt-get update -q
    tg_as_root apt-get install -y -q --no-install-recommends "${missing[@]}"
}

# tg_build DIR [meson options...]
tg_build() {
    local dir=$1; shift
    if [ ! -f "$TG_ROOT/$dir/build.ninja" ]; then
        meson setup "$TG_ROOT/$dir" "$TG_ROOT" "$@" >/dev/null
    fi
    meson compile -C "$TG_ROOT/$dir" >/dev/null
}
