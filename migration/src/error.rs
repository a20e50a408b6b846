//! Why a migration failed, in words a user can act on.

use thiserror::Error;

use crate::stream::StreamError;
use crate::transport::TransportError;

/// A migration failure (its Display is query-migrate's `error-desc`).
#[derive(Debug, Error)]
pub enum MigrationError {
    /// The transport could not be set up.
    #[error(transparent)]
    Transport(#[from] TransportError),
    /// Writing or reading the stream failed.
    #[error(transparent)]
    Stream(#[from] StreamError),
    /// The destination reported a failure.
    #[error("the destination failed: {0}")]
    Destination(String),
    /// The destination went away or did not answer.
    #[error("lost contact with the destination: {0}")]
    DestinationLost(String),
    /// The VM refused an operation (stopping vCPUs, saving or loading state).
    #[error("{0}")]
    Vm(String),
    /// The user cancelled the migration.
    #[error("migration was cancelled")]
    Cancelled,
    /// Settings that cannot work together for this migration.
    #[error("{0}")]
    Config(String),
}

/// Result alias for migration.
pub type Result<T> = std::result::Result<T, MigrationError>;
