#!/usr/bin/env bash
# Jail start-up cost: `stockade run -- /bin/true` against bubblewrap on the same machine, in one run.
#
#   bench/jail_startup.sh [RUNS]
#
# Compares
#   1. stockade, full default jail (namespaces, mounts, landlock, seccomp, rlimits, cgroup limits)
#   2. stockade, the same jail without cgroup limits (what bwrap below also lacks)
#   3. stockade as `cargo build --release` makes it (dynamically linked), full default jail
#   4. bwrap --unshare-all --cap-drop ALL with /usr read-only, /proc, /dev and a /tmp tmpfs
# and prints mean times and the ratios stockade/bwrap. Installs bubblewrap and hyperfine from
# Debian's archive when missing. Needs root (cgroup limits; bwrap as root needs no setuid).
set -euo pipefail
cd "$(dirname "$0")/.."
runs=${1:-300}

need() { command -v "$1" >/dev/null 2>&1 || { apt-get update -qq && apt-get install -y -qq "$2" >/dev/null; }; }
need bwrap bubblewrap
need hyperfine hyperfine

# The release build as shipped for bare hosts (README, "Release build"): static-pie, so the jail
# start does not wait for the dynamic loader. The plain `cargo build --release` binary is timed
# beside it.
host=$(rustc -vV | sed -n 's/^host: //p')
cargo build --release --quiet
RUSTFLAGS="-C target-feature=+crt-static" cargo build --release --quiet --target "$host"
stockade=$PWD/target/$host/release/stockade
dynamic=$PWD/target/release/stockade
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
# The default policy with its cgroup limits removed; everything else identical.
sed -e '/^memory = /d' -e '/^pids = /d' -e '/^cpu = /d' policies/default.toml > "$tmp/nocgroup.toml"

bwrap_cmd="bwrap --unshare-all --cap-drop ALL --ro-bind /usr /usr"
for d in bin lib lib64 sbin; do
  if [ -L /$d ]; then bwrap_cmd+=" --symlink $(readlink /$d) /$d"; elif [ -d /$d ]; then bwrap_cmd+=" --ro-bind /$d /$d"; fi
done
bwrap_cmd+=" --proc /proc --dev /dev --tmpfs /tmp -- /bin/true"

hyperfine -N --warmup 20 --runs "$runs" --export-json "$tmp/r.json" \
  -n "stockade (default policy)" "$stockade run -- /bin/true" \
  -n "stockade (default, no cgroup limits)" "$stockade run --policy $tmp/nocgroup.toml -- /bin/true" \
  -n "stockade (default, dynamically linked)" "$dynamic run -- /bin/true" \
  -n "bwrap" "$bwrap_cmd" >/dev/null

python3 - "$tmp/r.json" <<'PY'
import json, sys
r = {x["command"]: x for x in json.load(open(sys.argv[1]))["results"]}
b = r["bwrap"]
print(f"{'':40} {'mean':>9} {'median':>9} {'stddev':>9}  ratio to bwrap (mean / median)")
for name, x in r.items():
    print(f"{name:40} {x['mean']*1e3:7.2f}ms {x['median']*1e3:7.2f}ms {x['stddev']*1e3:7.2f}ms  "
          f"{x['mean']/b['mean']:.2f} / {x['median']/b['median']:.2f}")
PY
