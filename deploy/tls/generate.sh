#!/bin/sh
# Certificates and keys for a Stamen deployment with TLS and SuperNode authentication.
#
#   deploy/tls/generate.sh [OUT_DIR] [N_SUPERNODES]      (defaults: deploy/tls/certs, 4)
#   STAMEN_TLS_SANS="DNS:server.lan,IP:192.168.1.10" deploy/tls/generate.sh   # the address nodes dial
#
# Writes: ca.crt/ca.key (a private CA), server.pem/server.key (the SuperLink, signed by
# the CA; SANs superlink, localhost, 127.0.0.1 plus STAMEN_TLS_SANS), and per SuperNode
# supernode-I.key/.pub (OpenSSH ECDSA P-384, the kind flower-supernode
# --auth-supernode-private-key reads; register the .pub with `flwr supernode register`).
# Keys are for this deployment only; keep ca.key off the devices.
set -eu
out=${1:-deploy/tls/certs}
n=${2:-4}
days=${STAMEN_TLS_DAYS:-365}
mkdir -p "$out"
umask 077
sans="DNS:superlink,DNS:localhost,IP:127.0.0.1${STAMEN_TLS_SANS:+,$STAMEN_TLS_SANS}"

openssl req -x509 -newkey rsa:3072 -nodes -days "$days" -subj "/CN=Stamen CA" \
  -keyout "$out/ca.key" -out "$out/ca.crt" 2>/dev/null
openssl req -newkey rsa:3072 -nodes -subj "/CN=superlink" \
  -keyout "$out/server.key" -out "$out/server.csr" 2>/dev/null
printf 'subjectAltName=%s\nbasicConstraints=CA:FALSE\nkeyUsage=digitalSignature,keyEncipherment\nextendedKeyUsage=serverAuth\n' \
  "$sans" > "$out/server.ext"
openssl x509 -req -in "$out/server.csr" -CA "$out/ca.crt" -CAkey "$out/ca.key" -CAcreateserial \
  -days "$days" -extfile "$out/server.ext" -out "$out/server.pem" 2>/dev/null
rm -f "$out/server.csr" "$out/server.ext" "$out/ca.srl"
chmod 644 "$out/ca.crt" "$out/server.pem"

i=0
while [ "$i" -lt "$n" ]; do
  rm -f "$out/supernode-$i.key" "$out/supernode-$i.key.pub"
  ssh-keygen -q -t ecdsa -b 384 -N "" -C "stamen-supernode-$i" -f "$out/supernode-$i.key"
  i=$((i + 1))
done
echo "wrote $out: ca.crt, server.pem/server.key (SANs: $sans), supernode-0..$((n - 1)).key(.pub)"
