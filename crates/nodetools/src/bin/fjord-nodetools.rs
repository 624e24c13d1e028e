//! Stand-alone runner for the node tools while fjordctl wires them in:
//! `fjord-nodetools preflight`, `fjord-nodetools bench-fsync`, `fjord-nodetools tune`.

use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(name = "fjord-nodetools", version, about = "fjord node tooling: preflight checks, etcd fsync benchmark, sysctl tuning")]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    Preflight(fjord_nodetools::PreflightArgs),
    BenchFsync(fjord_nodetools::BenchFsyncArgs),
    Tune(fjord_nodetools::TuneArgs),
}

fn main() {
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::try_from_env("FJORD_LOG").unwrap_or_else(|_| "warn".into()))
        .with_writer(std::io::stderr)
        .init();
    let cli = Cli::parse();
    let res = match &cli.cmd {
        Cmd::Preflight(a) => fjord_nodetools::run_preflight(a),
        Cmd::BenchFsync(a) => fjord_nodetools::run_bench_fsync(a),
        Cmd::Tune(a) => fjord_nodetools::run_tune(a),
    };
    match res {
        Ok(code) => std::process::exit(code),
        Err(e) => {
            eprintln!("error: {e:#}");
            std::process::exit(1);
        }
    }
}
