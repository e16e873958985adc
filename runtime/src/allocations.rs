//! A counting global allocator, to check the no-allocation promise of the
//! decode loop in the binaries that run it (`bramble bench`, `brambled`).
//!
//! A binary installs it with
//! `#[global_allocator] static ALLOCATOR: CountingAllocator = CountingAllocator;`
//! (no `unsafe` in the binary: the one `unsafe impl` is here). It counts every
//! allocation and reallocation twice: in a process-wide total
//! ([`allocations`]) and in a counter of the calling thread
//! ([`thread_allocations`]), so a thread can measure its own work while other
//! threads (connections, the test harness) allocate as they please. Both are a
//! relaxed increment on top of the system allocator.

use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;
use std::sync::atomic::{AtomicU64, Ordering};

/// The system allocator, counting allocations (see the module documentation).
pub struct CountingAllocator;

static ALLOCATIONS: AtomicU64 = AtomicU64::new(0);

thread_local! {
    /// This thread's allocations (const-initialized: reading it never allocates).
    static THREAD_ALLOCATIONS: Cell<u64> = const { Cell::new(0) };
}

fn count() {
    ALLOCATIONS.fetch_add(1, Ordering::Relaxed);
    // `try_with`: during a thread's teardown the counter may be gone already.
    let _ = THREAD_ALLOCATIONS.try_with(|n| n.set(n.get() + 1));
}

/// Allocations (including reallocations) made so far by the whole process.
pub fn allocations() -> u64 {
    ALLOCATIONS.load(Ordering::Relaxed)
}

/// Allocations (including reallocations) made so far by the calling thread.
pub fn thread_allocations() -> u64 {
    THREAD_ALLOCATIONS.try_with(Cell::get).unwrap_or(0)
}

/// Whether [`CountingAllocator`] is this process's global allocator: the
/// counts above are only meaningful (not merely zero) when it is.
pub fn counting() -> bool {
    let before = thread_allocations();
    std::hint::black_box(Box::new(0u64));
    thread_allocations() != before
}

// SAFETY: every call is forwarded unchanged to the system allocator; the only
// additions are a relaxed atomic increment and a thread-local counter update,
// neither of which allocates or affects the memory returned.
unsafe impl GlobalAlloc for CountingAllocator {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        count();
        // SAFETY: same contract as our caller's.
        unsafe { System.alloc(layout) }
    }
    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        count();
        // SAFETY: same contract as our caller's.
        unsafe { System.alloc_zeroed(layout) }
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        count();
        // SAFETY: same contract as our caller's.
        unsafe { System.realloc(ptr, layout, new_size) }
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: same contract as our caller's.
        unsafe { System.dealloc(ptr, layout) }
    }
}
