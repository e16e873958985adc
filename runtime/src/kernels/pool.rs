//! A fixed set of worker threads, made once at load, that run one job at a
//! time split by worker index. Handing out a job allocates nothing and sends
//! nothing through a channel: the job is a borrowed closure published under a
//! mutex with a generation counter; workers spin briefly, then sleep on a
//! condition variable, and the caller takes part as worker 0.
//!
//! [`ThreadPool::run`] is scoped like `std::thread::scope`: it is not left,
//! by return or by unwinding, before every worker is done with the borrowed
//! job, and a worker's panic is caught in the worker (which lives on) and
//! resumed in the caller.

use std::any::Any;
use std::panic::AssertUnwindSafe;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::thread::JoinHandle;

/// Most threads a pool runs (the caller included).
pub const MAX_THREADS: usize = 16;

/// Busy-wait rounds of a waiting thread: covers the gap between two matrix
/// products of one token, so back-to-back jobs start without a wake-up.
const SPINS: u32 = 2_000;
/// Then rounds that yield the core (another process may need it), before sleeping.
const YIELDS: u32 = 50;

/// One round of waiting; false once it is time to sleep.
fn wait_round(round: &mut u32) -> bool {
    *round += 1;
    if *round <= SPINS {
        std::hint::spin_loop();
        true
    } else if *round <= SPINS + YIELDS {
        std::thread::yield_now();
        true
    } else {
        false
    }
}

/// A job as workers see it: a borrowed closure with its lifetime erased.
#[derive(Clone, Copy)]
struct JobPointer(*const (dyn Fn(usize) + Sync));

// SAFETY: the pointer is only dereferenced by workers between the moment
// `ThreadPool::run` publishes it and the moment every worker has reported
// back, and `run` does not return before that; the closure is `Sync`.
unsafe impl Send for JobPointer {}

struct Shared {
    /// The published job and the shutdown flag.
    job: Mutex<(Option<JobPointer>, bool)>,
    /// Raised with each new job (and on shutdown).
    generation: AtomicU64,
    /// Workers still running the current job.
    remaining: AtomicUsize,
    wake: Condvar,
    finished: Mutex<()>,
    finished_signal: Condvar,
    /// Set when a worker's share of the current job panicked, before its
    /// `remaining` decrement (so `run` reads it without a lock when none did).
    worker_panicked: AtomicBool,
    /// The first such panic's payload, for `run` to resume.
    worker_panic: Mutex<Option<Box<dyn Any + Send>>>,
}

impl Shared {
    /// The payload of a worker's panic during the last job, if one panicked.
    fn take_worker_panic(&self) -> Option<Box<dyn Any + Send>> {
        if !self.worker_panicked.swap(false, Ordering::AcqRel) {
            return None;
        }
        self.worker_panic.lock().unwrap_or_else(|e| e.into_inner()).take()
    }
}

/// The job [`ThreadPool::run`] has published. Dropping it, when `run`
/// returns or unwinds, waits until every worker is done with the job (they
/// hold a pointer to it, borrowed from the caller's stack), then withdraws it.
struct PublishedJob<'p>(&'p Shared);

impl Drop for PublishedJob<'_> {
    fn drop(&mut self) {
        let shared = self.0;
        // Spin first, as the workers are usually nearly done.
        let mut round = 0u32;
        while shared.remaining.load(Ordering::Acquire) != 0 {
            if !wait_round(&mut round) {
                let guard = shared.finished.lock().unwrap_or_else(|e| e.into_inner());
                if shared.remaining.load(Ordering::Acquire) != 0 {
                    let _ = shared.finished_signal.wait_timeout(guard, std::time::Duration::from_millis(1));
                }
            }
        }
        shared.job.lock().unwrap_or_else(|e| e.into_inner()).0 = None;
        if std::thread::panicking() {
            // The caller's own panic is unwinding: a worker's, if any, is dropped with the job.
            drop(shared.take_worker_panic());
        }
    }
}

/// Worker threads for splitting kernels by rows.
pub struct ThreadPool {
    threads: usize,
    shared: Arc<Shared>,
    workers: Vec<JoinHandle<()>>,
    /// Serializes `run` calls from different threads.
    running: Mutex<()>,
}

