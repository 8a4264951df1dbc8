#!/usr/bin/env bash
# Build OpenSSL's shared libraries (libssl.so.3, libcrypto.so.3) of another 3.x release, to measure what the
# direct links' TLS gives on it on this same host: Python's ssl module loads whichever libssl.so.3 the dynamic
# loader finds first, and 3.x keeps one ABI, so
#     LD_LIBRARY_PATH="$(bench/openssl_lib.sh)" .venv/bin/python bench/peers.py ...
# runs every process the bench starts on it (hivemesh's links are the only TLS in bench/peers.py's systems:
# AutoGen's runtime and the A2A agent run plaintext on loopback). `hivemesh --version` and the reports'
# machine line name the library a run had. For measurements only: an OpenSSL built here gets no security updates.
#
# The source is Debian 13's (the release the container image is built on), checked against the SHA-256 its
# archive lists. Prints the folder holding the libraries; builds it once (~4 minutes on 2 cores), then reuses it.
set -euo pipefail
VERSION=3.5.7
SHA256=a8c0d28a529ca480f9f36cf5792e2cd21984552a3c8e4aa11a24aa31aeac98e8
URL="http://deb.debian.org/debian/pool/main/o/openssl/openssl_${VERSION}.orig.tar.gz"
DEST="${HIVEMESH_BENCH_CACHE:-$HOME/.cache/hivemesh-bench}/openssl-$VERSION"

if [ -f "$DEST/libssl.so.3" ] && [ -f "$DEST/libcrypto.so.3" ]; then
  echo "$DEST"
  exit 0
fi
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
echo "» fetching OpenSSL $VERSION (Debian's source)" >&2
curl -fsS --max-time 300 -o "$work/src.tar.gz" "$URL"
echo "$SHA256  $work/src.tar.gz" | sha256sum --check --status || { echo "checksum mismatch: $URL" >&2; exit 1; }
mkdir "$work/src"
tar -xzf "$work/src.tar.gz" -C "$work/src" --strip-components=1
echo "» building libssl and libcrypto (a few minutes)" >&2
if ! (cd "$work/src" && ./config shared no-tests no-docs --prefix="$DEST" --libdir=lib \
      && make -j"$(nproc)" build_libs) > "$work/build.log" 2>&1; then
  tail -n 30 "$work/build.log" >&2
  echo "building OpenSSL $VERSION failed (the log's end above)" >&2
  exit 1
fi
mkdir -p "$DEST"
cp -P "$work/src"/libssl.so* "$work/src"/libcrypto.so* "$DEST"/
echo "$DEST"
