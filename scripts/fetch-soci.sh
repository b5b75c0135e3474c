#!/usr/bin/env bash
# Download an upstream SOCI release and stage its binaries for packaging.
#
#   scripts/fetch-soci.sh VERSION ARCH [OUT_DIR]      ARCH: amd64 | arm64
#
# Fetches soci-snapshotter-VERSION-linux-ARCH.tar.gz and its .sha256sum from
# the release page ($SOCI_RELEASE_BASE, default GitHub), and refuses the
# archive unless its sha256 matches BOTH the published .sha256sum and the sum
# pinned in packaging/soci-version ($SOCI_PINNED_FILE). Then unpacks soci,
# soci-snapshotter-grpc, NOTICE.md and THIRD_PARTY_LICENSES into OUT_DIR
# (default target/soci-bin/VERSION-ARCH), ready for SOCI_BIN_DIR=OUT_DIR
# scripts/package.sh.
set -euo pipefail
here=$(cd "$(dirname "$0")/.." && pwd)
die() { printf 'fetch-soci: %s\n' "$*" >&2; exit 1; }

[[ $# -ge 2 ]] || die "usage: fetch-soci.sh VERSION ARCH [OUT_DIR]"
ver=${1#v} arch=$2
case "$arch" in amd64|arm64) ;; *) die "ARCH must be amd64 or arm64, not '$arch'" ;; esac
out=${3:-$here/target/soci-bin/$ver-$arch}
base=${SOCI_RELEASE_BASE:-https://github.com/awslabs/soci-snapshotter/releases/download}
pinned_file=${SOCI_PINNED_FILE:-$here/packaging/soci-version}

pinned=$(awk -v v="$ver" -v a="$arch" '$1 == v && $2 == a { print $3 }' "$pinned_file")
[[ "$pinned" =~ ^[0-9a-f]{64}$ ]] || die "no pinned sha256 for $ver $arch in $pinned_file: add '$ver $arch <sha256>' after verifying the release"

name=soci-snapshotter-$ver-linux-$arch.tar.gz
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
curl -fsSL --retry 3 --max-time 300 -o "$work/$name" "$base/v$ver/$name" || die "cannot download $base/v$ver/$name"
curl -fsSL --retry 3 --max-time 60 -o "$work/$name.sha256sum" "$base/v$ver/$name.sha256sum" || die "cannot download $base/v$ver/$name.sha256sum"

actual=$(sha256sum "$work/$name" | cut -d' ' -f1)
published=$(awk '{ print $1; exit }' "$work/$name.sha256sum")
[[ "$actual" == "$published" ]] || die "$name: sha256 $actual does not match the published $name.sha256sum ($published): refusing it"
[[ "$actual" == "$pinned" ]] || die "$name: sha256 $actual does not match the sum pinned in $pinned_file ($pinned): refusing it"

mkdir -p "$out"
tar -xzf "$work/$name" -C "$work"
for f in soci soci-snapshotter-grpc NOTICE.md THIRD_PARTY_LICENSES; do
  src=$(find "$work" -name "$f" -type f | head -n1)
  [[ -n "$src" ]] || die "$name has no $f"
  install -m "$([[ $f == soci* ]] && echo 755 || echo 644)" "$src" "$out/$f"
done
echo "$ver" > "$out/VERSION"
echo "staged SOCI $ver ($arch) in $out" >&2
