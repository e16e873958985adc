//! Process measurements for `bench` and `convert`: peak resident memory and a
//! counting allocator.

/// The system allocator, counting allocations so `bench` can report how many a
/// decode step makes; installed as the global allocator of the `bramble`
/// binary. It is the runtime's, shared with `brambled`.
pub use bramble_runtime::allocations::{allocations, CountingAllocator};

/// The peak resident set size of this process (`VmHWM`), in bytes, where Linux tells it.
pub fn peak_rss_bytes() -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib * 1024)
}
