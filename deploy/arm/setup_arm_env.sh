#!/usr/bin/env bash
# Set up the emulated aarch64 Python that `edgekd arm-check` uses, and print how to run things with it.
#
#   deploy/arm/setup_arm_env.sh [--cpu cortex-a72]
#
# Same code as `edgekd arm-check` (edgekd.armcheck.ensure_emulator): qemu-aarch64-static (the system's, or
# unpacked from Debian's qemu-user-static), a Debian bookworm arm64 sysroot with Python 3.11, and aarch64
# wheels of numpy and onnxruntime (pinned to 1.26.0: 1.28+ crash at import under qemu 7.2), all in
# $EDGEKD_ARM_CACHE (default ~/.cache/edgekd/arm64). No root: apt-get runs with private package lists and
# never touches the host's apt/dpkg state. Needs a Debian-based x86-64 host, apt-get, dpkg-deb, pip, and
# the Debian archive + PyPI reachable. Exit 3 when that is not the case.
set -euo pipefail
repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
export PYTHONPATH="$repo${PYTHONPATH:+:$PYTHONPATH}"  # works from a checkout without `pip install edgekd`
exec "${PYTHON:-python3}" - "$@" <<'PY'
import json, shlex, sys
from edgekd.armcheck import ArmUnavailable, default_cache_dir, ensure_emulator

cpu = sys.argv[sys.argv.index("--cpu") + 1] if "--cpu" in sys.argv else None
try:
    env = ensure_emulator(cpu=cpu)
except ArmUnavailable as exc:
    sys.exit(print(f"error: {exc}", file=sys.stderr) or 3)
print(json.dumps({"cache": str(default_cache_dir()), **env.versions}, indent=2))
variables = " ".join(f"{k}={shlex.quote(v)}" for k, v in env.env().items() if k.startswith("PYTHON"))
command = " ".join(shlex.quote(part) for part in env.command())
print(f"""
Run any script on the emulated aarch64 Python (host paths are visible as they are):
  env {variables} \\
    {command} SCRIPT.py ARGS...
For example, the bundle's own runner (--no-memory: qemu-user cannot start the aarch64 child process it uses):
  cd runs/<name>/deploy && env {variables} {command} run_on_device.py --threads 1 --iterations 5 --no-memory
Or the whole check (writes runs/<name>/arm_check.json):
  edgekd arm-check runs/<name>""")
PY
