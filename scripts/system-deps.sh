#!/bin/sh
# Install the system tools the host steps and their tests call, when missing.
# Runs as root only (apt-get needs it); elsewhere it says what is missing.
set -eu

need=""
command -v nft >/dev/null 2>&1 || need="$need nftables"
command -v qemu-img >/dev/null 2>&1 || need="$need qemu-utils"
command -v mkfs.ext4 >/dev/null 2>&1 || need="$need e2fsprogs"
command -v ip >/dev/null 2>&1 || need="$need iproute2"
command -v losetup >/dev/null 2>&1 || need="$need mount"
[ -z "$need" ] && exit 0

if [ "$(id -u)" -ne 0 ]; then
    echo "system-deps: missing$need; install them as root (apt-get install$need)." >&2
    echo "system-deps: host tests and the real host drivers will skip without them." >&2
    exit 0
fi
echo "system-deps: installing$need"
export DEBIAN_FRONTEND=noninteractive
apt-get update -qq
# shellcheck disable=SC2086
apt-get install -y -qq --no-install-recommends $need >/dev/null
