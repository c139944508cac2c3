//! Stockade: a self-hosted tool-execution sandbox for AI agent sessions.
//!
//! The binary (`src/main.rs`) is a thin CLI over this library, so tests and benchmarks exercise
//! the same code paths as operators do.

pub mod control_plane;
pub mod jail;
pub mod net;
pub mod policy;
pub mod probe;
pub mod session;
pub mod tools;
pub mod util;
pub mod worker;
