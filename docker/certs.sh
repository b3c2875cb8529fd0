#!/usr/bin/env bash
# Self-signed CA + SuperLink server certificate for TLS between SuperLink, SuperNodes and the flwr CLI.
#   docker/certs.sh [OUTDIR] [EXTRA_SAN...]    (default OUTDIR: docker/certs)
# Writes OUTDIR/ca.crt, ca.key, server.pem, server.key. The server certificate is valid for 127.0.0.1,
# ::1, localhost and "superlink" (the compose service name); add names with EXTRA_SAN, e.g.
# DNS:superlink.example.org IP:10.0.0.5. Existing files are replaced.
set -euo pipefail

out="${1:-$(dirname "$0")/certs}"
shift || true
days="${CERT_DAYS:-365}"
san="IP:127.0.0.1,IP:::1,DNS:localhost,DNS:superlink"
for extra in "$@"; do san="$san,$extra"; done

mkdir -p "$out"
tmp="$(mktemp -d)"
trap 'rm -rf "$tmp"' EXIT

openssl genrsa -out "$out/ca.key" 4096 2>/dev/null
openssl req -x509 -new -key "$out/ca.key" -sha256 -days "$days" -subj "/CN=fedlayer-ca" -out "$out/ca.crt"

openssl genrsa -out "$out/server.key" 4096 2>/dev/null
openssl req -new -key "$out/server.key" -subj "/CN=superlink" -out "$tmp/server.csr"
cat > "$tmp/ext.cnf" <<EXT
basicConstraints = CA:FALSE
keyUsage = digitalSignature, keyEncipherment
extendedKeyUsage = serverAuth
subjectAltName = $san
EXT
openssl x509 -req -in "$tmp/server.csr" -CA "$out/ca.crt" -CAkey "$out/ca.key" -CAcreateserial \
  -CAserial "$tmp/ca.srl" -days "$days" -sha256 -extfile "$tmp/ext.cnf" -out "$out/server.pem" 2>/dev/null

# Private keys for the owner only; images running as another user need `chown` (see docker/README.md).
chmod 644 "$out/ca.crt" "$out/server.pem"
chmod 600 "$out/ca.key" "$out/server.key"
openssl verify -CAfile "$out/ca.crt" "$out/server.pem" >/dev/null
echo "certificates in $out: ca.crt server.pem server.key (SAN $san)"
