#!/usr/bin/env bash
# Build soci-node's .deb and .rpm (x86_64 here) into target/packages/.
#
# SOCI binaries come from $SOCI_BIN_DIR (soci, soci-snapshotter-grpc and the
# license files, as scripts/fetch-soci.sh stages a pinned upstream release);
# unset, they are taken from Debian's soci-snapshotter package (.deps/soci,
# via scripts/test-deps.sh), so this works on machines without GitHub access.
# SOCI_NODE_VERSION overrides the package version (upgrade tests).
set -euo pipefail
here=$(cd "$(dirname "$0")/.." && pwd)
cd "$here"
log() { printf '[package] %s\n' "$*" >&2; }

stage=target/soci-stage
rm -rf "$stage" && mkdir -p "$stage/LICENSES"
if [[ -n "${SOCI_BIN_DIR:-}" ]]; then
  cp "$SOCI_BIN_DIR/soci" "$SOCI_BIN_DIR/soci-snapshotter-grpc" "$stage/"
  for f in NOTICE.md THIRD_PARTY_LICENSES; do
    [[ -f "$SOCI_BIN_DIR/$f" ]] && cp "$SOCI_BIN_DIR/$f" "$stage/LICENSES/"
  done
else
  [[ -x .deps/soci/usr/bin/soci-snapshotter-grpc ]] || bash scripts/test-deps.sh >&2
  cp .deps/soci/usr/bin/soci .deps/soci/usr/bin/soci-snapshotter-grpc "$stage/"
  cp .deps/soci/usr/share/doc/soci-snapshotter/copyright "$stage/LICENSES/copyright"
  gzip -dc .deps/soci/usr/share/doc/soci-snapshotter/NOTICE.md.gz > "$stage/LICENSES/NOTICE.md"
fi
soci_version=$("$stage/soci-snapshotter-grpc" --version | awk '{for (i=1;i<=NF;i++) if ($i ~ /^v?[0-9]+\.[0-9]+/) {sub(/^v/,"",$i); sub(/-.*/,"",$i); print $i; exit}}')
[[ -n "$soci_version" ]] || { log "cannot read the SOCI version from $stage/soci-snapshotter-grpc"; exit 1; }
log "bundled SOCI $soci_version"

export SOCI_NODE_BUNDLED_SOCI=$soci_version
cargo build --release --locked --bin soci-node --bin soci-node-gen-assets
rm -rf target/assets && ./target/release/soci-node-gen-assets target/assets
mkdir -p target/assets/man
for m in target/assets/*.8; do gzip -9nc "$m" > "target/assets/man/$(basename "$m").gz"; done

# Maintainer scripts: the shared restore function + each body.
mkdir -p target/pkg-scripts/deb target/pkg-scripts/rpm
cp packaging/deb/postinst packaging/deb/prerm target/pkg-scripts/deb/
{ echo '#!/bin/sh'; echo 'set -e'; cat packaging/restore-backups.sh packaging/deb/postrm.body; } > target/pkg-scripts/deb/postrm
chmod 755 target/pkg-scripts/deb/*
cp packaging/rpm/post_install.sh packaging/rpm/pre_uninstall.sh target/pkg-scripts/rpm/
{ cat packaging/restore-backups.sh packaging/rpm/post_uninstall.body; } > target/pkg-scripts/rpm/post_uninstall.sh

out=target/packages
rm -rf "$out" && mkdir -p "$out"
ver_args=()
[[ -n "${SOCI_NODE_VERSION:-}" ]] && ver_args=(--deb-version "$SOCI_NODE_VERSION")
cargo deb --no-build "${ver_args[@]}" --output "$out/" >&2
rpm_args=()
[[ -n "${SOCI_NODE_VERSION:-}" ]] && rpm_args=(--set-metadata "version = \"$SOCI_NODE_VERSION\"")
cargo generate-rpm "${rpm_args[@]}" --output "$out/" >&2
log "built:"; ls -l "$out" >&2
