//! The threads the packed kernels run on: the calling thread plus `cores − 1` workers that spin
//! for a short while between jobs before they park.
//!
//! Why not rayon: a decode step makes a few hundred small products (a 576 × 576 Q4_1 matrix is
//! 35 µs of work on one core), with Burn's element-wise ops in between. Handed to rayon, the
//! calling thread blocks while rayon's own threads work, so a 2-core machine runs three threads,
//! and every job pays a futex wake-up: `perf` of a SmolLM2 decode put 40 % of all samples in
//! the scheduler (`futex_wake`, `sched_yield`). Here the caller does its share, workers that
//! were busy a moment ago are still spinning, and a job costs two atomic operations per worker.
//! llama.cpp's CPU backend uses the same scheme.

use std::cell::UnsafeCell;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, OnceLock};
use std::thread::Thread;
use std::time::{Duration, Instant};

/// How long an idle worker spins before it parks.
const SPIN: Duration = Duration::from_micros(300);

/// A job: `f(i)` for every `i < tasks`.
struct Job {
    f: *const (dyn Fn(usize) + Sync),
    tasks: usize,
}

struct Shared {
    /// Bumped for each job; workers wait for it to change.
    epoch: AtomicUsize,
    job: UnsafeCell<Job>,
    /// Next task index to take.
    next: AtomicUsize,
    /// Workers that finished the current job (caller waits for all of them, so none touches
    /// `job` once the caller returns).
    acks: AtomicUsize,
    /// Workers parked or about to park.
    sleepers: AtomicUsize,
    /// Set by a worker whose task panicked.
    panicked: AtomicBool,
    /// One job at a time; callers that find it taken run their job alone.
    busy: AtomicBool,
}

// Safety: `job` is written only by the caller holding `busy`, before the epoch bump (Release),
// and read by workers after they observe the bump (Acquire) and before they ack.
unsafe impl Sync for Shared {}
unsafe impl Send for Shared {}

struct Pool {
    shared: Arc<Shared>,
    workers: Vec<Thread>,
}

fn pool() -> &'static Pool {
    static POOL: OnceLock<Pool> = OnceLock::new();
    POOL.get_or_init(|| {
        let threads = std::env::var("KILN_NUM_THREADS")
            .ok()
            .and_then(|v| v.parse::<usize>().ok())
            .unwrap_or_else(|| std::thread::available_parallelism().map_or(1, |n| n.get()))
            .max(1);
        let noop: &'static (dyn Fn(usize) + Sync) = &|_| {};
        let shared = Arc::new(Shared {
            epoch: AtomicUsize::new(0),
            job: UnsafeCell::new(Job { f: noop, tasks: 0 }),
            next: AtomicUsize::new(0),
            acks: AtomicUsize::new(0),
            sleepers: AtomicUsize::new(0),
            panicked: AtomicBool::new(false),
            busy: AtomicBool::new(false),
        });
        let workers = (1..threads)
            .filter_map(|i| {
                let shared = shared.clone();
                std::thread::Builder::new()
                    .name(format!("kiln-kernel-{i}"))
                    .spawn(move || worker(&shared))
                    .ok()
                    .map(|h| h.thread().clone())
            })
            .collect();
        Pool { shared, workers }
    })
}

fn worker(shared: &Shared) {
    let mut seen = 0;
    loop {
        // Wait for a new job: spin, then park.
        let start = Instant::now();
        let mut spins = 0u32;
        while shared.epoch.load(Ordering::Acquire) == seen {
            std::hint::spin_loop();
            spins = spins.wrapping_add(1);
            if spins.is_multiple_of(256) && start.elapsed() > SPIN {
                shared.sleepers.fetch_add(1, Ordering::SeqCst);
                while shared.epoch.load(Ordering::SeqCst) == seen {
                    std::thread::park();
                }
                shared.sleepers.fetch_sub(1, Ordering::SeqCst);
            }
        }
        seen = shared.epoch.load(Ordering::Acquire);
        // Safety: see `Shared`; the caller keeps `f` alive until every worker has acked.
        let (f, tasks) = unsafe {
            let job = &*shared.job.get();
            (&*job.f, job.tasks)
        };
        let run = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            loop {
                let i = shared.next.fetch_add(1, Ordering::Relaxed);
                if i >= tasks {
                    break;
                }
                f(i);
            }
        }));
        if run.is_err() {
            shared.panicked.store(true, Ordering::Relaxed);
        }
        shared.acks.fetch_add(1, Ordering::Release);
    }
}

