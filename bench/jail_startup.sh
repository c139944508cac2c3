#!/usr/bin/env bash
# Jail start-up cost: `stockade run -- /bin/true` against bubblewrap on the same machine, in one run.
#
#   bench/jail_startup.sh [RUNS]
#
# Compares
#   1. stockade as shipped (static musl binary, as the Containerfile builds it), full default jail
#      (namespaces, mounts, landlock, seccomp, rlimits, cgroup limits)
#   2. the same binary and jail without cgroup limits (what bwrap below also lacks)
#   3. the same without cgroup limits or the copied /etc entries: the floor of the jail's own
#      mechanism (policy, namespaces, mounts, landlock, seccomp, waiting for its teardown)
#   4. stockade as `cargo build --release` makes it (glibc, dynamically linked), full default jail
#   5. bwrap --unshare-all --cap-drop ALL with /usr read-only, /proc, /dev and a /tmp tmpfs
# and prints mean and median times and the ratios stockade/bwrap. Installs bubblewrap, musl-tools
# and the musl target when missing. Needs root (cgroup limits; bwrap as root needs no setuid).
set -euo pipefail
cd "$(dirname "$0")/.."
runs=${1:-300}

need() { command -v "$1" >/dev/null 2>&1 || { apt-get update -qq && apt-get install -y -qq "$2" >/dev/null; }; }
need bwrap bubblewrap
need python3 python3
need musl-gcc musl-tools
musl=x86_64-unknown-linux-musl
rustup target list --installed | grep -qx "$musl" || rustup target add "$musl"

cargo build --release --quiet
cargo build --release --quiet --target "$musl"
target_dir=${CARGO_TARGET_DIR:-$PWD/target}
stockade=$target_dir/$musl/release/stockade
dynamic=$target_dir/release/stockade
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
# The default policy with its cgroup limits removed; everything else identical.
sed -e '/^memory = /d' -e '/^pids = /d' -e '/^cpu = /d' policies/default.toml > "$tmp/nocgroup.toml"
# ...and without the /etc entries (a multi-line list).
sed -e '/^etc = \[/,/^\]/c etc = []' "$tmp/nocgroup.toml" > "$tmp/floor.toml"

bwrap_cmd="bwrap --unshare-all --cap-drop ALL --ro-bind /usr /usr"
for d in bin lib lib64 sbin; do
  if [ -L /$d ]; then bwrap_cmd+=" --symlink $(readlink /$d) /$d"; elif [ -d /$d ]; then bwrap_cmd+=" --ro-bind /$d /$d"; fi
done
bwrap_cmd+=" --proc /proc --dev /dev --tmpfs /tmp -- /bin/true"

# Interleaved rounds (each command once per round) rather than one block per command: on a
# small VM the host's background work drifts over a run, and blocks would hand that drift to
# whichever command happened to run then. The order within each round is shuffled: what a
# command leaves for the kernel to finish after it returns (bwrap does not wait for its PID 1's
# namespace teardown) lands on whichever command runs next, and a fixed order would always hand
# it to the same one.
python3 - "$runs" \
  "stockade (default policy)=$stockade run -- /bin/true" \
  "stockade (default, no cgroup limits)=$stockade run --policy $tmp/nocgroup.toml -- /bin/true" \
  "stockade (no cgroup limits, no /etc)=$stockade run --policy $tmp/floor.toml -- /bin/true" \
  "stockade (default, glibc dynamic)=$dynamic run -- /bin/true" \
  "bwrap=$bwrap_cmd" <<'PY'
import os, random, statistics, sys, time
runs = int(sys.argv[1])
cmds = [a.split("=", 1) for a in sys.argv[2:]]
times = {name: [] for name, _ in cmds}
for i in range(runs + 20):  # the first 20 rounds warm caches up and are not counted
    for name, cmd in random.sample(cmds, len(cmds)):
        argv = cmd.split()
        t = time.perf_counter_ns()
        pid = os.posix_spawnp(argv[0], argv, os.environ)
        _, status = os.waitpid(pid, 0)
        dt = (time.perf_counter_ns() - t) / 1e6
        if os.waitstatus_to_exitcode(status) != 0:
            sys.exit(f"{name} failed: {cmd}")
        if i >= 20:
            times[name].append(dt)
b = times["bwrap"]
print(f"{runs} interleaved runs each")
print(f"{'':40} {'mean':>9} {'median':>9} {'stddev':>9}  ratio to bwrap (mean / median)")
for name, t in times.items():
    print(f"{name:40} {statistics.mean(t):7.2f}ms {statistics.median(t):7.2f}ms {statistics.stdev(t):7.2f}ms  "
          f"{statistics.mean(t) / statistics.mean(b):.2f} / {statistics.median(t) / statistics.median(b):.2f}")
PY
