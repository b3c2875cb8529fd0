#!/usr/bin/env bash
# Fill docker/wheels/ with the wheels of fedlayer's dependencies, using this machine's pip configuration
# (local wheel caches, mirrors). Then `docker build --build-arg PIP_ARGS=--no-index ...` needs no index.
#   docker/wheelhouse.sh [PYTHON]     (default: .venv/bin/python, else python3.11)
set -euo pipefail
cd "$(dirname "$0")/.."
py="${1:-$( [ -x .venv/bin/python ] && echo .venv/bin/python || command -v python3.11 )}"
reqs="$(mktemp)"
trap 'rm -f "$reqs"' EXIT
"$py" - > "$reqs" <<'PY'
import tomllib
project = tomllib.load(open("pyproject.toml", "rb"))
print("\n".join([*project["build-system"]["requires"], *project["project"]["dependencies"], "wheel"]))
PY
# The wheels match this machine (CPython 3.11, linux x86_64), the same platform as the image.
# FEDLAYER_WHEEL_CACHE (e.g. on CI) keeps them outside the checkout; they are hard-linked in from there.
dest="${FEDLAYER_WHEEL_CACHE:-docker/wheels}"
mkdir -p "$dest"
"$py" -m pip download --dest "$dest" -r "$reqs"
if [ "$dest" != docker/wheels ]; then
  cp -al "$dest"/. docker/wheels/ 2>/dev/null || cp -a "$dest"/. docker/wheels/
fi
du -sh docker/wheels
