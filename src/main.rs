//! The `refine-poi` binary: a thin command-line layer over the library.

use clap::Parser;
use refine_poi::commands::Cli;

fn main() {
    refine_poi::runtime::tune();
    let cli = Cli::parse();
    if let Err(err) = refine_poi::runtime::on_command_pool(|| refine_poi::commands::run(cli)) {
        // One clear message, no backtrace: `{:#}` prints the whole context chain on one line.
        eprintln!("error: {err:#}");
        std::process::exit(1);
    }
}
