//! fjord-nodetools: node tooling for fjord.
//!
//! * [`preflight`]: can this node run fjord? (`fjordctl preflight`)
//! * [`fsync`]: etcd's fdatasync benchmark (`fjordctl bench fsync`)
//! * [`tune`]: memory-aware network sysctls (`fjordctl tune`)
//!
//! Each command is a `clap::Args` struct plus a `run_*` function returning
//! the process exit code, so fjordctl only adds
//! `Preflight(fjord_nodetools::PreflightArgs)` etc. to its subcommands.
//! Pure logic (parsers, scaling table, percentiles, verdicts, virtualization
//! classification, preflight evaluation) lives in modules free of I/O.

pub mod bpfprobe;
pub mod fsync;
pub mod host;
pub mod mapsize;
pub mod preflight;
pub mod signals;
pub mod size;
pub mod stats;
pub mod sysctl;
pub mod tune;
pub mod virt;

pub use fsync::{bench_fsync, run_bench_fsync, BenchFsyncArgs, FsyncBenchOptions, FsyncBenchResult, FsyncError};
pub use mapsize::MapSizes;
pub use preflight::{preflight_report, run_preflight, Check, PreflightArgs, PreflightOptions, Report, Status};
pub use tune::{run_tune, TuneArgs, TuneReport};

/// `-o` output format shared by the commands.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum)]
pub enum OutputFormat {
    /// Human-readable text
    #[default]
    Text,
    /// JSON (stable field names; for scripts and `fjordctl status`)
    Json,
}
