//! The `ballast` binary.

#![forbid(unsafe_code)]

// mimalloc: fast, and musl's allocator is slow under threads.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> std::process::ExitCode {
    node::cli::main()
}
