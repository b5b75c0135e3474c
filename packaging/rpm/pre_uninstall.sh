# %systemd_preun: on erase, disable and stop the snapshotter.
if [ "$1" -eq 0 ] && command -v systemctl >/dev/null 2>&1; then
    systemctl --no-reload disable --now soci-snapshotter.service soci-node-preflight.service >/dev/null 2>&1 || :
fi
