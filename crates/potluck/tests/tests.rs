//! End-to-end tests of the real binary.

#![allow(clippy::unwrap_used, clippy::expect_used)] // tests fail loudly on purpose

mod allreduce;
mod cli;
mod dht;
mod nat;
mod prepare;
mod train;
