//! Process-wide allocator settings for the programs that move NARs.

/// Limits glibc to two malloc arenas. glibc gives every thread that
/// allocates an arena of its own, and an arena keeps what its thread
/// freed; the transfer engine runs a restoring (and, compressed, a zstd)
/// thread per stream, each moving 256 KiB chunks, so resident memory grew
/// with the number of threads that ever ran rather than with what is in use
/// (an agent receiving a compressed 8-stream upload: 70 MiB, 42 MiB with
/// two arenas, at the same speed). Call it first thing in `main`, before
/// any thread starts.
pub fn limit_malloc_arenas() {
    const ARENAS: libc::c_int = 2;
    // SAFETY: mallopt only adjusts allocator parameters and touches no
    // memory of ours; the return value only says whether it took.
    let _ = unsafe { libc::mallopt(libc::M_ARENA_MAX, ARENAS) };
}
