#!/usr/bin/env bash
# scripts/fetch-soci.sh against a fake release served on 127.0.0.1: a good
# archive is staged; a tampered archive and a wrong pinned sum are refused.
set -euo pipefail
here=$(cd "$(dirname "$0")/../.." && pwd)
w=$(mktemp -d /tmp/sn-fetch.XXXXXX)
cleanup() { [[ -n "${srv:-}" ]] && kill "$srv" 2>/dev/null; rm -rf "$w"; }
trap cleanup EXIT
fails=0
ok() { echo "ok   $*"; }
bad() { echo "FAIL $*"; fails=$((fails + 1)); }

ver=9.9.9 name=soci-snapshotter-9.9.9-linux-amd64.tar.gz
mkdir -p "$w/pkg/bin" "$w/www/v$ver"
printf '#!/bin/sh\necho soci\n' > "$w/pkg/bin/soci"
printf '#!/bin/sh\necho grpc\n' > "$w/pkg/bin/soci-snapshotter-grpc"
echo notice > "$w/pkg/NOTICE.md"; echo licenses > "$w/pkg/THIRD_PARTY_LICENSES"
tar -czf "$w/www/v$ver/$name" -C "$w/pkg" .
good=$(sha256sum "$w/www/v$ver/$name" | cut -d' ' -f1)
echo "$good  $name" > "$w/www/v$ver/$name.sha256sum"
echo "$ver amd64 $good" > "$w/pinned"

port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
python3 -m http.server "$port" --bind 127.0.0.1 --directory "$w/www" >/dev/null 2>&1 & srv=$!
for _ in $(seq 50); do curl -fs "http://127.0.0.1:$port/" >/dev/null && break; sleep 0.1; done
export SOCI_RELEASE_BASE=http://127.0.0.1:$port SOCI_PINNED_FILE=$w/pinned

if bash "$here/scripts/fetch-soci.sh" "$ver" amd64 "$w/out" 2>"$w/err" && [[ -x "$w/out/soci-snapshotter-grpc" && -f "$w/out/THIRD_PARTY_LICENSES" ]]; then
  ok "good archive staged"
else bad "good archive: $(cat "$w/err")"; fi

echo "$ver amd64 $(printf '%064d' 0)" > "$w/pinned"
if bash "$here/scripts/fetch-soci.sh" "$ver" amd64 "$w/out2" 2>"$w/err"; then bad "wrong pinned sum accepted"
elif grep -q "pinned" "$w/err"; then ok "wrong pinned sum refused: $(cat "$w/err")"; else bad "wrong pinned sum: unclear error: $(cat "$w/err")"; fi

echo "$ver amd64 $good" > "$w/pinned"
echo tampered >> "$w/www/v$ver/$name"
if bash "$here/scripts/fetch-soci.sh" "$ver" amd64 "$w/out3" 2>"$w/err"; then bad "tampered archive accepted"
elif grep -q "published" "$w/err"; then ok "tampered archive refused: $(cat "$w/err")"; else bad "tampered: unclear error: $(cat "$w/err")"; fi
[[ ! -e "$w/out3" ]] && ok "nothing staged from a refused archive" || bad "refused archive left files"

if bash "$here/scripts/fetch-soci.sh" 1.0.0 amd64 "$w/out4" 2>"$w/err"; then bad "unpinned version accepted"
else ok "unpinned version refused: $(cat "$w/err")"; fi
echo "fetch-soci: $((5 - fails)) passed, $fails failed"
((fails == 0))
