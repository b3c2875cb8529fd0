#!/usr/bin/env bash
# SuperNode authentication keys for docker/with-auth.yml: an ECDSA P-384 key pair per SuperNode in OpenSSH
# format (what `flower-supernode --auth-supernode-private-key` and `flwr supernode register` read).
#   docker/keys.sh [OUTDIR] [N]      (default: docker/keys, 2 SuperNodes)
# Writes OUTDIR/supernode-<i>.key (private, mode 600) and supernode-<i>.pub; existing ones are replaced.
set -euo pipefail

out="${1:-$(dirname "$0")/keys}"
count="${2:-2}"
mkdir -p "$out"
for ((i = 0; i < count; i++)); do
  rm -f "$out/supernode-$i.key" "$out/supernode-$i.key.pub" "$out/supernode-$i.pub"
  ssh-keygen -q -t ecdsa -b 384 -N "" -C "fedlayer-supernode-$i" -f "$out/supernode-$i.key"
  mv "$out/supernode-$i.key.pub" "$out/supernode-$i.pub"
done
echo "SuperNode keys in $out: supernode-<i>.key (private), supernode-<i>.pub (register with the SuperLink)"
