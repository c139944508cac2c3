//! The limits of the six tools, as the official runner (Python SDK 2.15.0) sets them.

/// read (whole file) and edit: the largest file loaded.
pub(crate) const MAX_FILE_BYTES: u64 = 256 * 1024;
/// read: the largest image, measured as base64.
pub(crate) const MAX_IMAGE_BASE64_BYTES: u64 = 5 * 1024 * 1024;
/// read: the largest PDF.
pub(crate) const MAX_PDF_BYTES: u64 = 20 * 1024 * 1024;
/// bash: the most output kept (its tail), in bytes.
pub(crate) const BASH_OUTPUT_LIMIT: usize = 100 * 1024;
/// bash: the timeout when the call sets none, in seconds.
pub(crate) const BASH_DEFAULT_TIMEOUT_S: f64 = 120.0;
/// grep: the most output returned, in characters.
pub(crate) const GREP_OUTPUT_LIMIT: usize = 100 * 1024;
/// glob: the most paths returned.
pub(crate) const GLOB_RESULT_LIMIT: usize = 200;
/// glob: the most matches considered (before sorting).
pub(crate) const WALK_MAX_ENTRIES: usize = 50_000;
