//! End-to-end tests of the real binary, and collaborative training in one process.

#![allow(clippy::unwrap_used, clippy::expect_used)] // tests fail loudly on purpose

mod allreduce;
mod authority;
mod checkpoint;
mod churn;
mod cli;
mod collab;
mod demo;
mod dht;
mod harness;
mod monitor;
mod nat;
mod prepare;
mod settings;
mod train;
