//! `RunState::commit_memory`: a state's zeroed buffers are mapped lazily
//! until written; committing makes all of them resident at once, so
//! `brambled`'s memory check and `bench`'s peak RSS see the whole footprint
//! rather than what the positions so far have touched. Alone in its test
//! binary, so no other test's allocations move the resident-set figures.

use bramble_runtime::config::ModelConfig;
use bramble_runtime::kv::KvMode;
use bramble_runtime::RunState;
use bytemuck::Zeroable;

/// `VmRSS` of this process, bytes.
fn resident_bytes() -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap();
    let kib: u64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|rest| rest.trim().strip_suffix("kB"))
        .and_then(|n| n.trim().parse().ok())
        .expect("a VmRSS line");
    kib * 1024
}

#[test]
fn a_committed_state_is_resident_and_an_uncommitted_one_is_not() {
    let mut config = ModelConfig::zeroed();
    (config.n_layers, config.n_heads, config.n_kv_heads, config.head_dim, config.dim) = (4, 4, 2, 64, 256);
    (config.ffn_dim, config.vocab_size, config.rope_dim, config.rope_theta) = (512, 256, 64, 10000.0);
    // The quantized cache first: its smaller buffers could otherwise reuse heap pages the f32 one touched.
    for kv in [KvMode::Q4, KvMode::F32] {
        let before = resident_bytes();
        let mut state = RunState::with_kv(&config, 32768, 1, kv);
        let kv_bytes = state.kv_bytes() as u64;
        assert!(kv_bytes > 16 << 20, "{kv}: a cache worth measuring: {kv_bytes}");
        let allocated = resident_bytes().saturating_sub(before);
        // The RoPE tables (cos and sin, context × rope_dim / 2 each) are written when made; the cache is not.
        let rope_bytes = 2 * 32768 * 32 * 4;
        assert!(
            allocated < rope_bytes + kv_bytes / 4,
            "{kv}: {allocated} resident of a {kv_bytes}-byte cache (and {rope_bytes} of RoPE tables) before committing"
        );
        state.commit_memory();
        let committed = resident_bytes().saturating_sub(before);
        // Small buffers come from the heap, some of whose pages may already be resident: the
        // whole (cache and tables) must be, whatever was before.
        assert!(
            committed >= (kv_bytes + rope_bytes) * 9 / 10,
            "{kv}: {committed} resident after committing a {kv_bytes}-byte cache and {rope_bytes} of tables (was {allocated})"
        );
        // Committing writes values back unchanged: the state still starts from zeros.
        assert_eq!(state.logits().iter().filter(|&&v| v != 0.0).count(), 0);
    }
}
