#!/usr/bin/env bash
# Package tests: build the .deb and .rpm, check their metadata and files,
# lint them, install the .deb into a throwaway root (dpkg --root, maintainer
# scripts run in that root with busybox as its shell), upgrade it keeping an
# operator's config change, run the installed preflight there, and purge:
# the original containerd config must come back byte for byte. The .rpm is
# installed with rpm --root and erased the same way.
set -euo pipefail
here=$(cd "$(dirname "$0")/../.." && pwd)
cd "$here"
fails=0 passes=0
ok()   { echo "ok   $*"; passes=$((passes + 1)); }
bad()  { echo "FAIL $*"; fails=$((fails + 1)); }
check() { local what=$1; shift; if "$@"; then ok "$what"; else bad "$what"; fi; }

bash tests/packages/units.sh && ok "units verify + exposure" || bad "units verify + exposure"
bash tests/packages/fetch-soci.sh && ok "fetch-soci.sh against a fake release on 127.0.0.1" || bad "fetch-soci.sh"

bash scripts/package.sh
deb=$(ls target/packages/soci-node_*_amd64.deb)
rpmf=$(ls target/packages/soci-node-*.x86_64.rpm)
echo "sizes: $(du -k "$deb" | cut -f1) KiB deb, $(du -k "$rpmf" | cut -f1) KiB rpm"

# --- deb metadata and contents
for f in Provides Conflicts Replaces; do
  check "deb $f soci-snapshotter" grep -q soci-snapshotter <(dpkg-deb -f "$deb" "$f")
done
check "deb depends on containerd and fuse" grep -q 'containerd | containerd.io, fuse3 | fuse' <(dpkg-deb -f "$deb" Depends)
check "deb conffile" grep -qx /etc/soci-node/config.toml <(dpkg-deb -I "$deb" conffiles)
listing=$(dpkg-deb -c "$deb")
for want in "-rwxr-xr-x (root/root|0/0) .* ./usr/bin/soci-node" "-rwxr-xr-x (root/root|0/0) .* ./usr/bin/soci-snapshotter-grpc" \
            "-rw-r--r-- (root/root|0/0) .* ./lib/systemd/system/soci-node-preflight.service" \
            "-rw-r--r-- (root/root|0/0) .* ./lib/systemd/system/containerd.service.d/10-soci-node.conf" \
            "-rw-r--r-- (root/root|0/0) .* ./usr/share/man/man8/soci-node.8.gz" \
            "-rw-r--r-- (root/root|0/0) .* ./usr/share/bash-completion/completions/soci-node"; do
  check "deb has: ${want##* }" grep -Eq -- "$want" <<<"$listing"
done
lint=$(lintian --fail-on error "$deb" 2>&1) && ok "lintian: no errors" || { bad "lintian errors"; echo "$lint"; }
echo "lintian warnings kept:"; grep '^W:' <<<"$lint" || echo "  none"

# --- rpm metadata and contents
check "rpm provides soci-snapshotter" grep -q '^soci-snapshotter' <(rpm -qp --provides "$rpmf" 2>/dev/null)
check "rpm obsoletes soci-snapshotter" grep -q '^soci-snapshotter' <(rpm -qp --obsoletes "$rpmf" 2>/dev/null)
check "rpm requires containerd" grep -q '^containerd' <(rpm -qp --requires "$rpmf" 2>/dev/null)
check "rpm config(noreplace)" grep -qx 'cn /etc/soci-node/config.toml' \
  <(rpm -qp --qf '[%{FILEFLAGS:fflags} %{FILENAMES}\n]' "$rpmf" 2>/dev/null)
# Errors rpmlint reports that belong to the build host (signing, the
# packager/host tags cargo-generate-rpm does not set): anything else fails.
rl=$(rpmlint "$rpmf" 2>&1 || true)
unexpected=$(grep ': E: ' <<<"$rl" | grep -Ev 'E: (no-signature|no-packager-tag|no-group-tag|no-changelogname-tag|no-buildhost-tag)$' || true)
if [[ -z "$unexpected" ]]; then ok "rpmlint: only build-host errors"; else bad "rpmlint errors"; echo "$unexpected"; fi

