#!/usr/bin/env bash
# Build the wheels launch/gpu/check.sh installs on a GPU machine that has no network.
#
#   bash launch/gpu/build_wheels.sh                               # for this machine's Python
#   PYTHON_VERSIONS="3.10 3.11 3.12" bash launch/gpu/build_wheels.sh   # binary wheels for these too
#
# Writes into build/gpu-wheels/ (git-ignored; WHEEL_DIR to change), then prints its size: carry
# that folder to the GPU machine (the device runner carries at most 64 MiB in all).
#
# What is carried: DeepSpeed (built here from its sdist, which is all PyPI has) and the packages
# it needs besides torch and numpy; pytest; matplotlib (run_clm.py's loss curve). A GPU image
# with torch, transformers and accelerate often lacks exactly these. Versions are the ones this
# environment runs its tests with, so the GPU check runs what the CPU tests ran. torch,
# transformers and accelerate are never carried: the GPU machine's own CUDA builds are used.
set -euo pipefail
cd "$(dirname "$0")/../.."
out="${WHEEL_DIR:-build/gpu-wheels}"
mkdir -p "$out"

# Distribution names; check.sh reads the same list from the manifest written below.
packages=(
    deepspeed hjson msgpack ninja packaging psutil py-cpuinfo pydantic pydantic-core annotated-types
    typing-extensions typing-inspection tqdm einops
    pytest iniconfig pluggy pygments
    matplotlib contourpy cycler fonttools kiwisolver pillow pyparsing python-dateutil six
)

pinned=()
for name in "${packages[@]}"; do
    version=$(python -c "import importlib.metadata as m, sys
try: print(m.version(sys.argv[1]))
except m.PackageNotFoundError: pass" "$name")
    pinned+=("${name}${version:+==$version}")
done

# DeepSpeed: a py3-none-any wheel from the sdist. Without build isolation it is built against the
# torch installed here; its ops are compiled just in time on the machine that runs them.
if ! ls "$out"/deepspeed-*.whl >/dev/null 2>&1; then
    DS_BUILD_OPS=0 python -m pip wheel --no-deps --no-build-isolation --wheel-dir "$out" "${pinned[0]}"
fi
python -m pip download --no-deps --only-binary=:all: --dest "$out" "${pinned[@]:1}"

# Binary wheels for other Pythons (pure-Python wheels serve them all and are already there).
for version in ${PYTHON_VERSIONS:-}; do
    abi="cp${version/./}"
    if ! python -m pip download --no-deps --only-binary=:all: --dest "$out" --python-version "$version" \
        --implementation cp --abi "$abi" --abi abi3 --abi none \
        --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
        "${pinned[@]:1}"; then
        echo "build_wheels.sh: some wheels are not published for Python $version at these versions" >&2
    fi
done

printf '%s\n' "${pinned[@]}" >"$out/MANIFEST.txt"
echo "$(find "$out" -name '*.whl' | wc -l) wheels in $out: $(du -sh "$out" | cut -f1) (carry limit 64 MiB)"
