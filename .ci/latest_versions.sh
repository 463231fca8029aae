#!/usr/bin/env bash
# The test suite against the newest release of every dependency: what a user gets who installs
# without requirements-lock.txt. A scratch virtual environment takes torch==2.13.0 first (the build
# `pip install torch==2.13.0` gives on this machine: the CPU build in CI; requirements.txt caps
# torch at 2.13.0, so torch itself stays there), then requirements.txt and requirements-extra.txt
# with no lock, so pip takes the newest release of everything else. Writes docs/latest_versions.md
# (date, every version beside the lock's, pass/fail with the failing tests) and exits with
# pytest's status.
#   bash .ci/latest_versions.sh      # the install (a few minutes), then the whole test suite
# A break it finds: fix it in the code, or bound the package in requirements*.txt with a line in
# README.md ("Development"), then regenerate the lock (bash .ci/lock.sh).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
scratch=$(mktemp -d)
trap 'rm -rf "$scratch"' EXIT

$PY -m venv "$scratch/venv"
. "$scratch/venv/bin/activate"
python -m pip install -q --upgrade pip
python -m pip install -q torch==2.13.0
python -m pip install -q -r requirements.txt -r requirements-extra.txt
python -c "import lm_eval, accelerate, wandb"   # the extras' tests must run, not skip

status=0
python -m pytest -q tests -p no:cacheprovider --junitxml="$scratch/junit.xml" || status=$?

python - "$scratch/junit.xml" "$status" <<'EOF' > docs/latest_versions.md
import datetime, importlib.metadata, platform, re, sys
import xml.etree.ElementTree as ET

def norm(name):
    return re.sub(r"[-_.]+", "-", name).lower()

junit, status = sys.argv[1], int(sys.argv[2])
suite = ET.parse(junit).getroot()
suite = suite if suite.tag == "testsuite" else suite.find("testsuite")
counts = {k: int(suite.get(k, 0)) for k in ("tests", "failures", "errors", "skipped")}
passed = counts["tests"] - counts["failures"] - counts["errors"] - counts["skipped"]
broken = []
for case in suite.iter("testcase"):
    for outcome in ("failure", "error"):
        found = case.find(outcome)
        if found is not None:
            message = " ".join((found.get("message") or "").split())[:200]
            test = case.get("classname", "").replace(".", "/") + ".py::" + case.get("name")
            broken.append(f"- `{test}` ({outcome}): {message}")
lock = dict(line.split("==") for line in open("requirements-lock.txt").read().splitlines()
            if line and not line.startswith("#"))
installed = sorted({norm(d.name): d.version for d in importlib.metadata.distributions()}.items())
torch = importlib.metadata.version("torch")
result = "passed" if status == 0 else f"FAILED (pytest exit status {status})"
print(f"""# The test suite against the newest versions

Written by `bash .ci/latest_versions.sh` (README, "Development"): every dependency of
requirements.txt and requirements-extra.txt at its newest release, no lock, torch at {torch}
(requirements.txt caps torch at 2.13.0; this is the build `pip install torch==2.13.0` gives on the
machine that ran it). The lock CI tests is requirements-lock.txt.

- Date: {datetime.date.today()}
- Machine: Python {platform.python_version()} on {platform.system()} {platform.machine()}
- Result: **{result}**: {passed} passed, {counts['failures']} failed, {counts['errors']} errors, \
{counts['skipped']} skipped, in {float(suite.get('time', 0)):.0f} s""")
if broken:
    print("\nFailing tests:\n")
    print("\n".join(broken))
print("\n| package | newest (tested here) | requirements-lock.txt |\n|---|---|---|")
for name, version in installed:
    pinned = lock.get(name, "not pinned")
    mark = "" if pinned == version.split("+")[0] else " *"
    print(f"| {name} | {version}{mark} | {pinned} |")
print("\n`*`: not the lock's version.")
EOF
echo "wrote docs/latest_versions.md: $(grep -m1 'Result' docs/latest_versions.md)"
exit $status
