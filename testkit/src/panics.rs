//! Counting panics anywhere in the test process: a hostile-client test
//! asserts that nothing panicked, including tasks whose panics tokio would
//! otherwise swallow.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

/// Counts every panic from now on (the previous hook still runs, so the
/// message is printed as usual).
#[derive(Clone, Debug)]
pub struct PanicCounter(Arc<AtomicU64>);

impl PanicCounter {
    /// Installs the counting hook.
    pub fn install() -> PanicCounter {
        let count = Arc::new(AtomicU64::new(0));
        let seen = count.clone();
        let previous = std::panic::take_hook();
        std::panic::set_hook(Box::new(move |info| {
            seen.fetch_add(1, Ordering::SeqCst);
            previous(info);
        }));
        PanicCounter(count)
    }

    /// Panics since [`PanicCounter::install`].
    pub fn count(&self) -> u64 {
        self.0.load(Ordering::SeqCst)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn panics_in_threads_are_counted() {
        let counter = PanicCounter::install();
        let before = counter.count();
        let joined = std::thread::spawn(|| panic!("counted on purpose")).join();
        assert!(joined.is_err());
        // At least: other tests of this binary may panic meanwhile.
        assert!(counter.count() > before);
    }
}
