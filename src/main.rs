mod cli;

// The shipped binary is static musl (see Containerfile). musl's own allocator maps and unmaps
// small groups of pages as they fill and empty (~110 mmap/munmap calls to start one jail, each
// followed by fresh page faults), which cost `stockade run` ~0.4 ms per jail. dlmalloc (pure
// Rust) takes memory in large chunks and keeps it. Its lock is a plain mutex with no fork
// handler, which the jail respects: the supervisor is single-threaded when it clones the jail,
// and the jail's init has no threads; the supervisor's network-namespace helper shares its
// memory but never allocates (see jail::netif).
#[cfg(target_env = "musl")]
#[global_allocator]
static ALLOC: dlmalloc::GlobalDlmalloc = dlmalloc::GlobalDlmalloc;

fn main() {
    std::process::exit(cli::main());
}
