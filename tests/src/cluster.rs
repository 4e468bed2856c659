//! Harness for the cluster backend's tests (filled in with that backend).
