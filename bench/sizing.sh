#!/usr/bin/env bash
# What one live session costs the host: N idle sessions held by a worker against the local
# control plane, measured as proportional memory (PSS: shared pages split between the processes
# that map them) of every process a session adds, plus the kernel's own growth (slab, page
# tables, kernel stacks) from /proc/meminfo. RSS counts the shared static binary in full for
# every process and overstates a session several times over.
#
#   bench/sizing.sh [N]          (root; default N=100)
set -euo pipefail
cd "$(dirname "$0")/.."
n=${1:-100}
cargo build --release --quiet
bin=${CARGO_TARGET_DIR:-$PWD/target}/release/stockade
tmp=$(mktemp -d); chmod 755 "$tmp"
port=$((20000 + RANDOM % 20000))
cleanup() {
  # The worker first, and waited for: it leaves its items' images mounted for a restart, which
  # are then unmounted here before the directory goes.
  kill "${worker:-}" 2>/dev/null || true; wait "${worker:-}" 2>/dev/null || true
  kill "${cp:-}" 2>/dev/null || true; wait 2>/dev/null || true
  awk -v t="$tmp" 'index($5, t) == 1 { print $5 }' /proc/self/mountinfo | sort -r | xargs -r -n1 umount -l
  rm -rf "$tmp"
}
trap cleanup EXIT

"$bin" control-plane --listen "127.0.0.1:$port" --state "$tmp/cp" --lease 120s 2>/dev/null & cp=$!
for _ in $(seq 100); do [ -f "$tmp/cp/org.key" ] && break; sleep 0.1; done
org=$(cat "$tmp/cp/org.key")
printf '%s\n' '{"name": "bash", "input": {"command": "sleep 3600"}}' > "$tmp/idle.jsonl"

kib() { awk -v f="$1:" '$1 == f { print $2 }' /proc/meminfo; }
kernel() { echo $(( $(kib Slab) + $(kib PageTables) + $(kib KernelStack) )); }
pss_of() { # total PSS (KiB) of the given pids
  local t=0 p v
  for p in "$@"; do v=$(awk '/^Pss:/ { print $2 }' "/proc/$p/smaps_rollup" 2>/dev/null || echo 0); t=$((t + ${v:-0})); done
  echo $t
}
descendants() { # every process below $1
  local all; all=$(ps -e -o pid=,ppid=)
  local frontier=$1 out=""
  while [ -n "$frontier" ]; do
    local next=""
    for f in $frontier; do next+=" $(awk -v p="$f" '$2 == p { print $1 }' <<<"$all")"; done
    next=$(echo $next); out+=" $next"; frontier=$next
  done
  echo $out
}

"$bin" worker --environment-id env_local --base-url "http://127.0.0.1:$port" --state-dir "$tmp/w" \
  --environment-key-file "$tmp/cp/env_local.key" --max-sessions $((n + 4)) --image-overcommit 100000 2>/dev/null & worker=$!
sleep 1
sync; echo 3 > /proc/sys/vm/drop_caches 2>/dev/null || true
k0=$(kernel); w0=$(pss_of $worker)
for _ in $(seq "$n"); do
  ANTHROPIC_API_KEY=$org "$bin" control-plane session create --api-url "http://127.0.0.1:$port" --script "$tmp/idle.jsonl" >/dev/null
done
# Each session: its supervisor, the jail's init, the primary thread's lane, the shell and its sleep.
for _ in $(seq 600); do
  [ "$(pgrep -fc 'sleep 3600' || true)" -ge "$n" ] && break; sleep 0.1
done
sleep 2
k1=$(kernel); w1=$(pss_of $worker)
procs=$(descendants $worker)
s=$(pss_of $procs)
echo "sessions: $n ($(echo $procs | wc -w) processes below the worker)"
echo "per session: PSS $((s / n)) KiB of its processes, kernel +$(((k1 - k0) / n)) KiB (slab, page tables, stacks), worker +$(((w1 - w0) / n)) KiB"
echo "=> about $(( (s + k1 - k0 + w1 - w0) / n )) KiB per idle session"
echo "pid_max: $(cat /proc/sys/kernel/pid_max); an idle session holds $(( $(echo $procs | wc -w) / n )) pids"