# --- dnf repository
repo=$(mktemp -d /tmp/sn-repo.XXXXXX)
bash scripts/make-repo.sh "file://$repo" target/packages "$repo"
primary=$(zcat "$repo"/repodata/*primary.xml.gz)
check "repo lists soci-node" grep -q '<name>soci-node</name>' <<<"$primary"
obsoletes=$(grep -A2 '<rpm:obsoletes>' <<<"$primary" || true)
check "repo carries the Obsoletes of soci-snapshotter" grep -q 'name="soci-snapshotter"' <<<"$obsoletes"
check "repo file points at the repo" grep -qx "baseurl=file://$repo" "$repo/soci-node.repo"
rm -rf "$repo"

# --- a throwaway root with a shell for the maintainer scripts
mkroot() {
  local r=$1
  mkdir -p "$r/bin" "$r/usr/bin" "$r/tmp" "$r/var/lib/dpkg/info" "$r/var/lib/dpkg/updates" "$r/dev" "$r/etc/containerd"
  cp /bin/busybox "$r/bin/busybox"
  for t in sh cp mv rm find mkdir cat; do ln -sf busybox "$r/bin/$t"; done
  : > "$r/var/lib/dpkg/status"
  : > "$r/dev/fuse"
  ln -sf "$here/.deps/containerd-2.1/usr/bin/containerd" "$r/usr/bin/containerd"
  "$here/.deps/containerd-2.1/usr/bin/containerd" config default > "$r/etc/containerd/config.toml"
}
settings=$(mktemp); printf '[imds]\nenabled = false\n' > "$settings"

R=$(mktemp -d /tmp/sn-deb.XXXXXX); mkroot "$R"
cp "$R/etc/containerd/config.toml" "$R.original"
dpkg --root="$R" --force-depends --force-not-root -i "$deb" >/dev/null
check "deb installed" grep -q '^Status: install ok installed' <(dpkg --root="$R" -s soci-node)
check "installed files have their modes" test -x "$R/usr/bin/soci-node" -a -f "$R/etc/soci-node/config.toml"
check "--version names the bundled SOCI" grep -q 'bundled SOCI' <("$R/usr/bin/soci-node" --version)
"$R/usr/bin/soci-node" --root "$R" --config "$settings" preflight >/dev/null
check "installed preflight activates SOCI" grep -q '"state": "active"' "$R/run/soci-node/status.json"
check "containerd config patched" grep -q "snapshotter = 'soci'" "$R/etc/containerd/config.toml"
# Upgrade keeps an operator's change to the conffile.
echo 'on_failure = "fail"' >> "$R/etc/soci-node/config.toml"
cp "$R/etc/soci-node/config.toml" "$R.settings"
SOCI_NODE_VERSION=0.1.1 bash scripts/package.sh >/dev/null 2>&1
deb2=$(ls target/packages/soci-node_0.1.1*_amd64.deb)
dpkg --root="$R" --force-depends --force-confold -i "$deb2" >/dev/null
check "upgraded to 0.1.1" grep -q '^Version: 0.1.1' <(dpkg --root="$R" -s soci-node)
check "upgrade kept the changed config" cmp -s "$R.settings" "$R/etc/soci-node/config.toml"
dpkg --root="$R" --force-depends --purge soci-node >/dev/null
check "purge restored containerd's config byte for byte" cmp -s "$R.original" "$R/etc/containerd/config.toml"
check "purge removed the SOCI config soci-node created" test ! -e "$R/etc/soci-snapshotter-grpc/config.toml"
check "purge removed the backups" test ! -e "$R/var/lib/soci-node"
rm -rf "$R" "$R.original" "$R.settings"

# --- rpm into a throwaway root (scripts run there too)
rpmf=$(ls target/packages/soci-node-0.1.1-*.x86_64.rpm)
R=$(mktemp -d /tmp/sn-rpm.XXXXXX); mkroot "$R"
cp "$R/etc/containerd/config.toml" "$R.original"
rpm --root "$R" --initdb
rpm --root "$R" --nodeps -i "$rpmf"
check "rpm installed" rpm --root "$R" -q soci-node
check "rpm config file marked" grep -qx /etc/soci-node/config.toml <(rpm --root "$R" -qc soci-node)
"$R/usr/bin/soci-node" --root "$R" --config "$settings" preflight >/dev/null
check "rpm: preflight patched containerd" grep -q "snapshotter = 'soci'" "$R/etc/containerd/config.toml"
rpm --root "$R" --nodeps -e soci-node
check "rpm erase restored containerd's config byte for byte" cmp -s "$R.original" "$R/etc/containerd/config.toml"
rm -rf "$R" "$R.original" "$settings"

echo "packages: $passes passed, $fails failed"
((fails == 0))
