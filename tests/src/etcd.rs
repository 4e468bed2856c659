//! Harness for the etcd backend's tests (filled in with that backend).
