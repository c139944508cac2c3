//! The limits of the six tools, as the official runner (Python SDK 2.17.0) sets them.

/// edit: the largest file loaded, and the largest result of a `replace_all`.
pub(crate) const MAX_FILE_BYTES: u64 = 256 * 1024;
/// read: the largest text file read whole, and the most bytes a `view_range` returns (the API
/// cuts a longer result without saying how to read the rest).
pub(crate) const MAX_READ_BYTES: u64 = 110_000;
/// read: the largest image, measured as base64.
pub(crate) const MAX_IMAGE_BASE64_BYTES: u64 = 5 * 1024 * 1024;
/// read: the largest PDF.
pub(crate) const MAX_PDF_BYTES: u64 = 20 * 1024 * 1024;
/// bash: the most output returned, in UTF-16 code units (its start; the rest is saved to a file).
pub(crate) const BASH_OUTPUT_LIMIT: usize = 30_000;
/// bash: the most of a long output saved to its file, in bytes.
pub(crate) const BASH_SAVED_OUTPUT_BYTES: usize = 32 * 1024 * 1024;
/// bash: the timeout when the call sets none, and the most a call may set, in seconds.
pub(crate) const BASH_DEFAULT_TIMEOUT_S: f64 = 295.0;
/// grep: the most output returned, in characters.
pub(crate) const GREP_OUTPUT_LIMIT: usize = 100 * 1024;
/// glob: the most paths returned.
pub(crate) const GLOB_RESULT_LIMIT: usize = 200;
/// glob: the most matches considered (before sorting).
pub(crate) const WALK_MAX_ENTRIES: usize = 50_000;
