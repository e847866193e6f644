#!/usr/bin/env bash
# Copy MathJax 3 (tex-chtml, its CHTML fonts and the TeX extensions its autoloader can ask for)
# into book/_static/mathjax so that formulas render without network. Run once when upgrading MathJax.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VERSION="${MATHJAX_VERSION:-3.2.2}"
DEST="$ROOT/book/_static/mathjax"
TMP="$(mktemp -d)"
trap 'rm -rf "$TMP"' EXIT

npm install --prefix "$TMP" --no-audit --no-fund --silent "mathjax@$VERSION"
SRC="$TMP/node_modules/mathjax/es5"

rm -rf "$DEST"
mkdir -p "$DEST/output/chtml/fonts" "$DEST/input/tex/extensions"
cp "$SRC/tex-chtml.js" "$DEST/"
cp -r "$SRC/output/chtml/fonts/woff-v2" "$DEST/output/chtml/fonts/"
# Macros such as \boldsymbol or \cancel load these on first use.
for ext in action amscd bbox boldsymbol braket bussproofs cancel color enclose extpfeil html mhchem unicode verb; do
  cp "$SRC/input/tex/extensions/$ext.js" "$DEST/input/tex/extensions/"
done
cp "$TMP/node_modules/mathjax/LICENSE" "$DEST/LICENSE"
echo "MathJax $VERSION (npm package mathjax, Apache-2.0), copied by scripts/vendor_mathjax.sh" > "$DEST/VERSION"
du -sh "$DEST"
