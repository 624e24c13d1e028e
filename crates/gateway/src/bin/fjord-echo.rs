//! fjord-echo: a backend for tests and demos that answers with JSON describing the request.
use std::net::SocketAddr;

use anyhow::Context;
use clap::Parser;
use fjord_gateway::echo::{serve_echo, EchoOptions};

/// Echo backend: answers every request with JSON {pod, namespace, method, path, query, host,
/// protocol, headers, bodyBytes}. Speaks HTTP/1.1 and h2c on the same port.
/// Test controls: request header `x-echo-status: CODE` (answer with CODE), `x-echo-delay-ms: N`
/// (wait N ms), `x-echo-stream: 1` (stream the request body back); `Upgrade` requests get 101 and
/// raw bytes are echoed back.
#[derive(Parser, Debug)]
#[command(name = "fjord-echo", version)]
struct Args {
    /// Address to listen on.
    #[arg(long, env = "ECHO_LISTEN", default_value = "127.0.0.1:8080")]
    listen: SocketAddr,
    /// Pod name reported in every answer.
    #[arg(long, env = "POD_NAME", default_value = "echo")]
    pod: String,
    /// Namespace reported in every answer.
    #[arg(long, env = "POD_NAMESPACE", default_value = "default")]
    namespace: String,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt().with_env_filter(tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into())).init();
    let a = Args::parse();
    let l = tokio::net::TcpListener::bind(a.listen).await.with_context(|| format!("cannot listen on {} (--listen); pick a free address", a.listen))?;
    tracing::info!(addr = %l.local_addr()?, pod = a.pod, namespace = a.namespace, "echo backend listening");
    let shutdown = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    serve_echo(l, EchoOptions { pod: a.pod, namespace: a.namespace }, shutdown).await;
    Ok(())
}
