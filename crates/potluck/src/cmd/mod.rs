//! One module per subcommand: its arguments and what it does.

pub(crate) mod authority;
pub(crate) mod aux;
pub(crate) mod bench;
pub(crate) mod bench_allreduce;
pub(crate) mod bench_dht;
pub(crate) mod demo;
pub(crate) mod dht;
pub(crate) mod eval;
pub(crate) mod generate;
pub(crate) mod http;
pub(crate) mod invite;
pub(crate) mod joining;
pub(crate) mod keygen;
pub(crate) mod model_info;
pub(crate) mod monitor;
pub(crate) mod prepare;
pub(crate) mod run;
pub(crate) mod together;
pub(crate) mod train;

/// Ctrl-C (SIGINT) from the moment this is made: a signal that comes while the caller is busy
/// (computing a micro-batch, between two `select!`s) is kept until it looks, where a fresh
/// `tokio::signal::ctrl_c()` per loop would miss it. Made inside a Tokio runtime.
#[derive(Debug)]
pub(crate) struct Interrupt(tokio::signal::unix::Signal);

impl Interrupt {
    pub(crate) fn new() -> anyhow::Result<Interrupt> {
        use anyhow::Context;
        let signal = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::interrupt())
            .context("listening for Ctrl-C")?;
        Ok(Interrupt(signal))
    }

    /// Returns at the next Ctrl-C (at once for one that came since the last call).
    pub(crate) async fn recv(&mut self) {
        self.0.recv().await;
    }
}
