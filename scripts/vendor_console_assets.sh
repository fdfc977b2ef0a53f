#!/usr/bin/env bash
# Vendor the web console's chart library (twllm/console/static/vendor/) from the npm registry.
# The console is served offline: no CDN, no network at run time. This script is run by hand when
# the pinned version changes; its output is committed. It fetches the package with `npm pack`
# at the pinned version, checks the tarball's integrity against the registry's, copies the
# minified UMD build and its licence, and records their sha256 in vendor/SHA256SUMS.
set -euo pipefail
cd "$(dirname "$0")/.."

PACKAGE=chart.js
VERSION=4.5.0
FILES=(dist/chart.umd.min.js LICENSE.md)
DEST=twllm/console/static/vendor

command -v npm >/dev/null || { echo "vendor_console_assets: npm is needed" >&2; exit 1; }
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT

(cd "$work" && npm pack --silent "$PACKAGE@$VERSION" >/dev/null)
tarball="$work/$PACKAGE-$VERSION.tgz"
# npm pack checks the registry's integrity itself; record the tarball's sha512 as npm names it.
integrity=$(npm view --silent "$PACKAGE@$VERSION" dist.integrity)
got="sha512-$(openssl dgst -sha512 -binary "$tarball" | base64 -w0)"
[ "$integrity" = "$got" ] || { echo "vendor_console_assets: $tarball: integrity $got, registry says $integrity" >&2; exit 1; }
tar -xzf "$tarball" -C "$work"

mkdir -p "$DEST"
sums=()
for file in "${FILES[@]}"; do
  name=$(basename "$file")
  [ "$name" = LICENSE.md ] && name=chart.js.LICENSE.md
  cp "$work/package/$file" "$DEST/$name"
  sums+=("$(cd "$DEST" && sha256sum "$name")")
done
{
  echo "# $PACKAGE $VERSION from the npm registry ($integrity); written by scripts/vendor_console_assets.sh"
  printf '%s\n' "${sums[@]}"
} >"$DEST/SHA256SUMS"
cat "$DEST/SHA256SUMS"
