#!/usr/bin/env bash
# The main job on embedded defaults, in ./demo: a base image, an overlay, data, snapshots, convert, info, check.
set -euo pipefail
VDISK=${VDISK:-vdisk}
PYTHON=${PYTHON:-python3}
DIR=${DEMO_DIR:-demo}
rm -rf "$DIR" && mkdir -p "$DIR" && cd "$DIR"
say() {
    printf '\n\033[1m$ %s\033[0m\n' "$*"
    "$@" || { rc=$?; printf '\ndemo: step "%s" failed (exit %d); if that command is not implemented yet, ' \
                 "$*" "$rc" >&2; printf 'the demo stops here.\n' >&2; exit "$rc"; }
}

# a "guest disk" with recognisable data: 4 MiB of text in the first MiB, a second region further on
"$PYTHON" - <<'PY'
with open("guest.raw", "wb") as f:
    f.truncate(64 << 20)
    f.write(b"vdisk demo: the first megabyte of the guest disk\n" * 20000)
    f.seek(40 << 20)
    f.write(bytes(range(256)) * 4096)
PY
say "$VDISK" convert -f raw -O qcow2 guest.raw base.qcow2
say "$VDISK" create -f qcow2 -b base.qcow2 -F qcow2 overlay.qcow2
say "$VDISK" snapshot -c before-update overlay.qcow2
"$PYTHON" - <<'PY'
# the guest writes into the overlay (what a VM would do), through the vdisk engine
import os, sys
from ansible_collections.vdisk.images.plugins.module_utils.vdisk.ops.chain import open_image, close_chain
img = open_image("overlay.qcow2", "qcow2", writable=True)
img.write(1 << 20, b"an update written into the overlay\n" * 1000)
close_chain(img)
print("wrote 35000 bytes at offset 1 MiB of overlay.qcow2")
PY
say "$VDISK" snapshot -l overlay.qcow2
say "$VDISK" info --backing-chain overlay.qcow2
say "$VDISK" map overlay.qcow2
say "$VDISK" convert -O raw overlay.qcow2 flattened.raw
say "$VDISK" convert -O qcow2 -o cluster_size=128k overlay.qcow2 standalone.qcow2
say "$VDISK" compare overlay.qcow2 standalone.qcow2
say "$VDISK" info standalone.qcow2
say "$VDISK" check standalone.qcow2
say "$VDISK" resize standalone.qcow2 +64M
say "$VDISK" info --output=json standalone.qcow2
printf '\nDemo files are in %s/\n' "$(pwd)"
