#!/usr/bin/env bash
# Regenerates the pictures of the docs from their sources:
#   docs/architecture.svg -> docs/architecture.png (README and docs/architecture.md)
# Needs rsvg-convert (Debian: librsvg2-bin, installed here when missing and
# running as root) and the DejaVu fonts (fonts-dejavu-core).
#   scripts/render-docs.sh
set -euo pipefail
cd "$(dirname "$0")/.."
if ! command -v rsvg-convert >/dev/null; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    apt-get update -qq && apt-get install -y -qq librsvg2-bin fonts-dejavu-core >/dev/null
  else
    echo "render-docs: rsvg-convert is missing (apt-get install librsvg2-bin)" >&2
    exit 1
  fi
fi
for svg in docs/architecture.svg; do
  png="${svg%.svg}.png"
  rsvg-convert --format png --background-color white -o "$png" "$svg"
  echo "$svg -> $png"
done
