# %systemd_post: apply the preset on first install; no restart of containerd.
if [ "$1" -eq 1 ] && command -v systemctl >/dev/null 2>&1; then
    systemctl --no-reload preset soci-node-preflight.service soci-snapshotter.service >/dev/null 2>&1 || :
fi
