#!/usr/bin/env bash
# Gather into .whl/ (git-ignored) the wheels that `bench gpu` needs on the lent GPU machine and
# that its image lacks. Run it here, on a machine that reaches PyPI; the GPU machine reaches no
# registry, so the wheels travel with the working tree (carry [".whl"], 64 MiB at most in all)
# and launch/gpu_check.sh installs them into /tmp/site.
#
# Target: the GPU image's python3 (CPython 3.12, x86-64 manylinux). Its package list already has torch, numpy, scipy, pyyaml, safetensors, tqdm,
# matplotlib, accelerate, psutil, py-cpuinfo, ninja, msgpack, einops, nvidia-ml-py, packaging,
# pytest and pytest-timeout. Missing there, and needed by a part:
#   zarr (+ donfig, google-crc32c), numcodecs, crc32c  the store format (gpu tests on prepared stores)
#   nibabel                                          predict and demo-data read/write NIfTI
#   webdataset (+ braceexpand)                       the wds reader (tiny; the loader tests may use it)
#   deepspeed (+ hjson, pydantic, pydantic-core,     train_h: the H recipe's ZeRO-3 backend
#     annotated-types, typing-inspection)
#   typing-extensions                                pydantic needs a recent one; the image's may be older
# Left out on purpose, because no part imports them (so say so, not carry ~100 MB):
#   mlflow (tracking is off in every part and imported lazily), nnunetv2 (bench train's reference
#   step then uses our Dice+CE, the same math, and says so in its JSON), blosc2 (only bench prepare).
# stunet_scale itself needs no wheel: the repo travels as the working tree and gpu_check.sh puts
# it on PYTHONPATH.
#
# Versions are the ones this repo's .venv is tested with. deepspeed is published as an sdist only;
# it is built here into a py3-none-any wheel (pure Python, DS_BUILD_OPS=0: no op is compiled ahead;
# ZeRO-3 with torch's SGD needs none on CUDA).
#
# Usage: bash launch/gather_gpu_wheels.sh      (then on the device: bash launch/gpu_check.sh, carry [".whl"])
set -euo pipefail
cd "$(dirname "$0")/.."

DEST=.whl
LIMIT_MIB=64
PY=${PYTHON:-python3}
if [ -x .venv/bin/python ]; then PY=.venv/bin/python; fi  # has torch, which building deepspeed needs

BINARY=(  # wheels with compiled code or pure wheels, fetched for CPython 3.12 manylinux x86-64
  zarr==3.1.6 donfig==0.8.1.post1 google-crc32c==1.9.0 numcodecs==0.16.6 crc32c==2.9.post0
  nibabel==5.4.2 webdataset==1.0.2 braceexpand==0.1.7
  hjson==3.1.0 pydantic==2.14.4 pydantic-core==2.50.5 annotated-types==0.8.0 typing-inspection==0.4.5
  typing-extensions==4.16.0
)
SDIST_ONLY=(deepspeed==0.19.8)

rm -rf "$DEST"
mkdir -p "$DEST"
missing=()
for spec in "${BINARY[@]}"; do
  # pip matches each manylinux tag exactly, so list the ones wheels are commonly published under.
  if ! "$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
      --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_24_x86_64 \
      --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 --platform manylinux1_x86_64 \
      --platform manylinux_2_34_x86_64 --platform manylinux_2_35_x86_64 \
      -d "$DEST" "$spec"; then
    missing+=("$spec")
  fi
done
for spec in "${SDIST_ONLY[@]}"; do
  # A wheel if the index has one, else build one from the sdist with this Python's torch
  # (pip reuses its wheel cache when it built this sdist before).
  if ! "$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 -d "$DEST" "$spec" 2>/dev/null; then
    if ! DS_BUILD_OPS=0 "$PY" -m pip wheel -q --no-deps --no-build-isolation -w "$DEST" "$spec"; then
      missing+=("$spec")
    fi
  fi
done

# One version of each package, or the install on the device stops.
dups=$(find "$DEST" -maxdepth 1 -type f -name '*.whl' -printf '%f\n' | cut -d- -f1 | tr 'A-Z-' 'a-z_' | sort | uniq -d)
if [ -n "$dups" ]; then
  echo "error: more than one wheel of: $dups" >&2
  exit 1
fi

echo "wheels in $DEST:"
find "$DEST" -maxdepth 1 -type f -name '*.whl' -printf '%s %f\n' | sort -k2 | awk '{printf "  %8.1f KiB  %s\n", $1 / 1024, $2}'
total=$(du -cb "$DEST"/*.whl | tail -1 | cut -f1)
printf 'total: %.1f MiB (limit %d MiB)\n' "$(echo "$total / 1048576" | bc -l)" "$LIMIT_MIB"
if [ "$total" -gt $((LIMIT_MIB * 1048576)) ]; then
  echo "error: the wheels exceed ${LIMIT_MIB} MiB, more than one device call may carry" >&2
  exit 1
fi
if [ ${#missing[@]} -gt 0 ]; then
  echo "error: could not fetch: ${missing[*]}" >&2
  exit 1
fi
echo
echo "device command (run tool): bash launch/gpu_check.sh    with carry [\".whl\"]"
echo "  e.g. command: 'bash launch/gpu_check.sh --budget-s 480', timeout_s 600"
