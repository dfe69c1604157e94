#![forbid(unsafe_code)]

/// glibc's allocator was the largest user-space cost under webhook load
/// (docs/performance.md); mimalloc is the usual remedy for many-threaded
/// Rust servers.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[tokio::main]
async fn main() -> std::process::ExitCode {
    tollgate::cli::main().await
}
