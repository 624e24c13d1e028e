//! Test helper for crash safety: opens the embedded store at argv[1] and puts
//! keys `crash/<n>` forever, printing `acked <n>` after each put returns.
//! The test kills it with SIGKILL and checks that every acked key survived.
use std::io::Write;

#[tokio::main(flavor = "current_thread")]
async fn main() -> anyhow::Result<()> {
    use fjord_store::Store;
    let path = std::env::args().nth(1).ok_or_else(|| anyhow::anyhow!("usage: fjord-store-crashtest PATH"))?;
    let store = fjord_store::embedded::EmbeddedStore::open(&path)?;
    let mut out = std::io::stdout().lock();
    for n in 0u64.. {
        store.put(&format!("crash/{n:08}"), n.to_le_bytes().to_vec(), None).await?;
        writeln!(out, "acked {n}")?;
        out.flush()?;
    }
    Ok(())
}
