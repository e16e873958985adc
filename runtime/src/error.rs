//! The runtime's error type: a kind to match on and a message that names what was wrong.

use std::fmt;

/// What sort of failure an [`Error`] is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum ErrorKind {
    /// The file could not be opened, mapped or read.
    Io,
    /// The image is not a Bramble image, or is truncated or corrupt.
    Corrupt,
    /// The image is of a format or layout version this reader does not know.
    Version,
    /// The image is well-formed but describes something this runtime cannot run.
    Unsupported,
    /// A caller passed an argument out of range (a token id, a position past the context).
    InvalidInput,
    /// Rendering a chat template failed.
    Template,
    /// A buffer could not be allocated: its size overflows, or the allocator
    /// cannot provide it.
    OutOfMemory,
    /// The model computed a value that is not a finite number (its weights
    /// hold NaN or infinity, or its activations overflow).
    NonFinite,
}

/// An error of the runtime, with a message naming the file, section, tensor or field at fault.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Error {
    kind: ErrorKind,
    message: String,
}

impl Error {
    /// An error of `kind` with a message.
    pub fn new(kind: ErrorKind, message: impl Into<String>) -> Self {
        Self { kind, message: message.into() }
    }
    /// Shorthand for an [`ErrorKind::Corrupt`] error.
    pub fn corrupt(message: impl Into<String>) -> Self {
        Self::new(ErrorKind::Corrupt, message)
    }
    /// Shorthand for an [`ErrorKind::InvalidInput`] error.
    pub fn invalid(message: impl Into<String>) -> Self {
        Self::new(ErrorKind::InvalidInput, message)
    }
    /// Shorthand for an [`ErrorKind::Unsupported`] error.
    pub fn unsupported(message: impl Into<String>) -> Self {
        Self::new(ErrorKind::Unsupported, message)
    }
    /// What sort of failure this is.
    pub fn kind(&self) -> ErrorKind {
        self.kind
    }
    /// The message, without the kind.
    pub fn message(&self) -> &str {
        &self.message
    }
    /// The same error with `context: ` put before its message.
    pub fn context(self, context: impl fmt::Display) -> Self {
        Self { kind: self.kind, message: format!("{context}: {}", self.message) }
    }
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.message)
    }
}

impl std::error::Error for Error {}

/// The runtime's result type.
pub type Result<T, E = Error> = std::result::Result<T, E>;
