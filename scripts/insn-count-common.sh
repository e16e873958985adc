# Shared by scripts/insn-count.sh and scripts/insn-count-prefill.sh (sourced,
# not run): builds the qemu counting plugin of ../shared/tools/qemu-insn-count
# and the aarch64 release `bramble`, and counts guest instructions of one
# single-threaded `bramble bench` run. Expects to be sourced from the
# repository root. BRAMBLE=path counts that aarch64 `bramble` instead of
# building one (a build of another commit, for a before/after comparison).

plugin=$(bash ../shared/tools/qemu-insn-count/build.sh)
if [ -n "${BRAMBLE:-}" ]; then
    bramble=$BRAMBLE
else
    cargo build --quiet --release --target aarch64-unknown-linux-gnu -p bramble-tools
    bramble=${CARGO_TARGET_DIR:-target}/aarch64-unknown-linux-gnu/release/bramble
fi

# count CPU IMAGE BENCH_OPTIONS... → guest instructions of the whole run
# (BENCH_ARGS adds options, e.g. BENCH_ARGS="--feedback off" or "--kv q4").
count() {
    local cpu=$1 image=$2
    shift 2
    # shellcheck disable=SC2086 # BENCH_ARGS is a list of options.
    QEMU_CPU=$cpu qemu-aarch64 -L /usr/aarch64-linux-gnu -plugin "$plugin" \
        "$bramble" bench --model "$image" --threads 1 --json "$@" ${BENCH_ARGS:-} 2>&1 >/dev/null |
        sed -n 's/^guest-instructions: //p'
}

# kernels CPU IMAGE → the kernel table `bramble` picks on that core.
kernels() {
    QEMU_CPU=$1 qemu-aarch64 -L /usr/aarch64-linux-gnu "$bramble" bench --model "$2" --prompt-tokens 2 \
        --gen-tokens 1 --threads 1 --json | python3 -c 'import json, sys; print(json.load(sys.stdin)["kernels"])'
}

# report IMAGE CPU SHORT LONG DIVISOR WHAT → one line, M instructions per WHAT.
report() {
    awk -v cpu="$2" -v k="$(kernels "$2" "$1")" -v a="$3" -v b="$4" -v n="$5" -v what="$6" \
        -v img="$(basename "$1")" -v extra="${BENCH_ARGS:+ [$BENCH_ARGS]}" \
        'BEGIN { printf "%s%s %s (%s kernels): %.2f M guest instructions per %s\n", img, extra, cpu, k, (b - a) / n / 1e6, what }'
}
