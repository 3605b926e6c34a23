#!/usr/bin/env bash
# The HTTP server's wheels for a device machine that has no package index (run here, where pip reaches PyPI).
#   bash scripts/fetch_device_wheels.sh            # -> .whl/server/*.whl and .whl/server/requirements.txt
# The device image has jax, httpx, prometheus_client, jinja2 and tokenizers but not FastAPI/uvicorn and their
# dependencies. The versions are the ones the CPU suite runs with (.venv); pydantic_core is the one binary wheel
# (CPython, manylinux x86_64), fetched for each of PY_VERSIONS so pip on the device picks its own.
# .whl/ is ignored by git (.git/info/exclude): carry it to the device (the device tool's carry [".whl/server"]),
# where `scripts/device_run.sh bench-server` installs it with
#   python3 -m pip install --no-deps --no-index --find-links .whl/server --target /tmp/server-wheels \
#       -r .whl/server/requirements.txt
set -euo pipefail
cd "$(dirname "$0")/.."
DEST=.whl/server
PIP=${PIP:-.venv/bin/pip}
PY_VERSIONS=${PY_VERSIONS:-"3.10 3.11 3.12 3.13"}
PURE=(fastapi==0.165.0 starlette==1.10.0 pydantic==2.14.4 uvicorn==0.54.0 h11==0.16.0 annotated-types==0.8.0
      annotated-doc==0.0.7 typing-inspection==0.4.5 click==8.5.1 typing_extensions==4.16.0
      opentelemetry-api==1.45.2 anyio==4.16.0 sniffio==1.3.1 idna==3.20)
BINARY=(pydantic_core==2.50.5)
PLATFORMS=(--platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64)

if ! git check-ignore -q "$DEST/x"; then  # never commit wheels
  echo ".whl" >> "$(git rev-parse --git-path info/exclude)"
fi
mkdir -p "$DEST"
"$PIP" download -q --no-deps --only-binary=:all: --python-version 3.12 "${PLATFORMS[@]}" -d "$DEST" "${PURE[@]}"
for v in $PY_VERSIONS; do
  "$PIP" download -q --no-deps --only-binary=:all: --python-version "$v" "${PLATFORMS[@]}" -d "$DEST" "${BINARY[@]}"
done
printf '%s\n' "${PURE[@]}" "${BINARY[@]}" > "$DEST/requirements.txt"
# the pins must be what the CPU suite runs: warn where .venv differs
if [ -x .venv/bin/python ]; then
  .venv/bin/python - "${PURE[@]}" "${BINARY[@]}" <<'PY'
import sys
from importlib.metadata import PackageNotFoundError, version

for pin in sys.argv[1:]:
    name, want = pin.split("==")
    try:
        have = version(name)
    except PackageNotFoundError:
        have = None
    if have != want:
        print(f"warning: {name} is {have} in .venv, pinned {want} here", file=sys.stderr)
PY
fi
ls "$DEST"
du -sh "$DEST"
