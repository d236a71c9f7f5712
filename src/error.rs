//! The library's error type: every failure names what was wrong and where it came from, so
//! the CLI can print it as one line without guessing.

use crate::digest::Digest;

/// Errors the library reports. Messages are complete sentences a user can act on.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("invalid image reference {input:?}: {reason}")]
    Reference { input: String, reason: String },

    #[error("invalid digest {input:?}: {reason}")]
    Digest { input: String, reason: String },

    #[error("{what} {expected}: digest mismatch (the bytes received hash to {actual})")]
    DigestMismatch {
        what: String,
        expected: Digest,
        actual: Digest,
    },

    #[error("{what} {digest}: expected {expected} bytes, got {actual}")]
    SizeMismatch {
        what: String,
        digest: Digest,
        expected: u64,
        actual: u64,
    },

    /// The registry has no bytes of blob `digest` from `offset` on (416 to a resume).
    #[error("registry {host}: blob {digest} has no bytes from offset {offset} (416)")]
    BlobEndsBefore {
        host: String,
        digest: Digest,
        offset: u64,
    },

    /// A blob's bytes came whole, and hash to its digest, but are fewer than its
    /// descriptor says.
    #[error(
        "{what} {digest}: the registry's blob is shorter than the manifest's descriptor \
         claims: it has {actual} bytes (and they match the digest), the descriptor says {expected}"
    )]
    BlobShorter {
        what: String,
        digest: Digest,
        expected: u64,
        actual: u64,
    },

    /// What came for a blob ended, whole, before its descriptor's size and is not the blob
    /// (an HTML error page with status 200, say).
    #[error(
        "{what} {expected}: digest mismatch: received {received} bytes of {content_type}, \
         hashing to {actual}, where the descriptor says {size} bytes"
    )]
    NotTheBlob {
        what: String,
        expected: Digest,
        actual: Digest,
        received: u64,
        size: u64,
        content_type: String,
    },

    #[error("malformed {what}: {reason}")]
    Malformed { what: String, reason: String },

    #[error("unsupported {what}: {value}")]
    Unsupported { what: String, value: String },

    #[error("no image for platform {wanted} in {reference}; available: {}", available.join(", "))]
    NoMatchingPlatform {
        reference: String,
        wanted: String,
        available: Vec<String>,
    },

    #[error("{what} not found: {detail}")]
    NotFound { what: String, detail: String },

    #[error("registry {host}: authentication failed: {detail}")]
    Auth { host: String, detail: String },

    #[error("registry {host}: {detail}")]
    Registry { host: String, detail: String },

    #[error("cannot reach registry {host}: {detail}")]
    Unreachable { host: String, detail: String },

    /// The work was cancelled (Ctrl-C, SIGTERM) and what it had made is gone.
    #[error("interrupted")]
    Interrupted,
    /// An attempt broke the stall or low-speed rule (`registry::pace`); `attempts` is how
    /// many did so in a row at this host.
    #[error(
        "registry {host}: {what} stalled: {reason} ({attempts} attempt{})",
        if *attempts == 1 { "" } else { "s" }
    )]
    Stalled {
        host: String,
        what: String,
        reason: String,
        attempts: u32,
    },

    // The cause is in the message, not also a `#[source]`: the CLI prints the whole chain,
    // which would say it twice.
    #[error("{context}: {cause}")]
    Io {
        context: String,
        cause: std::io::Error,
    },
}

impl Error {
    /// A blocking worker task that panicked or was cancelled.
    pub(crate) fn worker(e: tokio::task::JoinError) -> Error {
        Error::Io {
            context: "a worker thread failed".into(),
            cause: std::io::Error::other(e.to_string()),
        }
    }
}

/// Result with the library's [`Error`].
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Attach a context line to I/O errors, the way `anyhow::Context` does for the binary.
pub trait IoContext<T> {
    fn ctx(self, context: impl FnOnce() -> String) -> Result<T>;
}

impl<T> IoContext<T> for std::io::Result<T> {
    fn ctx(self, context: impl FnOnce() -> String) -> Result<T> {
        self.map_err(|cause| Error::Io {
            context: context(),
            cause,
        })
    }
}

impl Error {
    pub(crate) fn malformed(what: impl Into<String>, reason: impl ToString) -> Self {
        Error::Malformed {
            what: what.into(),
            reason: reason.to_string(),
        }
    }
}
