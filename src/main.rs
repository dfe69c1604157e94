#![forbid(unsafe_code)]

#[tokio::main]
async fn main() -> std::process::ExitCode {
    tollgate::cli::main().await
}
