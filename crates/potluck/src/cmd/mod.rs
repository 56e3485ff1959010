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
pub(crate) mod invite;
pub(crate) mod keygen;
pub(crate) mod model_info;
pub(crate) mod monitor;
pub(crate) mod prepare;
pub(crate) mod run;
pub(crate) mod together;
pub(crate) mod train;
