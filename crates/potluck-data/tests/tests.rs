//! Integration tests of the data loaders on files built here: shards, folders, packages.

#![allow(clippy::unwrap_used, clippy::expect_used)] // tests fail loudly on purpose

mod emoji;
mod util;
mod webdataset;
