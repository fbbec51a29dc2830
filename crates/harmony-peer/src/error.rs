//! The crate's error type.

/// What can go wrong setting peering up. Sending and receiving hints never fails a caller:
/// failures there are logged and counted.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// The cluster secret is shorter than the minimum.
    #[error("the cluster secret is {len} bytes long; it must have at least {min}")]
    SecretTooShort {
        /// Its length.
        len: usize,
        /// The minimum ([`crate::SECRET_BYTES_MIN`]).
        min: usize,
    },
}

/// The crate's result type.
pub type Result<T, E = Error> = std::result::Result<T, E>;
