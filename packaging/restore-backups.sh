# Restore every file soci-node changed from /var/lib/soci-node/backup/ (a
# mirror of the host paths; "<path>.absent" marks a file soci-node created),
# then drop the backups. Shared by the deb postrm (purge) and the rpm
# %postun (erase). POSIX sh; sourced.
soci_node_restore_backups() {
    b=/var/lib/soci-node/backup
    [ -d "$b" ] || return 0
    find "$b" -type f | while read -r f; do
        rel=${f#"$b"}
        case "$rel" in
            *.absent) rm -f "${rel%.absent}" ;;
            *) cp -p "$f" "$rel.soci-node-restore" && mv -f "$rel.soci-node-restore" "$rel" ;;
        esac
    done
    rm -rf /var/lib/soci-node
}
