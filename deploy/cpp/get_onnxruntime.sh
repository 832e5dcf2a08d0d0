#!/usr/bin/env bash
# Assemble an ONNX Runtime C/C++ package (include/ + lib/, the layout of the official
# onnxruntime-linux-<arch>-<version>.tgz) from package registries, for machines that cannot download the
# official release from GitHub:
#   headers          Debian's libonnxruntime-dev (trixie: 1.21.0; MIT, arch-independent C/C++ headers)
#   libonnxruntime   PyPI's onnxruntime wheel of the same minor version (its onnxruntime/capi/ ships the
#                    shared library with the same C API (version 21) as the release package)
# No root needed and the host's apt state is untouched (private apt lists in a temp dir).
#
#   deploy/cpp/get_onnxruntime.sh [DEST]     # default: ${EDGEKD_CACHE:-~/.cache/edgekd}/onnxruntime-1.21
#   export ONNXRUNTIME_ROOT=$(deploy/cpp/get_onnxruntime.sh)
#
# On Debian 13+ `apt-get install libonnxruntime-dev` gives a system copy instead (ONNXRUNTIME_ROOT=/usr).
set -euo pipefail

DEBIAN_SUITE="${EDGEKD_ORT_DEBIAN_SUITE:-trixie}"
HEADERS_VERSION="1.21.0"          # what libonnxruntime-dev in $DEBIAN_SUITE ships
WHEEL_VERSION="${EDGEKD_ORT_WHEEL_VERSION:-1.21.1}"   # same C API version as the headers
MIRROR="${EDGEKD_DEBIAN_MIRROR:-http://deb.debian.org/debian}"
KEYRING=/usr/share/keyrings/debian-archive-keyring.gpg
DEST="${1:-${EDGEKD_CACHE:-$HOME/.cache/edgekd}/onnxruntime-${WHEEL_VERSION%.*}}"
PYTHON="${PYTHON:-python3}"

if [[ -f "$DEST/.complete" ]]; then echo "$DEST"; exit 0; fi
for tool in apt-get dpkg-deb "$PYTHON"; do
  command -v "$tool" >/dev/null || { echo "error: $tool is needed" >&2; exit 3; }
done
[[ -f "$KEYRING" ]] || { echo "error: $KEYRING missing (apt-get install debian-archive-keyring)" >&2; exit 3; }

work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
apt="$work/apt"
mkdir -p "$apt/lists/partial" "$apt/cache/archives/partial" "$apt/etc/preferences.d" "$work/debs"
touch "$apt/status"
echo "deb [signed-by=$KEYRING] $MIRROR $DEBIAN_SUITE main" >"$apt/etc/sources.list"
opts=(-q -o "Dir::Etc::SourceList=$apt/etc/sources.list" -o "Dir::Etc::SourceParts=$apt/etc/none"
      -o "Dir::Etc::PreferencesParts=$apt/etc/preferences.d" -o "Dir::State::Lists=$apt/lists"
      -o "Dir::State::status=$apt/status" -o "Dir::Cache=$apt/cache" -o Debug::NoLocking=1
      -o APT::Sandbox::User=root)
apt-get "${opts[@]}" update >&2
(cd "$work/debs" && apt-get "${opts[@]}" download "libonnxruntime-dev=${HEADERS_VERSION}*" >&2)
dpkg-deb -x "$work"/debs/libonnxruntime-dev_*.deb "$work/x"

"$PYTHON" -m pip download -q --no-deps --only-binary=:all: -d "$work/wheel" "onnxruntime==$WHEEL_VERSION" >&2
mkdir -p "$work/root/include" "$work/root/lib"
cp -r "$work/x/usr/include/onnxruntime/." "$work/root/include/"
"$PYTHON" - "$work"/wheel/*.whl "$work/root/lib" <<'EOF'
import sys, zipfile
wheel, dest = sys.argv[1], sys.argv[2]
with zipfile.ZipFile(wheel) as z:
    (name,) = [n for n in z.namelist() if "/capi/libonnxruntime.so." in n]
    z.extract(name, dest + "/tmp")
    import os, shutil
    base = os.path.basename(name)
    shutil.move(f"{dest}/tmp/{name}", f"{dest}/{base}")
    shutil.rmtree(f"{dest}/tmp")
    os.symlink(base, f"{dest}/libonnxruntime.so.1")
    os.symlink("libonnxruntime.so.1", f"{dest}/libonnxruntime.so")
EOF
cat >"$work/root/VERSION_SOURCES" <<EOF
headers: Debian $DEBIAN_SUITE libonnxruntime-dev $HEADERS_VERSION
library: PyPI onnxruntime $WHEEL_VERSION (onnxruntime/capi/libonnxruntime.so.$WHEEL_VERSION)
EOF
touch "$work/root/.complete"
mkdir -p "$(dirname "$DEST")"
rm -rf "$DEST"
mv "$work/root" "$DEST"
echo "$DEST"
