//! The command line: arguments, the run, the report (text or JSON), the progress bar.
//!
//! [`run`] takes the arguments and the two output streams, so that the tests drive the very
//! code `main` runs.

use std::ffi::OsString;
use std::io::Write;
use std::num::NonZeroUsize;
use std::path::PathBuf;
use std::sync::Arc;

use clap::{Parser, ValueEnum};

use crate::generator;
use crate::job::{self, Config, Input, Progress, Report};

/// The sample shipped with the crate (generated with `--rows 4000 --seed 1`), built into the
/// program: the first command works wherever the program was built or moved.
pub const SAMPLE: &[u8] = include_bytes!("../data/violations-sample.csv");

/// The name under which the sample's rejects are stored.
pub const SAMPLE_NAME: &str = "violations-sample.csv";

/// Load Boston's food-inspection violations (CSV) into SQLite or Postgres through a staged
/// pipeline, then answer: where not to eat?
///
/// Records are parsed and validated, typed and routed in parallel on a worker pool, then
/// written in batches, one transaction each, retried on transient database errors. Malformed
/// rows go to the table `rejects` with their line and reason; loading the same file again adds
/// nothing.
// The field docs are the `--help` text, written for a terminal: `[:PASSWORD]` is no link.
#[allow(rustdoc::broken_intra_doc_links)]
#[derive(Debug, Parser)]
#[command(
    name = "stagepipe-etl",
    after_help = "Examples:
  stagepipe-etl                                    load the built-in sample into ./etl.sqlite
  stagepipe-etl food-inspections.csv               the real file, as downloaded
  stagepipe-etl food.csv --db postgres://user:pw@localhost/food
  stagepipe-etl --generate big.csv --rows 2000000  write a generated file to load

With cargo, from the repository: cargo run --release -p stagepipe-etl -- [OPTIONS] [FILE]

RUST_LOG=etl=debug,stagepipe=info shows the job's and the crate's tracing events on stderr."
)]
pub struct Args {
    /// The CSV to load: the real file (header `viol_level` or `viollevel`, columns in any
    /// order) or a generated one [default: the 4,000-row sample built into the program]
    #[arg(value_name = "FILE")]
    pub input: Option<PathBuf>,

    /// Database URL: sqlite://FILE (created if missing) or postgres://USER[:PASSWORD]@HOST/DB
    #[arg(
        long,
        value_name = "URL",
        env = "DATABASE_URL",
        hide_env_values = true,
        default_value = "sqlite://etl.sqlite"
    )]
    pub db: String,

    /// Rows per batch, one transaction each [default: 10000 into SQLite, 2000 into Postgres]
    #[arg(long, value_name = "N")]
    pub batch: Option<NonZeroUsize>,

    /// Pool workers that parse, validate and transform [default: one per core]
    #[arg(long, value_name = "N")]
    pub workers: Option<NonZeroUsize>,

    /// Batches written at once [default: 1 into SQLite (a single-writer database), 3 into
    /// Postgres]
    #[arg(long, value_name = "N", alias = "in-flight")]
    pub writers: Option<NonZeroUsize>,

    /// Read only the first N records of the file
    #[arg(long, value_name = "N")]
    pub limit: Option<u64>,

    /// Print the summary as one JSON object on stdout, instead of the report
    #[arg(long)]
    pub json: bool,

    /// No progress bar, no "loading" line
    #[arg(long, short)]
    pub quiet: bool,

    /// After the report, print the staged pipeline as it ran (stages, routes taken, counts): a
    /// Mermaid flowchart, or Graphviz DOT with --graph dot
    #[arg(
        long,
        value_name = "FORMAT",
        num_args = 0..=1,
        default_missing_value = "mermaid",
        conflicts_with = "json"
    )]
    pub graph: Option<GraphFormat>,

    /// Write a generated file of the real file's shape to OUT instead of loading (see --rows,
    /// --seed)
    #[arg(long, value_name = "OUT", conflicts_with_all = ["input", "limit", "json"])]
    pub generate: Option<PathBuf>,

    /// Rows to generate
    #[arg(long, value_name = "N", default_value_t = 4000, requires = "generate")]
    pub rows: usize,

    /// Seed of the generated file (the same seed and rows give the same bytes)
    #[arg(long, value_name = "S", default_value_t = 1, requires = "generate")]
    pub seed: u64,
}

