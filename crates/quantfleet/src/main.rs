//! `quantfleet`: one binary for every Quantfleet role. Each subcommand lives in its own module under `cmd/`.

mod cmd;

use clap::{Parser, Subcommand};

#[derive(Parser, Debug)]
#[command(name = "quantfleet", version, about = "Precision-tiered LLM serving fleets on Kubernetes")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Write the CustomResourceDefinitions generated from the Rust types (or check committed ones).
    Crdgen(cmd::crdgen::Args),
    /// Plan memory for a QuantizedModel's tiers on its accelerator, without a cluster.
    Plan(cmd::plan::Args),
    /// Run the QuantizedModel and PrecisionPolicy controllers.
    Operator(cmd::operator::Args),
    /// Download a checkpoint and verify its SHA-256 (the init container of https:// model sources).
    Fetch(cmd::fetch::Args),
    /// Serve one model at one tier over gRPC (Generate, Score, ModelInfo, health) with Prometheus metrics.
    Node(cmd::node::Args),
    /// Print the quality table of the precision tiers on the CPU engine (perplexity, KLD, top-1, memory).
    Eval(cmd::eval::Args),
    /// Serve the OpenAI-compatible router over a static configuration (policy and node endpoints).
    Router(cmd::router::Args),
    /// Run the local fleet: fetch the bundled model, start a node per sample tier and the router.
    Up(cmd::up::Args),
}

fn main() -> std::process::ExitCode {
    let cli = Cli::parse();
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .init();
    let result = match cli.command {
        Command::Crdgen(args) => cmd::crdgen::run(args),
        Command::Plan(args) => cmd::plan::run(args),
        Command::Operator(args) => cmd::operator::run_operator(args),
        Command::Fetch(args) => cmd::fetch::run(args),
        Command::Node(args) => cmd::node::run(args),
        Command::Eval(args) => cmd::eval::run(args),
        Command::Router(args) => cmd::router::run(args),
        Command::Up(args) => cmd::up::run(args),
    };
    match result {
        Ok(code) => code,
        Err(err) => {
            eprintln!("error: {err:#}");
            std::process::ExitCode::from(2)
        }
    }
}
