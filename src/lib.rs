//! imgfs: use a container image without a container engine — inspect it, mount it lazily,
//! flatten it to disk, or answer questions about it. See ARCHITECTURE.md for the codemap.

pub mod artifact;
pub mod bufpool;
pub mod cache;
pub mod cli;
pub mod digest;
pub mod error;
pub mod fetch;
pub mod flatten;
pub mod fuse;
#[doc(hidden)]
pub mod fuzz_entry;
pub mod index;
pub mod layer;
pub mod manifest;
pub mod obtain;
pub mod profile;
pub mod reference;
pub mod registry;
pub mod snapshotter;
pub mod source;
pub mod store;
pub mod tree;
pub mod view;

pub use error::{Error, Result};