/// How `--graph` draws the pipeline.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum GraphFormat {
    /// A Mermaid flowchart in a fenced block (GitHub draws it).
    Mermaid,
    /// Graphviz DOT (`dot -Tsvg` draws it).
    Dot,
}

/// Runs the command with `args` (the program name first): the report or the JSON summary to
/// `out`; help to `out`; errors, one line each, and the progress bar to `err`. Returns the exit
/// code: 0 on success, 1 when the job fails, 2 on a usage error.
pub async fn run<I, T>(args: I, out: &mut dyn Write, err: &mut dyn Write) -> u8
where
    I: IntoIterator<Item = T>,
    T: Into<OsString> + Clone,
{
    let args = match Args::try_parse_from(args) {
        Ok(a) => a,
        Err(e) => {
            use clap::error::ErrorKind;
            return match e.kind() {
                ErrorKind::DisplayHelp | ErrorKind::DisplayVersion => {
                    let _ = write!(out, "{e}");
                    0
                }
                _ => {
                    let first = e.to_string();
                    let first = first.lines().next().unwrap_or("error").trim();
                    let _ = writeln!(err, "{first} (see --help)");
                    2
                }
            };
        }
    };
    if let Some(path) = &args.generate {
        return match generate(path, args.rows, args.seed) {
            Ok(()) => {
                if !args.quiet {
                    let _ = writeln!(err, "wrote {} rows to {}", args.rows, path.display());
                }
                0
            }
            Err(e) => {
                let _ = writeln!(err, "error: {}: {e}", path.display());
                1
            }
        };
    }
    let input = match &args.input {
        Some(path) => Input::Path(path.clone()),
        None => Input::Bytes {
            name: SAMPLE_NAME.to_string(),
            data: SAMPLE,
        },
    };
    let mut config = Config::with_input(input, args.db.clone());
    if let Some(n) = args.batch {
        config.batch_max = n.get();
    }
    if let Some(n) = args.writers {
        config.in_flight = n.get();
    }
    config.workers = args.workers.map(NonZeroUsize::get);
    config.limit = args.limit;
    if !args.quiet {
        let _ = writeln!(
            err,
            "loading {} into {} (batches of {}, {} writer{})",
            config.input,
            redact(&config.db_url),
            config.batch_max,
            config.in_flight,
            if config.in_flight == 1 { "" } else { "s" }
        );
    }
    let bar = progress(config.progress.clone(), args.limit, args.quiet);
    let result = job::run(&config).await;
    drop(bar);
    match result {
        Ok(report) => {
            let written = if args.json {
                writeln!(out, "{}", summary(&config, &report))
            } else {
                print_report(out, &report).and_then(|()| match args.graph {
                    Some(GraphFormat::Mermaid) => {
                        writeln!(out, "\n```mermaid\n{}```", report.graph.mermaid())
                    }
                    Some(GraphFormat::Dot) => writeln!(out, "\n{}", report.graph.dot()),
                    None => Ok(()),
                })
            };
            match written {
                Ok(()) => 0,
                Err(e) => {
                    let _ = writeln!(err, "error: cannot write the report: {e}");
                    1
                }
            }
        }
        Err(e) => {
            let _ = writeln!(err, "error: {}", one_line(&e.to_string()));
            1
        }
    }
}

/// `s` on one line.
fn one_line(s: &str) -> String {
    s.split_whitespace().collect::<Vec<_>>().join(" ")
}

fn generate(out: &PathBuf, rows: usize, seed: u64) -> std::io::Result<()> {
    if let Some(dir) = out.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir)?;
    }
    let file = std::io::BufWriter::new(std::fs::File::create(out)?);
    generator::generate(&generator::GenConfig::new(rows, seed), file)
}

/// Hides a password in a database URL.
pub fn redact(url: &str) -> String {
    match (url.find("://"), url.rfind('@')) {
        (Some(s), Some(at)) if at > s => match url[s + 3..at].find(':') {
            Some(c) => format!("{}:***{}", &url[..s + 3 + c], &url[at..]),
            None => url.to_string(),
        },
        _ => url.to_string(),
    }
}

