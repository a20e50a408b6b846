//! The `ferry` binary.

use clap::Parser;

fn main() {
    let cli = vmm::cli::Cli::parse();
    std::process::exit(vmm::cli::main_with(cli));
}