impl ThreadPool {
    /// A pool of `threads` (1 ..= [`MAX_THREADS`]) including the calling thread.
    pub fn new(threads: usize) -> Self {
        let threads = threads.clamp(1, MAX_THREADS);
        let shared = Arc::new(Shared {
            job: Mutex::new((None, false)),
            generation: AtomicU64::new(0),
            remaining: AtomicUsize::new(0),
            wake: Condvar::new(),
            finished: Mutex::new(()),
            finished_signal: Condvar::new(),
            worker_panicked: AtomicBool::new(false),
            worker_panic: Mutex::new(None),
        });
        let workers = (1..threads)
            .map(|index| {
                let shared = Arc::clone(&shared);
                std::thread::Builder::new()
                    .name(format!("bramble-worker-{index}"))
                    .spawn(move || worker(index, &shared))
                    .expect("spawning a worker thread")
            })
            .collect();
        Self { threads, shared, workers, running: Mutex::new(()) }
    }

    /// Threads taking part in each job.
    pub fn threads(&self) -> usize {
        self.threads
    }

    /// Runs `job(i)` for every worker index `i` in `0..threads`, the caller
    /// doing index 0, and returns when all are done. If a share panics, the
    /// panic is resumed here once all are done (the caller's own first,
    /// else the first worker's); the pool stays usable.
    pub fn run(&self, job: &(dyn Fn(usize) + Sync)) {
        if self.threads == 1 {
            job(0);
            return;
        }
        let _one_at_a_time = self.running.lock().unwrap_or_else(|e| e.into_inner());
        // SAFETY: (lifetime erasure) workers use the pointer only until they
        // decrement `remaining`, and this function waits for it to reach zero
        // before it is left, by return or by unwinding (`PublishedJob`), so
        // the borrow outlives every use.
        let pointer = JobPointer(unsafe {
            std::mem::transmute::<*const (dyn Fn(usize) + Sync + '_), *const (dyn Fn(usize) + Sync + 'static)>(job)
        });
        self.shared.remaining.store(self.threads - 1, Ordering::Release);
        {
            let mut slot = self.shared.job.lock().unwrap_or_else(|e| e.into_inner());
            slot.0 = Some(pointer);
            self.shared.generation.fetch_add(1, Ordering::AcqRel);
        }
        let published = PublishedJob(&self.shared);
        self.shared.wake.notify_all();
        job(0);
        // Wait for the others (also done by the drop if `job(0)` unwinds).
        drop(published);
        if let Some(payload) = self.shared.take_worker_panic() {
            std::panic::resume_unwind(payload);
        }
    }
}

fn worker(index: usize, shared: &Shared) {
    let mut seen = 0u64;
    loop {
        // Wait for a new generation: spin, then sleep.
        let mut round = 0u32;
        let job = loop {
            if shared.generation.load(Ordering::Acquire) != seen {
                let slot = shared.job.lock().unwrap_or_else(|e| e.into_inner());
                if slot.1 {
                    return;
                }
                seen = shared.generation.load(Ordering::Acquire);
                if let Some(job) = slot.0 {
                    break job;
                }
                continue;
            }
            if !wait_round(&mut round) {
                let slot = shared.job.lock().unwrap_or_else(|e| e.into_inner());
                if slot.1 {
                    return;
                }
                if shared.generation.load(Ordering::Acquire) == seen {
                    let _ = shared.wake.wait_timeout(slot, std::time::Duration::from_millis(50));
                }
            }
        };
        // SAFETY: see `JobPointer`: `run` keeps the closure alive until
        // `remaining` reaches zero, which happens only after this call.
        // A panic is caught so that the worker lives on and still reports
        // back; `run` resumes it in the caller.
        let outcome = std::panic::catch_unwind(AssertUnwindSafe(|| unsafe { (*job.0)(index) }));
        if let Err(payload) = outcome {
            shared.worker_panic.lock().unwrap_or_else(|e| e.into_inner()).get_or_insert(payload);
            shared.worker_panicked.store(true, Ordering::Release);
        }
        if shared.remaining.fetch_sub(1, Ordering::AcqRel) == 1 {
            let _guard = shared.finished.lock().unwrap_or_else(|e| e.into_inner());
            shared.finished_signal.notify_one();
        }
    }
}

impl Drop for ThreadPool {
    fn drop(&mut self) {
        {
            let mut slot = self.shared.job.lock().unwrap_or_else(|e| e.into_inner());
            slot.1 = true;
            self.shared.generation.fetch_add(1, Ordering::AcqRel);
        }
        self.shared.wake.notify_all();
        for worker in self.workers.drain(..) {
            let _ = worker.join();
        }
    }
}

