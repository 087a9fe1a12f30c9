//! `stagepipe-queue`: `produce --jobs N` adds jobs to a Redis stream; `consume` works them off
//! as one of any number of consumer processes (see the crate's docs).

use clap::Parser;
use stagepipe_queue::config::{Cli, Command, ConsumeConfig};
use stagepipe_queue::{consumer, producer};
use tracing_subscriber::EnvFilter;

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error + Send + Sync>> {
    tracing_subscriber::fmt()
        .with_env_filter(EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()))
        .with_writer(std::io::stderr)
        .init();
    let cli = Cli::parse();
    match &cli.command {
        Command::Produce { jobs, first } => {
            let mut conn = stagepipe::redis::connect(&cli.redis).await?;
            let ids = producer::produce(&mut conn, &cli.stream, *first, *jobs).await?;
            println!("{}", serde_json::json!({ "produced": ids.len() }));
        }
        Command::Consume(args) => {
            let cfg = ConsumeConfig::new(&cli.redis, &cli.stream, &cli.group, args);
            tracing::info!(consumer = %cfg.consumer, stream = %cfg.stream, "consuming");
            let shutdown = async {
                let _ = tokio::signal::ctrl_c().await;
            };
            let summary = consumer::consume(&cfg, shutdown).await?;
            println!("{}", summary.to_json());
        }
    }
    Ok(())
}
