//! fjord-lb: the pure load-balancing logic of fjord's eBPF kube-proxy replacement.
//!
//! * [`maglev`] — Maglev consistent-hashing tables (prime size, deterministic
//!   for the same seed and backend keys on every node, optional weights).
//! * [`service`] — translation of a service description (frontends =
//!   VIP/port/protocol, backends with ready/serving/terminating flags and
//!   optional weights) into the entries the datapath programs into its maps.
//!
//! No I/O happens here; everything is unit-tested in this crate.
pub mod maglev;
pub mod service;

pub use maglev::{build_table, is_prime, MaglevError, COMPACT_MAX_BACKENDS, COMPACT_TABLE_SIZE, DEFAULT_SEED, DEFAULT_TABLE_SIZE};
pub use service::{
    translate, Backend, BackendAddr, Frontend, FrontendEntries, FrontendOptions, LbConfig, Protocol, Service, ServiceKey,
    TranslateError,
};
