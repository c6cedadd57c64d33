//! The `dagrun` binary: the engine's commands with this build's stage kinds.

use clap::{Parser, Subcommand};
use dagrun_engine::cli::{self, GlobalArgs};

#[derive(Parser)]
#[command(
    name = "dagrun",
    version,
    about = "Declarative DAG pipelines for training reasoning models, cached by content"
)]
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
    /// Generate a completion with a model (`node.model` or a Hugging Face directory).
    Generate(dagrun_stages::cli::GenerateArgs),
    /// Time training steps and KV-cache generation of a random model of the given shape.
    Bench(dagrun_stages::cli::BenchArgs),
    /// Write report.html and report.md of a pipeline's latest run (the DAG, times, curves,
    /// evaluation); every run also writes one into its directory.
    Report(dagrun_report::cli::ReportArgs),
    /// Serve a model (`node.model` or a Hugging Face directory) over an OpenAI-compatible HTTP
    /// API: /v1/chat/completions, /v1/completions, /v1/models, /health.
    Serve(dagrun_serve::ServeArgs),
}

fn main() {
    let args = cli::expand_shorthand(
        std::env::args_os().collect(),
        &["generate", "bench", "report", "serve"],
    );
    let parsed = Cli::parse_from(args);
    let registry = dagrun_stages::registry();
    let code = match parsed.command {
        Command::Engine(cmd) => cli::execute_with(
            cmd,
            &parsed.globals,
            &registry,
            &dagrun_report::cli::after_run,
        ),
        Command::Generate(a) => {
            cli::init_logging(&parsed.globals);
            dagrun_stages::cli::generate_command(a, &parsed.globals)
        }
        Command::Bench(a) => {
            cli::init_logging(&parsed.globals);
            dagrun_stages::cli::bench_command(a)
        }
        Command::Serve(a) => {
            cli::init_logging(&parsed.globals);
            dagrun_serve::serve_command(a, &parsed.globals)
        }
        Command::Report(a) => dagrun_report::cli::report_command(a, &parsed.globals, &registry),
    };
    std::process::exit(code);
}