/// The kernel threads: the caller plus the workers (`KILN_NUM_THREADS`, else one per core).
pub(crate) fn threads() -> usize {
    pool().workers.len() + 1
}

/// Calls `f(i)` for every `i < tasks`, spread over the calling thread and the pool's workers;
/// returns when all calls have returned.
pub(crate) fn for_each(tasks: usize, f: &(dyn Fn(usize) + Sync)) {
    let pool = pool();
    let shared = &*pool.shared;
    if tasks <= 1
        || pool.workers.is_empty()
        || shared
            .busy
            .compare_exchange(false, true, Ordering::Acquire, Ordering::Relaxed)
            .is_err()
    {
        (0..tasks).for_each(f);
        return;
    }
    // Safety: we hold `busy`, and every worker acked the previous job, so none reads `job`.
    // The lifetime of `f` is erased; we do not return before all workers acked this job.
    unsafe {
        let f: *const (dyn Fn(usize) + Sync + '_) = f;
        *shared.job.get() = Job {
            f: std::mem::transmute::<
                *const (dyn Fn(usize) + Sync + '_),
                *const (dyn Fn(usize) + Sync + 'static),
            >(f),
            tasks,
        };
    }
    shared.next.store(0, Ordering::Relaxed);
    shared.acks.store(0, Ordering::Relaxed);
    shared.epoch.fetch_add(1, Ordering::SeqCst);
    if shared.sleepers.load(Ordering::SeqCst) > 0 {
        for w in &pool.workers {
            w.unpark();
        }
    }
    let mine = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        loop {
            let i = shared.next.fetch_add(1, Ordering::Relaxed);
            if i >= tasks {
                break;
            }
            f(i);
        }
    }));
    while shared.acks.load(Ordering::Acquire) < pool.workers.len() {
        std::hint::spin_loop();
    }
    let worker_panicked = shared.panicked.swap(false, Ordering::Relaxed);
    shared.busy.store(false, Ordering::Release);
    if let Err(payload) = mine {
        std::panic::resume_unwind(payload);
    }
    assert!(
        !worker_panicked,
        "a packed-kernel task panicked on a worker thread"
    );
}

#[cfg(test)]
mod tests {
    use super::for_each;
    use std::sync::atomic::{AtomicUsize, Ordering};

    #[test]
    fn every_task_runs_once_across_jobs_and_threads() {
        for tasks in [0, 1, 2, 7, 1000] {
            let hits: Vec<AtomicUsize> = (0..tasks).map(|_| AtomicUsize::new(0)).collect();
            for _ in 0..50 {
                for_each(tasks, &|i| {
                    hits[i].fetch_add(1, Ordering::Relaxed);
                });
            }
            assert!(hits.iter().all(|h| h.load(Ordering::Relaxed) == 50));
        }
        // Callers on other threads at the same time fall back to running alone.
        std::thread::scope(|s| {
            for _ in 0..4 {
                s.spawn(|| {
                    let sum = AtomicUsize::new(0);
                    for _ in 0..200 {
                        for_each(64, &|i| {
                            sum.fetch_add(i, Ordering::Relaxed);
                        });
                    }
                    assert_eq!(sum.load(Ordering::Relaxed), 200 * (63 * 64 / 2));
                });
            }
        });
    }

    #[test]
    fn a_panicking_task_reaches_the_caller() {
        let r = std::panic::catch_unwind(|| {
            for_each(16, &|i| assert!(i != 3, "task 3"));
        });
        assert!(r.is_err());
        // The pool still works afterwards.
        let n = AtomicUsize::new(0);
        for_each(16, &|_| {
            n.fetch_add(1, Ordering::Relaxed);
        });
        assert_eq!(n.load(Ordering::Relaxed), 16);
    }
}
