//! The `dagrun` binary: the engine's commands with this build's stage kinds.

use clap::{Parser, Subcommand};
use dagrun_engine::cli::{self, GlobalArgs};

#[derive(Parser)]
#[command(name = "dagrun", version, about = "Declarative DAG pipelines for training reasoning models, cached by content")]
struct Cli {
    #[command(flatten)]
    globals: GlobalArgs,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    #[command(flatten)]
    Engine(cli::Command),
}

fn main() {
    let args = cli::expand_shorthand(std::env::args_os().collect(), &[]);
    let parsed = Cli::parse_from(args);
    let registry = dagrun_stages::registry();
    let code = match parsed.command {
        Command::Engine(cmd) => cli::execute(cmd, &parsed.globals, &registry),
    };
    std::process::exit(code);
}
