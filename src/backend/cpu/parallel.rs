//! How many threads a kernel may split over. Kernels split their output columns over the pool,
//! except inside [`serially`]: there the caller already runs several kernels side by side, one
//! per thread, and splitting each again would only add hand-offs.

use std::cell::Cell;

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
}
