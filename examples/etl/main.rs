//! ETL of food-inspection violations into SQLite (default) or Postgres: "where not to eat?".
//!
//! ```text
//! cargo run --release --example etl                          # the built-in sample into etl.sqlite
//! cargo run --release --example etl -- path/to/file.csv      # the real file (or any like it)
//! cargo run --release --example etl -- --db postgres://user@host/db
//! cargo run --release --example etl -- --generate etl-data/big.csv --rows 2000000
//! cargo run --release --example etl -- --help                # every option and its default
//! ```
//!
//! `RUST_LOG` selects the tracing events shown on stderr (default `etl=warn,stagepipe=warn`),
//! e.g. `RUST_LOG=etl=debug,stagepipe=info`.

mod cli;
// The modules are shared with the integration tests and the benchmark, which use more of them.
#[allow(dead_code)]
mod db;
mod generator;
#[allow(dead_code)]
mod job;
#[allow(dead_code)]
mod model;

use std::process::ExitCode;

#[tokio::main]
async fn main() -> ExitCode {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("etl=warn,stagepipe=warn"));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    let code = cli::run(
        std::env::args_os(),
        &mut std::io::stdout().lock(),
        &mut std::io::stderr(),
    )
    .await;
    ExitCode::from(code)
}
