#!/usr/bin/env bash
# Makes a fleet's certificates: one certificate authority, and for each
# host named a key and a certificate it presents both as a server and as a
# client (mutual TLS between every pair of hosts). A host's name is its
# certificate's DNS name, which its peers check when they connect to it;
# NAME=IP[,IP...] adds addresses for peers that reach it by address (an
# etcd endpoint given as IP:PORT).
#   scripts/fleet-certs.sh DIR NAME[=IP,...]...
# DIR keeps ca.pem and ca.key; running it again with new names adds hosts
# under the same authority. Copy ca.pem, NAME.pem and NAME.key (only
# those) to the host NAME.
set -euo pipefail
[[ $# -ge 2 ]] || { echo "usage: $0 DIR NAME[=IP,...]..." >&2; exit 2; }
dir=$1
shift
mkdir -p "$dir"
umask 077
curve=(-newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes)
if [[ ! -f "$dir/ca.key" ]]; then
    echo "fleet-certs: a new certificate authority in $dir" >&2
    openssl req -x509 -new "${curve[@]}" -keyout "$dir/ca.key" -out "$dir/ca.pem" \
        -days 3650 -subj "/CN=lambda-microvm fleet CA" \
        -addext "basicConstraints=critical,CA:TRUE" \
        -addext "keyUsage=critical,keyCertSign,cRLSign" 2>/dev/null
fi
for host in "$@"; do
    name=${host%%=*}
    san="DNS:$name"
    if [[ $host == *=* ]]; then
        IFS=, read -ra ips <<<"${host#*=}"
        for ip in "${ips[@]}"; do
            [[ $ip =~ ^[0-9.]+$|^[0-9a-fA-F:]+$ ]] || {
                echo "fleet-certs: $ip is not an IP address" >&2
                exit 2
            }
            san+=",IP:$ip"
        done
    fi
    [[ $name =~ ^[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?(\.[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?)*$ ]] || {
        echo "fleet-certs: $name is not a DNS name (lower-case letters, digits, '-' and '.')" >&2
        exit 2
    }
    openssl req -new "${curve[@]}" -keyout "$dir/$name.key" -out "$dir/$name.csr" \
        -subj "/CN=$name" 2>/dev/null
    openssl x509 -req -in "$dir/$name.csr" -CA "$dir/ca.pem" -CAkey "$dir/ca.key" \
        -set_serial "0x$(openssl rand -hex 16)" -days 825 -out "$dir/$name.pem" \
        -extfile <(printf '%s\n' "basicConstraints=critical,CA:FALSE" \
            "keyUsage=critical,digitalSignature" \
            "extendedKeyUsage=serverAuth,clientAuth" \
            "subjectAltName=$san") 2>/dev/null
    rm -f "$dir/$name.csr"
    echo "fleet-certs: $dir/$name.pem and $dir/$name.key" >&2
done
