//! An append-only log that in-process test services write to and tests read.

use std::sync::{Arc, Mutex};

/// Lines that test services append (`start …`, `terminate …`), shared by
/// cloning.
///
/// ```
/// let log = highlander_tests::log::Log::default();
/// log.push("start solo a 1".into());
/// assert_eq!(log.count("start solo"), 1);
/// assert_eq!(log.matching("start"), ["start solo a 1"]);
/// ```
#[derive(Clone, Default, Debug)]
pub struct Log(Arc<Mutex<Vec<String>>>);

impl Log {
    /// Appends one line.
    pub fn push(&self, line: String) {
        self.0.lock().unwrap_or_else(|e| e.into_inner()).push(line);
    }

    /// Every line so far, in order.
    pub fn lines(&self) -> Vec<String> {
        self.0.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// The lines that start with `prefix`.
    pub fn matching(&self, prefix: &str) -> Vec<String> {
        self.lines()
            .into_iter()
            .filter(|l| l.starts_with(prefix))
            .collect()
    }

    /// How many lines start with `prefix`.
    pub fn count(&self, prefix: &str) -> usize {
        self.matching(prefix).len()
    }
}
