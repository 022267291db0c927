#!/usr/bin/env bash
# GPU check of facemtl: the CUDA, bf16, channels_last, GPU-augmentation and NCCL paths and pipeline.train with
# use_gpu=true, in one run of about 5-8 minutes on a bare GPU machine that has only this working tree.
#
#   bench/gpu_check.sh                    # every step on the GPU(s); the table also goes to $OUT/gpu_check.md
#   bench/gpu_check.sh --cpu --tiny       # every step that can run without a GPU, tiny inputs (tests/test_gpu_check.py)
#   bench/gpu_check.sh --steps 1,2 ...    # more options: bench/gpu_check.sh --help
#
# pipeline.data imports webdataset and simplejpeg, which GPU images lack. Fill .whl/ in the repository root once,
# where pip reaches PyPI (webdataset's other needs, numpy and pyyaml, are on such images; simplejpeg's wheel is for
# the GPU image's Python, 3.12 here, and x86_64):
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 -d .whl \
#       webdataset==1.0.2 braceexpand==0.1.7 simplejpeg==1.9.0
# and keep it out of git (echo /.whl/ >> .git/info/exclude). This script installs .whl/*.whl into /tmp/site.
# Ray (about 70 MB) does not travel that way: without it step 5 runs under torchrun and step 6 uses
# pipeline.train --local, and the table says so.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-$(if [ -x .venv/bin/python ]; then echo .venv/bin/python; else echo python3; fi)}
if compgen -G ".whl/*.whl" >/dev/null; then
    echo "installing $(ls .whl/*.whl | wc -l) wheel(s) from .whl/ into /tmp/site"
    "$PYTHON" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
    export PYTHONPATH="/tmp/site${PYTHONPATH:+:$PYTHONPATH}"
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
exec "$PYTHON" bench/gpu_check.py "$@"
