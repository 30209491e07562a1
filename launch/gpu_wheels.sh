#!/usr/bin/env bash
# Makes .whl/: the wheels the GPU box (Python 3.12, torch 2.11, no internet) lacks, for launch/gpu_check.py.
#
#   launch/gpu_wheels.sh            # on the CPU VM, in the checkout; then one device `run` with carry: [".whl"]
#
# The box's image has torch, triton, accelerate, psutil, numpy, pyyaml, msgpack, ninja, py-cpuinfo, einops, tqdm,
# packaging, typing_extensions and pytest (device/KINDS.md) but not deepspeed, zarr, numcodecs, webdataset, tomli_w
# nor their own needs below. Versions: ci/constraints.txt (those it does not pin: the CI venv's). deepspeed has no
# usable wheel on PyPI (`pip download deepspeed` silently picks the 2020 deepspeed-0.3.1.dev5): build it from the
# sdist, pure Python (shared/reference/env-notes.md section 8). .whl/ is git-ignored and travels only as a carry;
# the whole working tree that travels must stay under 64 MiB, so this refuses a .whl/ over 40 MiB.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
pin() {  # the version of $1 in ci/constraints.txt (names compared with - and _ alike), else the CI venv's
    local name=$1 v
    v=$(grep -iE "^${name//[-_]/[-_]}==" ci/constraints.txt | head -1 | cut -d= -f3 || true)
    [ -n "$v" ] || v=$("$PY" -c "import importlib.metadata as m, sys; print(m.version(sys.argv[1]))" "$name")
    echo "$v"
}
# deepspeed's needs the image lacks: hjson, pydantic (+ pydantic_core, annotated_types, typing_inspection);
# webdataset's: braceexpand; zarr's: numcodecs, donfig, google_crc32c; offloadfr's config writer: tomli_w; the
# loader's JPEG decoder: simplejpeg (without it the loader falls back to PIL, at 3x the CPU per image).
PKGS=(hjson pydantic pydantic_core annotated_types typing_inspection webdataset braceexpand zarr numcodecs donfig
      google_crc32c tomli_w simplejpeg)
rm -rf .whl
mkdir -p .whl
"$PY" -m pip wheel -q --no-deps "deepspeed==$(pin deepspeed)" -w .whl
specs=()
for p in "${PKGS[@]}"; do specs+=("$p==$(pin "$p")"); done
"$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
    -d .whl "${specs[@]}"
n=$(ls .whl/*.whl | wc -l)
want=$(( ${#PKGS[@]} + 1 ))
[ "$n" -eq "$want" ] || { echo "gpu_wheels: $n wheels in .whl/, expected $want (one per package)" >&2; exit 1; }
if ls .whl | grep -q '^deepspeed-0\.3\.'; then echo "gpu_wheels: the 2020 deepspeed wheel got in" >&2; exit 1; fi
bytes=$(du -cb .whl/*.whl | tail -1 | cut -f1)
[ "$bytes" -lt $((40 << 20)) ] || { echo "gpu_wheels: .whl/ is $bytes bytes, over 40 MiB" >&2; exit 1; }
# The box gets the working tree without .git: record what it came from (gpu_check.py writes it into steps.jsonl).
{ git describe --always --dirty 2>/dev/null || echo unknown; } > .whl/SOURCE.txt
# An offline install as the box does it, where a Python 3.12 is at hand (no torch there, so no deepspeed import).
PY312=""
for cand in "$HOME"/.pyenv/versions/3.12*/bin/python3.12 "$(command -v python3.12 || true)"; do
    if [ -x "$cand" ] && "$cand" -c '' 2>/dev/null; then PY312=$cand; break; fi
done
if [ -n "$PY312" ]; then
    site=$(mktemp -d)
    # what the image has and these wheels need, at the image's versions (device/KINDS.md), beside them, not in .whl/
    "$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
        --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
        -d "$site/image" numpy==2.5.2 pyyaml==6.0.3 typing_extensions==4.16.0 packaging==26.3
    "$PY312" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$site" \
        .whl/*.whl "$site"/image/*.whl
    PYTHONPATH=$site "$PY312" -c 'import zarr, numcodecs, webdataset, pydantic, hjson, tomli_w, donfig, google_crc32c, simplejpeg
import importlib.metadata as m; print("offline install on", __import__("sys").version.split()[0], "ok: deepspeed",
      m.version("deepspeed"), "zarr", zarr.__version__)' || { rm -rf "$site"; exit 1; }
    rm -rf "$site"
fi
ls -l .whl
echo "gpu_wheels: $n wheels, $((bytes / 1024)) KiB, source $(cat .whl/SOURCE.txt)"
