#!/usr/bin/env bash
# Builds the read-only tool image sessions run in (policy: filesystem.rootfs = "OUT").
#
#   rootfs/build.sh OUT                  Debian (mmdebstrap, or debootstrap) with bash, coreutils,
#                                        findutils, grep, sed, git, python3, ca-certificates, curl
#   rootfs/build.sh --tiny OUT           a few host binaries and their libraries, for tests
#
# Options: --suite NAME (bookworm), --mirror URL (use a snapshot.debian.org URL to pin the
# archive for a reproducible image), --include PKGS (comma-separated extra packages).
#
# Either way: setuid/setgid bits are stripped (and listed), package manager caches and lists are
# removed, every file is made read-only, and OUT.manifest records the package list with versions
# and the sha256 of the tree, for supply-chain review. SOURCE_DATE_EPOCH (default: the last
# commit's time) fixes timestamps.
set -euo pipefail

suite=bookworm
mirror=http://deb.debian.org/debian
extra=
tiny=0
out=
while [ $# -gt 0 ]; do
    case "$1" in
        --suite) suite=$2; shift 2 ;;
        --mirror) mirror=$2; shift 2 ;;
        --include) extra=$2; shift 2 ;;
        --tiny) tiny=1; shift ;;
        -h|--help) sed -n '2,16p' "$0"; exit 0 ;;
        -*) echo "build.sh: unknown option $1" >&2; exit 2 ;;
        *) out=$1; shift ;;
    esac
done
[ -n "$out" ] || { echo "usage: build.sh [--tiny] [--suite S] [--mirror URL] OUT" >&2; exit 2; }
[ ! -e "$out" ] || { echo "build.sh: $out exists; remove it first" >&2; exit 2; }
export SOURCE_DATE_EPOCH=${SOURCE_DATE_EPOCH:-$(git -C "$(dirname "$0")" log -1 --format=%ct 2>/dev/null || date +%s)}

packages=bash,coreutils,findutils,grep,sed,git,python3,ca-certificates,curl
[ -z "$extra" ] || packages=$packages,$extra

copy_with_libs() {
    # A host binary and the shared libraries it loads, at the same paths.
    local bin=$1 dest=$2
    local real
    real=$(readlink -f "$bin")
    install -D -m 0755 "$real" "$dest$bin"
    ldd "$real" 2>/dev/null | grep -o '/[^ ]*' | while read -r lib; do
        [ -e "$dest$lib" ] || install -D -m 0755 "$(readlink -f "$lib")" "$dest$lib"
    done
}

if [ "$tiny" = 1 ]; then
    mkdir -p "$out"
    for b in /bin/sh /bin/bash /bin/cat /bin/ls /bin/echo /bin/grep /bin/sed /usr/bin/env /usr/bin/id; do
        [ -e "$b" ] && copy_with_libs "$b" "$out"
    done
    # A stand-in for a setuid binary an image might carry, to be stripped below.
    cp "$out/bin/cat" "$out/bin/setuid-demo" && chmod 4755 "$out/bin/setuid-demo"
    mkdir -p "$out/etc" && echo "stockade-tiny 1" > "$out/etc/image-release"
    manifest_packages() { echo "(tiny image: host binaries, no packages)"; for b in "$out"/bin/*; do echo "file ${b#"$out"}"; done; }
else
    if command -v mmdebstrap >/dev/null; then
        mmdebstrap --variant=minbase --include="$packages" \
            --dpkgopt='path-exclude=/usr/share/{doc,man,info,locale}/*' \
            --dpkgopt='path-include=/usr/share/locale/locale.alias' \
            "$suite" "$out" "$mirror"
    elif command -v debootstrap >/dev/null; then
        debootstrap --variant=minbase --include="$packages" "$suite" "$out" "$mirror"
    else
        echo "build.sh: needs mmdebstrap or debootstrap (apt-get install mmdebstrap)" >&2
        exit 1
    fi
    manifest_packages() { dpkg-query --admindir="$out/var/lib/dpkg" -W -f '${Package} ${Version}\n' | sort; }
fi

# No setuid/setgid programs: the jail's no_new_privs already makes them inert; removing the bits
# keeps the image honest for anyone who uses it elsewhere.
stripped=$(find "$out" -xdev -type f -perm /6000 -print | sort)
if [ -n "$stripped" ]; then
    echo "$stripped" | xargs chmod ug-s
    echo "stripped setuid/setgid bits from:"; echo "$stripped" | sed "s|^$out|  |"
fi

# No package manager caches or lists.
rm -rf "$out"/var/cache/apt/* "$out"/var/lib/apt/lists/* "$out"/var/log/* "$out"/tmp/* 2>/dev/null || true

# Read-only, fixed timestamps.
chmod -R a-w "$out"
find "$out" -xdev -exec touch -h -d "@$SOURCE_DATE_EPOCH" {} + 2>/dev/null || true

# The tree's digest: path, type, mode and content (or link target) of every entry, sorted.
tree_sha256() {
    (cd "$out" && find . -xdev -print0 | LC_ALL=C sort -z | while IFS= read -r -d '' p; do
        if [ -L "$p" ]; then printf 'l %s %s\n' "$p" "$(readlink "$p")"
        elif [ -f "$p" ]; then printf 'f %s %s %s\n' "$p" "$(stat -c %a "$p")" "$(sha256sum < "$p" | cut -d' ' -f1)"
        else printf '%s %s %s\n' "$(stat -c %F "$p" | cut -c1)" "$p" "$(stat -c %a "$p")"
        fi
    done) | sha256sum | cut -d' ' -f1
}
{
    echo "# stockade rootfs manifest"
    echo "built: $(date -u -d "@$SOURCE_DATE_EPOCH" +%Y-%m-%dT%H:%M:%SZ) suite=$([ $tiny = 1 ] && echo tiny || echo "$suite") mirror=$([ $tiny = 1 ] && echo - || echo "$mirror")"
    echo "tree-sha256: $(tree_sha256)"
    echo "setuid-stripped: $(echo "$stripped" | grep -c . || true)"
    echo "packages:"
    manifest_packages | sed 's/^/  /'
} > "$out.manifest"
echo "built $out; manifest in $out.manifest"
