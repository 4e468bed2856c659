//! etcd's v3 gRPC API: the messages and client stubs for the RPCs this
//! backend calls, generated from etcd's `.proto` files (Apache-2.0, the etcd
//! Authors) by `scripts/etcd-proto` (protox + tonic-prost-build, no
//! `protoc`) and checked in, so building the `etcd` feature needs no
//! protobuf compiler. Do not edit the generated files; regenerate them.

// Generated code: its public items are reached only through this private
// module (`unreachable_pub`), carry etcd's comments where etcd has them
// (`missing_docs`), include stub methods and fields the backend does not use
// (`dead_code`), and follow prost's and tonic's style (clippy).
#![allow(
    missing_docs,
    unreachable_pub,
    dead_code,
    clippy::all,
    clippy::pedantic,
    rustdoc::all
)]

/// The `etcdserverpb` package: KV, Watch, Lease and Auth.
pub(crate) mod etcdserverpb {
    include!("etcdserverpb.rs");
}

/// The `mvccpb` package: keys and events.
pub(crate) mod mvccpb {
    include!("mvccpb.rs");
}
