#!/usr/bin/env bash
# The main job on the bundled example node (examples/al2023-node): real
# containerd 2.1 and soci-snapshotter from Debian's archive, a dry run that
# shows the diff, the real run, the status, and a second run that changes
# nothing. Touches nothing outside a temp dir and the repo's .deps/.
set -euo pipefail
here=$(cd "$(dirname "$0")/.." && pwd)
cd "$here"

bash scripts/test-deps.sh >/dev/null
cargo build --quiet --release --bin soci-node
bin="$here/target/release/soci-node"

node=$(mktemp -d /tmp/soci-node-demo.XXXXXX)
trap 'rm -rf "$node"' EXIT
cp -a examples/al2023-node/. "$node/"
mkdir -p "$node/usr/bin"
ln -s "$here/.deps/containerd-2.1/usr/bin/containerd" "$node/usr/bin/containerd"
ln -s "$here/.deps/soci/usr/bin/soci-snapshotter-grpc" "$node/usr/bin/soci-snapshotter-grpc"
ln -s "$here/.deps/soci/usr/bin/soci" "$node/usr/bin/soci"

say() { printf '\n\033[1m$ %s\033[0m\n' "$*"; }

say soci-node --root "$node" preflight --dry-run
"$bin" --root "$node" preflight --dry-run

say soci-node --root "$node" preflight
"$bin" --root "$node" preflight

say soci-node --root "$node" status
"$bin" --root "$node" status

say "containerd config dump (the real validator) | grep soci"
"$node/usr/bin/containerd" --config "$node/etc/containerd/config.toml" config dump | grep -n "soci" 

say "soci-node --root $node preflight   # again: nothing changes"
"$bin" --root "$node" preflight | grep '^file:'
