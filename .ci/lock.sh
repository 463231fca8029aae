#!/usr/bin/env bash
# Regenerates requirements-lock.txt: the exact version of every package that requirements.txt and
# requirements-extra.txt install, direct and transitive, as pip resolves them today from PyPI for
# CPython 3.11 on Linux x86-64 (what CI runs). Then run `bash .ci/run`, which installs from the
# new lock and runs the tests, and commit the lock only if they pass.
#   bash .ci/lock.sh          # ~2 minutes; needs only pip (run it with CPython 3.11, Linux x86-64)
#
# pip resolves without installing (--dry-run --report) and without any local pip configuration,
# index or find-links, so every pin is a release on PyPI. torch==2.13.0 resolves to PyPI's Linux
# build, the CUDA one: the lock gets the triton and the nvidia-*/cuda-* libraries that build
# requires (pinned by torch itself), so a GPU machine installs from the same lock; CI's CPU build
# needs none of the nvidia-*/cuda-* lines and installs none of them.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}

$PY - <<'EOF'
import platform, sys
if sys.version_info[:2] != (3, 11) or platform.system() != "Linux" or platform.machine() != "x86_64":
    print(f"error: the lock is resolved for CPython 3.11 on Linux x86-64, this is Python "
          f"{platform.python_version()} on {platform.system()} {platform.machine()}; run it "
          f"there, or name a Python 3.11: PYTHON=python3.11 bash .ci/lock.sh", file=sys.stderr)
    sys.exit(2)
EOF

report=$(mktemp --suffix=.json)
trap 'rm -f "$report" "$report.txt"' EXIT
env -u PIP_FIND_LINKS -u PIP_INDEX_URL -u PIP_EXTRA_INDEX_URL -u PIP_NO_INDEX -u PIP_CONSTRAINT \
    PIP_CONFIG_FILE=/dev/null \
    $PY -m pip install --dry-run --ignore-installed --quiet --report "$report" \
    --index-url https://pypi.org/simple torch==2.13.0 -r requirements.txt -r requirements-extra.txt

$PY - "$report" <<'EOF' > "$report.txt"
import datetime, json, re, sys
report = json.load(open(sys.argv[1]))
pins = sorted((re.sub(r"[-_.]+", "-", item["metadata"]["name"]).lower(),
               item["metadata"]["version"]) for item in report["install"])
print(f"""\
# The exact versions CI tests: every package requirements.txt and requirements-extra.txt install,
# direct and transitive, for CPython 3.11 on Linux x86-64. Written by `bash .ci/lock.sh` on
# {datetime.date.today()} (pip {report["pip_version"]}, PyPI); do not edit by hand.
# Use: pip install -c requirements-lock.txt torch==2.13.0 -r requirements.txt (README, Quickstart)
# torch==2.13.0 is met by any build of that release: the CPU build (2.13.0+cpu, what CI tests) or
# the CUDA build PyPI serves on Linux, whose libraries (nvidia-*, cuda-*) and triton are the ones
# that build requires; CI installs none of the nvidia-*/cuda-* lines.""")
for name, version in pins:
    print(f"{name}=={version}")
EOF
mv "$report.txt" requirements-lock.txt
echo "wrote requirements-lock.txt: $(grep -c '^[^#]' requirements-lock.txt) packages"
