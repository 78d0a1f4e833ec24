#!/usr/bin/env bash
# The whole VITAL pipeline on the embedded default (phantom data, tiny models, CPU): install, then demo/run.py.
# Re-running resumes: finished stages are skipped. Extra arguments go to demo/run.py (python3 demo/run.py -h).
set -euo pipefail
cd "$(dirname "$0")"
python3 -m pip install --quiet --disable-pip-version-check torch==2.13.0   # CPU build, before anything can pull a CUDA one
python3 -m pip install --quiet --disable-pip-version-check -r requirements.txt
python3 demo/run.py "$@"
