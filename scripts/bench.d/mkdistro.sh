#!/usr/bin/env bash
# scripts/bench.d/mkdistro.sh WORK_DIR — a real distribution userland as a 5-layer OCI layout.
#
# The synthetic bench image (mkimage.py) has a few hundred directories; a real userland has
# thousands, with symlink farms and hardlinks, which is what a first walk and a whole-image
# read meet in practice. This builds Debian bookworm (debootstrap --variant=minbase, plus
# python3, then a development image's usual packages: compilers, kernel headers, git, npm —
# about 65,000 entries in 6,100 directories, 1.1 GB) once into WORK_DIR/rootfs, then splits
# it into gzip layers (mkdistro.py) in
# WORK_DIR/layout (OCI layout, ref name "distro"; stats in WORK_DIR/layout/stats.json).
# Both are kept: run again, it reuses them. Push with e.g.
#   skopeo --insecure-policy copy --dest-tls-verify=false oci:WORK_DIR/layout:distro \
#     docker://127.0.0.1:PORT/bench/distro:latest
# Run as root on Debian (debootstrap needs Debian's package registry).
#
# Environment: DISTRO_SUITE=bookworm DISTRO_MIRROR=http://deb.debian.org/debian
#              DISTRO_INCLUDE=python3 (debootstrap --include)
#              DISTRO_EXTRA="python3-pip ... npm" (apt-get install in the chroot; "" for none)
set -euo pipefail
[ $# = 1 ] || { echo "usage: $0 WORK_DIR" >&2; exit 2; }
WORK=$1
HERE=$(cd "$(dirname "$0")" && pwd)
SUITE=${DISTRO_SUITE:-bookworm}
MIRROR=${DISTRO_MIRROR:-http://deb.debian.org/debian}
INCLUDE=${DISTRO_INCLUDE:-python3}
EXTRA=${DISTRO_EXTRA-python3-pip python3-venv build-essential git linux-headers-amd64 locales npm}
mkdir -p "$WORK"

if [ ! -e "$WORK/rootfs.done" ]; then
  command -v debootstrap >/dev/null ||
    { apt-get update -q >/dev/null; DEBIAN_FRONTEND=noninteractive apt-get install -y -q debootstrap >/dev/null; }
  rm -rf "$WORK/rootfs.tmp"
  debootstrap --variant=minbase --include="$INCLUDE" "$SUITE" "$WORK/rootfs.tmp" "$MIRROR" >&2
  if [ -n "$EXTRA" ]; then
    mount --bind /proc "$WORK/rootfs.tmp/proc"
    # shellcheck disable=SC2086 # a list of package names
    DEBIAN_FRONTEND=noninteractive chroot "$WORK/rootfs.tmp" \
      apt-get install -y -q --no-install-recommends $EXTRA >&2 || { umount "$WORK/rootfs.tmp/proc"; exit 1; }
    umount "$WORK/rootfs.tmp/proc"
  fi
  # apt's downloaded packages are not part of a container image's userland
  rm -rf "$WORK/rootfs.tmp/var/cache/apt/archives/"*.deb
  rm -rf "$WORK/rootfs"
  mv "$WORK/rootfs.tmp" "$WORK/rootfs"
  echo "$SUITE minbase +$INCLUDE +$EXTRA" >"$WORK/rootfs.done"
fi

if [ ! -e "$WORK/layout/stats.json" ]; then
  rm -rf "$WORK/layout.tmp"
  python3 "$HERE/mkdistro.py" "$WORK/rootfs" "$WORK/layout.tmp"
  rm -rf "$WORK/layout"
  mv "$WORK/layout.tmp" "$WORK/layout"
fi
echo "$WORK/layout"