/// The machine-readable summary: one JSON object.
pub fn summary(config: &Config, r: &Report) -> serde_json::Value {
    let t = &r.totals;
    let secs = r.elapsed.as_secs_f64();
    serde_json::json!({
        "input": config.input.to_string(),
        "database": redact(&config.db_url),
        "backend": r.backend,
        "batch": config.batch_max,
        "writers": config.in_flight,
        "limit": config.limit,
        "read": t.read,
        "loaded": t.loaded,
        "skipped": t.skipped,
        "rejected": t.rejected,
        "duplicates": t.duplicates,
        "batches": t.batches,
        "retries": t.retries,
        "elapsed_s": secs,
        "rows_per_s": if secs > 0.0 { t.read as f64 / secs } else { 0.0 },
        "wal_peak_bytes": (r.backend == "sqlite").then_some(r.wal_peak),
        "top": r.top.iter().map(|row| serde_json::json!({
            "businessname": row.businessname,
            "licenseno": row.licenseno,
            "severe": row.severe,
        })).collect::<Vec<_>>(),
    })
}

fn print_report(out: &mut dyn Write, r: &Report) -> std::io::Result<()> {
    let t = &r.totals;
    let secs = r.elapsed.as_secs_f64().max(1e-9);
    writeln!(out, "\nstages:\n{}", r.stats)?;
    writeln!(
        out,
        "\nread {}, loaded {}, skipped {} (no violation), rejected {} (see table rejects), \
         duplicates {} in {:.2?} ({:.0} rows/s; {} batches, {} retried)",
        t.read,
        t.loaded,
        t.skipped,
        t.rejected,
        t.duplicates,
        r.elapsed,
        t.read as f64 / secs,
        t.batches,
        t.retries
    )?;
    if r.backend == "sqlite" {
        writeln!(
            out,
            "largest write-ahead log: {:.1} MiB",
            r.wal_peak as f64 / (1 << 20) as f64
        )?;
    }
    writeln!(
        out,
        "\nwhere not to eat: the 10 businesses with the most severe (***) violations"
    )?;
    let width = r
        .top
        .iter()
        .map(|t| t.businessname.len())
        .max()
        .unwrap_or(8);
    for (i, row) in r.top.iter().enumerate() {
        writeln!(
            out,
            "{:>2}. {:<width$}  licence {:<8} {:>5}",
            i + 1,
            row.businessname,
            row.licenseno,
            row.severe
        )?;
    }
    Ok(())
}

/// A progress bar on stderr while the returned guard lives: records done (committed or
/// skipped), rows/s, and the ETA from the share of the input done, or of `limit` records.
fn progress(p: Arc<Progress>, limit: Option<u64>, quiet: bool) -> Option<impl Drop> {
    use std::sync::atomic::Ordering;
    use std::time::Duration;

    if quiet {
        return None;
    }
    let bar = indicatif::ProgressBar::new(1);
    bar.set_style(
        indicatif::ProgressStyle::with_template(
            "{spinner} [{elapsed_precise}] [{wide_bar}] {percent:>3}% ETA {eta} {msg}",
        )
        .expect("a valid template")
        .progress_chars("=> "),
    );
    let ticker = {
        let bar = bar.clone();
        tokio::spawn(async move {
            let started = std::time::Instant::now();
            loop {
                tokio::time::sleep(Duration::from_millis(200)).await;
                let done = p.done.load(Ordering::Relaxed);
                match limit {
                    // Records of a known count...
                    Some(n) => {
                        bar.set_length(n.max(1));
                        bar.set_position(done.min(n));
                    }
                    // ...or the bytes of the input whose records are done.
                    None => {
                        bar.set_length(p.total_bytes.load(Ordering::Relaxed).max(1));
                        bar.set_position(p.bytes_done());
                    }
                }
                let rate = done as f64 / started.elapsed().as_secs_f64().max(1e-9);
                bar.set_message(format!("{done} rows, {rate:.0} rows/s"));
            }
        })
    };
    struct Guard(indicatif::ProgressBar, tokio::task::JoinHandle<()>);
    impl Drop for Guard {
        fn drop(&mut self) {
            self.1.abort();
            self.0.finish_and_clear();
        }
    }
    Some(Guard(bar, ticker))
}
