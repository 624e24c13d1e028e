//! fjordctl as a library (the binary is a thin clap front end; tests and
//! benchmarks call these functions directly).
pub mod cluster;
pub mod context;
pub mod pod;
pub mod runtime;
