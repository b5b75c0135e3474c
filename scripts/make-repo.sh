#!/usr/bin/env bash
# Build a dnf repository from the RPMs in target/packages/ (or the given
# directory) with createrepo_c, plus a soci-node.repo file pointing at
# BASEURL. Sign the RPMs beforehand (rpm --addsign) for gpgcheck=1.
#
#   scripts/make-repo.sh BASEURL [RPM_DIR] [OUT_DIR]
set -euo pipefail
here=$(cd "$(dirname "$0")/.." && pwd)
[[ $# -ge 1 ]] || { echo "usage: make-repo.sh BASEURL [RPM_DIR] [OUT_DIR]" >&2; exit 2; }
baseurl=$1 rpms=${2:-$here/target/packages} out=${3:-$here/target/repo}
shopt -s nullglob
files=("$rpms"/*.rpm)
((${#files[@]})) || { echo "make-repo: no .rpm in $rpms (run scripts/package.sh)" >&2; exit 1; }
mkdir -p "$out/packages"
cp "${files[@]}" "$out/packages/"
createrepo_c --quiet "$out"
gpgcheck=0
rpm -qp --qf '%{SIGPGP:pgpsig}\n' "${files[@]}" 2>/dev/null | grep -qv '(none)' && gpgcheck=1
cat > "$out/soci-node.repo" <<REPO
[soci-node]
name=soci-node
baseurl=$baseurl
enabled=1
gpgcheck=$gpgcheck
REPO
echo "repo in $out (gpgcheck=$gpgcheck): dnf config-manager --add-repo $baseurl/soci-node.repo" >&2
