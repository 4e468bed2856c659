//! Driving `node` processes: start, read their events, signal them.
//! (Filled in with the first multi-process test.)
