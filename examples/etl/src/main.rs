//! ETL of food-inspection violations into SQLite (default) or Postgres: "where not to eat?".
//!
//! ```text
//! cargo run --release -p stagepipe-etl                          # the built-in sample into etl.sqlite
//! cargo run --release -p stagepipe-etl -- path/to/file.csv      # the real file (or any like it)
//! cargo run --release -p stagepipe-etl -- --db postgres://user@host/db
//! cargo run --release -p stagepipe-etl -- --generate etl-data/big.csv --rows 2000000
//! cargo run --release -p stagepipe-etl -- --help                # every option and its default
//! ```
//!
//! `RUST_LOG` selects the tracing events shown on stderr (default `etl=warn,stagepipe=warn`),
//! e.g. `RUST_LOG=etl=debug,stagepipe=info`.

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
    let code = stagepipe_etl::cli::run(
        std::env::args_os(),
        &mut std::io::stdout().lock(),
        &mut std::io::stderr(),
    )
    .await;
    ExitCode::from(code)
}