/// Splits `0..n` into `parts` contiguous ranges whose bounds are multiples of
/// `align` (the last takes the rest); part `i` of them.
pub fn split_range(n: usize, parts: usize, align: usize, i: usize) -> std::ops::Range<usize> {
    let units = n.div_ceil(align);
    let per = units / parts;
    let extra = units % parts;
    let start = (i * per + i.min(extra)) * align;
    let end = ((i + 1) * per + (i + 1).min(extra)) * align;
    start.min(n)..end.min(n)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::AtomicU32;

    #[test]
    fn every_index_runs_once_per_job() {
        for threads in 1..=4 {
            let pool = ThreadPool::new(threads);
            for _ in 0..200 {
                let counts: Vec<AtomicU32> = (0..threads).map(|_| AtomicU32::new(0)).collect();
                pool.run(&|i| {
                    counts[i].fetch_add(1, Ordering::Relaxed);
                });
                assert!(counts.iter().all(|c| c.load(Ordering::Relaxed) == 1));
            }
        }
    }

    /// The message of a panic payload (`panic!` with or without arguments).
    fn panic_message(payload: &(dyn Any + Send)) -> String {
        payload
            .downcast_ref::<&str>()
            .map(|text| text.to_string())
            .or_else(|| payload.downcast_ref::<String>().cloned())
            .unwrap_or_default()
    }

    #[test]
    fn a_panic_of_the_caller_waits_for_the_workers_before_unwinding() {
        let pool = ThreadPool::new(3);
        let finished = AtomicUsize::new(0);
        // A named closure, alive to the end of the test, so that a pool that
        // unwinds too early lets its workers finish on live data (and the
        // assertion below fails) rather than on a dead stack.
        let job = |i: usize| {
            if i == 0 {
                // Unwinds at once: `panic!` would first run the panic hook,
                // whose backtrace can take longer than the workers' sleep.
                std::panic::resume_unwind(Box::new("the caller's share fails"));
            }
            std::thread::sleep(std::time::Duration::from_millis(300));
            finished.fetch_add(1, Ordering::SeqCst);
        };
        let result = std::panic::catch_unwind(AssertUnwindSafe(|| pool.run(&job)));
        let finished_when_unwound = finished.load(Ordering::SeqCst);
        std::thread::sleep(std::time::Duration::from_millis(600));
        assert_eq!(panic_message(&*result.unwrap_err()), "the caller's share fails");
        assert_eq!(finished_when_unwound, 2, "run unwound while its workers still ran the borrowed job");
        // The pool goes on.
        let counts: Vec<AtomicU32> = (0..3).map(|_| AtomicU32::new(0)).collect();
        pool.run(&|i| {
            counts[i].fetch_add(1, Ordering::Relaxed);
        });
        assert!(counts.iter().all(|c| c.load(Ordering::Relaxed) == 1));
    }

    #[test]
    fn a_panic_of_a_worker_is_resumed_in_the_caller_and_the_pool_goes_on() {
        // On a thread, so that a caller spinning forever fails the test instead of hanging it.
        let (sender, receiver) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let pool = ThreadPool::new(3);
            let mut outcomes = Vec::new();
            for round in 0..3 {
                let result = std::panic::catch_unwind(AssertUnwindSafe(|| {
                    pool.run(&|i| {
                        if i == 2 {
                            panic!("worker 2 fails in round {round}");
                        }
                    })
                }));
                outcomes.push(result.map_err(|payload| panic_message(&*payload)));
                let counts: Vec<AtomicU32> = (0..3).map(|_| AtomicU32::new(0)).collect();
                pool.run(&|i| {
                    counts[i].fetch_add(1, Ordering::Relaxed);
                });
                outcomes.push(if counts.iter().all(|c| c.load(Ordering::Relaxed) == 1) {
                    Ok(())
                } else {
                    Err(format!("round {round}: a job after the panic ran {counts:?}"))
                });
            }
            let _ = sender.send(outcomes);
        });
        let outcomes = receiver
            .recv_timeout(std::time::Duration::from_secs(30))
            .expect("run returned after a worker panicked (it used to wait forever)");
        for (round, pair) in outcomes.chunks(2).enumerate() {
            assert_eq!(pair[0], Err(format!("worker 2 fails in round {round}")));
            assert_eq!(pair[1], Ok(()));
        }
    }

    #[test]
    fn ranges_cover_everything_once_on_aligned_bounds() {
        for n in [0, 1, 7, 64, 100, 576, 1536, 49152] {
            for parts in 1..=5 {
                let mut next = 0;
                for i in 0..parts {
                    let r = split_range(n, parts, 4, i);
                    assert_eq!(r.start, next);
                    assert!(r.start.is_multiple_of(4) || r.start == n);
                    next = r.end;
                }
                assert_eq!(next, n);
            }
        }
    }
}
