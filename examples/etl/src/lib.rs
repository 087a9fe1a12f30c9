//! stagepipe's main example: Boston's food-inspection violations, from CSV through a staged
//! pipeline into SQLite or Postgres, then the question "where not to eat?".
//!
//! The program (`src/main.rs`, `cargo run --release -p stagepipe-etl`) is a thin `main` around
//! [`cli::run`]; the tests and the benchmark drive these same modules.
//!
//! * [`cli`]: the command line, the report, the progress bar.
//! * [`job`]: the job: the CSV streamed through the staged pipeline into the database.
//! * [`model`]: parse/validate, transform and route, one CSV record at a time.
//! * [`db`]: one API over SQLite and Postgres.
//! * [`generator`]: a deterministic generator of files shaped like the real one.

pub mod cli;
pub mod db;
pub mod generator;
pub mod job;
pub mod model;
