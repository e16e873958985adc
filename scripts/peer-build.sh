#!/usr/bin/env bash
# Builds the peer runtime Bramble's figures are compared with: llama.cpp as
# vendored by llama-cpp-python 0.3.36, for the x86-64 host (quantizing,
# perplexity) and for the two Raspberry Pi cores (instruction counts under
# qemu).
#
#   scripts/peer-build.sh [VARIANT...]     # VARIANT: x86-64 armv8-a armv8.2-a+dotprod
#
# Everything lives under ~/.cache/bramble/peer/ (PEER_DIR overrides):
#   llama_cpp_python-0.3.36.tar.gz         the sdist (pip download, or a copy
#                                          of /work/peer's if that exists)
#   llama_cpp_python-0.3.36/               unpacked; llama.cpp is vendor/llama.cpp
#   build-x86-64/bin/                      AVX2 host build
#   build-armv8-a/bin/                     Pi 4 (cortex-a72): NEON, no dotprod
#   build-armv8.2-a+dotprod/bin/           Pi 5 (cortex-a76): NEON + sdot/udot
# Each build holds llama-quantize, llama-perplexity, llama-bench, llama-simple.
#
# Configuration, against what `cmake -B build` on a Pi would give:
#   GGML_NATIVE=OFF with an explicit -march (GGML_CPU_ARM_ARCH) instead of
#     -mcpu=native, so the build is the same on any host. A native Pi 5 build
#     would also get +fp16 (half-precision vector arithmetic) and +rcpc; the
#     dotprod build here has the integer dot products ggml's quantized
#     kernels use but keeps ggml's f32 paths for f16 data.
#   GGML_OPENMP=OFF (a Pi build has it ON when libgomp is present): ggml's own
#     thread pool instead; every figure here is single-threaded.
#   GGML_CPU_KLEIDIAI=OFF, GGML_CPU_REPACK=ON, GGML_LLAMAFILE=ON: the defaults,
#     stated explicitly.
#   BUILD_SHARED_LIBS=OFF, LLAMA_CURL=OFF, LLAMA_OPENSSL=OFF: static binaries
#     that never touch the network.
# The machine is shared: -j2 (PEER_JOBS overrides) and only the four targets.
# Needs cmake, gcc/g++, and for the Pi builds the Debian packages
# gcc-aarch64-linux-gnu, g++-aarch64-linux-gnu and qemu-user.
set -euo pipefail

version=0.3.36
peer=${PEER_DIR:-$HOME/.cache/bramble/peer}
jobs=${PEER_JOBS:-2}
variants=("$@")
[ ${#variants[@]} -gt 0 ] || variants=(x86-64 armv8-a armv8.2-a+dotprod)
targets=(llama-quantize llama-perplexity llama-bench llama-simple)
mkdir -p "$peer"

tarball=$peer/llama_cpp_python-$version.tar.gz
if [ ! -f "$tarball" ]; then
    if [ -f /work/peer/llama_cpp_python-$version.tar.gz ]; then
        cp /work/peer/llama_cpp_python-$version.tar.gz "$tarball"
    else
        pip download --no-deps --no-binary llama-cpp-python --dest "$peer" \
            "llama-cpp-python==$version"
    fi
fi
src=$peer/llama_cpp_python-$version/vendor/llama.cpp
if [ ! -f "$src/CMakeLists.txt" ]; then
    tar -xzf "$tarball" -C "$peer"
fi

common=(
    -DCMAKE_BUILD_TYPE=Release
    -DBUILD_SHARED_LIBS=OFF
    -DGGML_NATIVE=OFF
    -DGGML_OPENMP=OFF
    -DGGML_CPU_KLEIDIAI=OFF
    -DGGML_CPU_REPACK=ON
    -DGGML_LLAMAFILE=ON
    -DGGML_CCACHE=OFF
    -DLLAMA_CURL=OFF
    -DLLAMA_OPENSSL=OFF
    -DLLAMA_BUILD_TESTS=OFF
    -DLLAMA_BUILD_SERVER=OFF
)

for variant in "${variants[@]}"; do
    build=$peer/build-$variant
    case $variant in
    x86-64)
        # The AVX2 generation (ggml's x86 options; AVX-512 off).
        flags=(-DGGML_AVX=ON -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON -DGGML_BMI2=ON
            -DGGML_AVX512=OFF)
        ;;
    armv8-a | armv8.2-a+dotprod)
        for compiler in aarch64-linux-gnu-gcc aarch64-linux-gnu-g++; do
            command -v "$compiler" >/dev/null || {
                echo "peer-build: $compiler not found (Debian: apt-get install gcc-aarch64-linux-gnu g++-aarch64-linux-gnu)" >&2
                exit 1
            }
        done
        # Cross build; ggml picks its ARM sources from CMAKE_SYSTEM_PROCESSOR
        # and passes -march=GGML_CPU_ARM_ARCH to the CPU backend.
        flags=(
            -DCMAKE_SYSTEM_NAME=Linux
            -DCMAKE_SYSTEM_PROCESSOR=aarch64
            -DCMAKE_C_COMPILER=aarch64-linux-gnu-gcc
            -DCMAKE_CXX_COMPILER=aarch64-linux-gnu-g++
            -DCMAKE_FIND_ROOT_PATH=/usr/aarch64-linux-gnu
            -DCMAKE_FIND_ROOT_PATH_MODE_PROGRAM=NEVER
            -DCMAKE_FIND_ROOT_PATH_MODE_LIBRARY=ONLY
            -DCMAKE_FIND_ROOT_PATH_MODE_INCLUDE=ONLY
            -DCMAKE_FIND_ROOT_PATH_MODE_PACKAGE=ONLY
            "-DGGML_CPU_ARM_ARCH=$variant"
        )
        ;;
    *)
        echo "peer-build: unknown variant $variant (x86-64, armv8-a, armv8.2-a+dotprod)" >&2
        exit 1
        ;;
    esac
    if ! cmake -S "$src" -B "$build" "${common[@]}" "${flags[@]}" >"$build.cmake.log" 2>&1; then
        tail -20 "$build.cmake.log" >&2
        exit 1
    fi
    if ! cmake --build "$build" --target "${targets[@]}" -j "$jobs" >"$build.build.log" 2>&1; then
        tail -20 "$build.build.log" >&2
        exit 1
    fi
    if [ "$variant" != x86-64 ]; then
        # The binaries must start on the emulated Pi cores.
        cpu=cortex-a72
        [ "$variant" = armv8-a ] || cpu=cortex-a76
        QEMU_CPU=$cpu qemu-aarch64 -L /usr/aarch64-linux-gnu "$build/bin/llama-bench" --help >/dev/null
    fi
    echo "$build/bin"
done
