//! How many threads a kernel may split over. Kernels split their output columns over the pool,
//! except inside [`serially`]: there the caller already runs several kernels side by side, one
//! per thread, and splitting each again would only add hand-offs.

use rayon::prelude::*;
use std::cell::Cell;
use std::sync::atomic::{AtomicUsize, Ordering};

thread_local! {
    static SERIAL: Cell<bool> = const { Cell::new(false) };
}

/// Runs `f` with every kernel it calls confined to the current thread.
pub fn serially<R>(f: impl FnOnce() -> R) -> R {
    let outer = SERIAL.with(|s| s.replace(true));
    let result = f();
    SERIAL.with(|s| s.set(outer));
    result
}

/// Threads a kernel called here may use: the pool's, or 1 inside [`serially`].
pub fn kernel_threads() -> usize {
    if SERIAL.with(Cell::get) {
        1
    } else {
        rayon::current_num_threads().max(1)
    }
}

/// Runs `task(i)` for every `i < n` on the pool and returns the results in index order.
/// Tasks start largest `cost` first, and each thread takes the next one when it finishes its
/// last (longest-processing-time-first list scheduling), so tasks of very different sizes
/// still end about together; splitting the index range in halves would not.
pub fn largest_first<R: Send>(
    n: usize,
    cost: impl Fn(usize) -> usize,
    task: impl Fn(usize) -> R + Sync,
) -> Vec<R> {
    let mut order: Vec<usize> = (0..n).collect();
    order.sort_by_key(|&i| std::cmp::Reverse(cost(i)));
    let next = AtomicUsize::new(0);
    let worker = || {
        let mut done = Vec::new();
        loop {
            let k = next.fetch_add(1, Ordering::Relaxed);
            let Some(&i) = order.get(k) else { break };
            done.push((i, task(i)));
        }
        done
    };
    let threads = kernel_threads().min(n);
    let mut done: Vec<(usize, R)> = if threads > 1 {
        (0..threads)
            .into_par_iter()
            .flat_map_iter(|_| worker())
            .collect()
    } else {
        worker()
    };
    done.sort_unstable_by_key(|d| d.0);
    done.into_iter().map(|d| d.1).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn serially_confines_and_restores() {
        let pool = rayon::ThreadPoolBuilder::new()
            .num_threads(2)
            .build()
            .unwrap();
        pool.install(|| {
            assert_eq!(kernel_threads(), 2);
            serially(|| {
                assert_eq!(kernel_threads(), 1);
                serially(|| assert_eq!(kernel_threads(), 1));
                assert_eq!(kernel_threads(), 1);
            });
            assert_eq!(kernel_threads(), 2);
        });
    }

    #[test]
    fn largest_first_returns_every_result_in_index_order() {
        let pool = rayon::ThreadPoolBuilder::new()
            .num_threads(2)
            .build()
            .unwrap();
        for n in [0, 1, 2, 7, 40] {
            let costs: Vec<usize> = (0..n).map(|i| (i * 37) % 11).collect();
            let got = pool.install(|| largest_first(n, |i| costs[i], |i| i * i));
            assert_eq!(got, (0..n).map(|i| i * i).collect::<Vec<_>>(), "n = {n}");
            assert_eq!(largest_first(n, |i| costs[i], |i| i + 1).len(), n);
        }
    }
}
