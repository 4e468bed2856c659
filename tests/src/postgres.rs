//! Harness for the postgres backend's tests (filled in with that backend).
