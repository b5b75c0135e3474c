#!/usr/bin/env bash
# Install what the test suite needs on a fresh Debian 12 machine, from
# Debian's archive only:
#   - system packages (registry, skopeo, systemd-analyze, ...) via apt-get;
#   - containerd 1.6 (bookworm), 1.7 (trixie), 2.1 (sid) and soci-snapshotter
#     (sid) unpacked into .deps/ inside the repo, with a private apt state so
#     the machine's apt configuration is not touched.
# Idempotent: a second run only checks. Prints where everything is.
set -euo pipefail

here=$(cd "$(dirname "$0")/.." && pwd)
deps="$here/.deps"
mkdir -p "$deps"

log() { printf '[test-deps] %s\n' "$*" >&2; }

need_pkgs=(docker-registry skopeo systemd iproute2 ca-certificates curl
  rpm rpmlint lintian dpkg-dev busybox-static)
missing=()
for p in "${need_pkgs[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'install ok installed' || missing+=("$p")
done
if ((${#missing[@]})); then
  log "apt-get install ${missing[*]}"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi

# Private apt state for the newer suites.
apt_dir="$deps/apt"
mkdir -p "$apt_dir/lists/partial" "$apt_dir/cache/archives/partial" "$deps/debs"
cat > "$apt_dir/sources.list" <<SRC
deb [signed-by=/usr/share/keyrings/debian-archive-keyring.gpg] http://deb.debian.org/debian bookworm main
deb [signed-by=/usr/share/keyrings/debian-archive-keyring.gpg] http://deb.debian.org/debian trixie main
deb [signed-by=/usr/share/keyrings/debian-archive-keyring.gpg] http://deb.debian.org/debian sid main
SRC
apt_opts=(
  -o "Dir::Etc::SourceList=$apt_dir/sources.list" -o Dir::Etc::SourceParts=/dev/null
  -o "Dir::State::Lists=$apt_dir/lists" -o "Dir::Cache=$apt_dir/cache"
  -o Dir::State::status=/dev/null -o APT::Sandbox::User=root -qq
)

# name  apt-spec (package/suite)
targets=(
  "containerd-1.6 containerd/bookworm"
  "containerd-1.7 containerd/trixie"
  "containerd-2.1 containerd/sid"
  "soci soci-snapshotter/sid"
)

need_download=0
for t in "${targets[@]}"; do
  set -- $t
  [[ -x "$deps/$1/usr/bin/${1%%-*}" || -x "$deps/$1/usr/bin/soci-snapshotter-grpc" ]] || need_download=1
done

if ((need_download)); then
  log "updating private apt lists (bookworm, trixie, sid)"
  apt-get "${apt_opts[@]}" update
  for t in "${targets[@]}"; do
    set -- $t
    name=$1 spec=$2
    log "downloading $spec"
    rm -rf "$deps/debs/$name" && mkdir -p "$deps/debs/$name"
    (cd "$deps/debs/$name" && apt-get "${apt_opts[@]}" download "$spec")
    deb=$(ls "$deps/debs/$name"/*.deb)
    rm -rf "$deps/$name" && mkdir -p "$deps/$name"
    dpkg-deb -x "$deb" "$deps/$name"
    dpkg-deb -f "$deb" Version > "$deps/$name/VERSION"
  done
fi

for t in "${targets[@]}"; do
  set -- $t
  for b in "$deps/$1"/usr/bin/*; do
    case "$(basename "$b")" in containerd|soci|soci-snapshotter-grpc)
      "$b" --version >/dev/null 2>&1 || { log "FAILED: $b --version"; exit 1; } ;;
    esac
  done
  log "$1: $(cat "$deps/$1/VERSION")"
done

# Packaging tools (pinned): cargo-deb and cargo-generate-rpm.
if ! command -v cargo-deb >/dev/null || ! command -v cargo-generate-rpm >/dev/null; then
  log "cargo install cargo-deb cargo-generate-rpm"
  cargo install --locked --quiet cargo-deb@3.8.0 cargo-generate-rpm@0.21.1 >&2
fi

# runc is needed by containerd's shim only for running containers; the
# real-component tests pull and unpack, which needs no runtime.
cat > "$deps/env" <<ENV
SOCI_NODE_DEPS=$deps
ENV
log "ready: $deps"
