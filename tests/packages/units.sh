#!/usr/bin/env bash
# systemd-analyze verify on every unit soci-node ships (in a throwaway root
# with stand-in binaries and a containerd.service, so dependencies resolve),
# and the security exposure of each service against its goal.
set -euo pipefail
here=$(cd "$(dirname "$0")/../.." && pwd)
root=$(mktemp -d /tmp/sn-units.XXXXXX)
trap 'rm -rf "$root"' EXIT
unitdir="$root/usr/lib/systemd/system"
mkdir -p "$unitdir" "$root/usr/bin" "$root/etc/systemd/system"
# The host's own units (targets, sockets) so dependencies resolve.
cp -a /lib/systemd/system/. "$unitdir/"
for b in soci-node soci-snapshotter-grpc containerd; do
  printf '#!/bin/sh\n' > "$root/usr/bin/$b"; chmod +x "$root/usr/bin/$b"
done
cat > "$unitdir/containerd.service" <<'UNIT'
[Unit]
Description=stand-in containerd
[Service]
Type=notify
ExecStart=/usr/bin/containerd
[Install]
WantedBy=multi-user.target
UNIT
cp "$here"/systemd/*.service "$unitdir/"
mkdir -p "$unitdir/containerd.service.d"
cp "$here"/systemd/containerd.service.d/*.conf "$unitdir/containerd.service.d/"

fail=0
for u in containerd.service soci-node-preflight.service soci-snapshotter.service; do
  # The only tolerated message: the man page is looked up on the host.
  out=$(systemd-analyze verify --root="$root" "$u" 2>&1 | grep -v "man soci-node(8)" || true)
  if [[ -n "$out" ]]; then
    echo "FAIL verify $u:"; echo "$out"; fail=1
  else
    echo "ok   verify $u"
  fi
done

check_exposure() {
  local unit=$1 goal=$2 score
  score=$(systemd-analyze security --offline=true --root="$root" "$unit" 2>/dev/null \
    | sed -n 's/.*Overall exposure level for [^:]*: \([0-9.]*\).*/\1/p')
  [[ -n "$score" ]] || { echo "FAIL exposure $unit: no score"; fail=1; return; }
  if awk -v s="$score" -v g="$goal" 'BEGIN { exit !(s <= g) }'; then
    echo "ok   exposure $unit $score <= $goal"
  else
    echo "FAIL exposure $unit $score > $goal"; fail=1
  fi
}
check_exposure soci-node-preflight.service 3.0
check_exposure soci-snapshotter.service 6.0
exit $fail
