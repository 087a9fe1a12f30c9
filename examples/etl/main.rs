//! ETL of food-inspection violations into SQLite (default) or Postgres: "where not to eat?".
//!
//! ```text
//! cargo run --release --example etl                          # the shipped sample into etl.sqlite
//! cargo run --release --example etl -- path/to/file.csv      # the real file (or any like it)
//! cargo run --release --example etl -- --db postgres://user@host/db
//! cargo run --release --example etl -- --generate etl-data/big.csv --rows 200000 [--seed 7]
//! ```
//!
//! Options: `--db URL` (default `$DATABASE_URL`, else `sqlite://etl.sqlite`), `--in-flight N`
//! (batched inserts at once), `--batch N` (rows per insert), `--quiet` (no progress bar).

// The modules are shared with the integration tests and the benchmark, which use more of them.
#[allow(dead_code)]
mod db;
mod generator;
#[allow(dead_code)]
mod job;
#[allow(dead_code)]
mod model;

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;

use job::{Config, Progress, Report};

/// The sample shipped with the crate (generated with `--rows 4000 --seed 1`).
const SAMPLE: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/data/violations-sample.csv");

struct Args {
    input: PathBuf,
    db: Option<String>,
    in_flight: Option<usize>,
    batch: Option<usize>,
    quiet: bool,
    generate: Option<PathBuf>,
    rows: usize,
    seed: u64,
}

fn parse_args() -> Result<Args, String> {
    let mut args = Args {
        input: PathBuf::from(SAMPLE),
        db: None,
        in_flight: None,
        batch: None,
        quiet: false,
        generate: None,
        rows: 4000,
        seed: 1,
    };
    let mut it = std::env::args().skip(1);
    while let Some(a) = it.next() {
        let mut value = |name: &str| it.next().ok_or_else(|| format!("{name} needs a value"));
        match a.as_str() {
            "--db" => args.db = Some(value("--db")?),
            "--in-flight" => args.in_flight = Some(number(&value("--in-flight")?)?),
            "--batch" => args.batch = Some(number(&value("--batch")?)?),
            "--generate" => args.generate = Some(value("--generate")?.into()),
            "--rows" => args.rows = number(&value("--rows")?)?,
            "--seed" => args.seed = number(&value("--seed")?)? as u64,
            "--quiet" | "-q" => args.quiet = true,
            "--help" | "-h" => return Err(String::new()),
            s if s.starts_with('-') => return Err(format!("unknown option {s}")),
            path => args.input = path.into(),
        }
    }
    Ok(args)
}

fn number(s: &str) -> Result<usize, String> {
    s.parse().map_err(|_| format!("not a number: {s:?}"))
}

const USAGE: &str = "usage: etl [FILE.csv] [--db URL] [--in-flight N] [--batch N] [--quiet]
       etl --generate OUT.csv [--rows N] [--seed S]";

#[tokio::main]
async fn main() -> ExitCode {
    let args = match parse_args() {
        Ok(a) => a,
        Err(e) => {
            if !e.is_empty() {
                eprintln!("error: {e}");
            }
            eprintln!("{USAGE}");
            return ExitCode::from(2);
        }
    };
    if let Some(out) = &args.generate {
        return generate(out, args.rows, args.seed);
    }
    let db = args
        .db
        .clone()
        .or_else(|| std::env::var("DATABASE_URL").ok())
        .unwrap_or_else(|| "sqlite://etl.sqlite".to_string());
    let mut config = Config::new(&args.input, db);
    if let Some(n) = args.in_flight {
        config.in_flight = n.max(1);
    }
    if let Some(n) = args.batch {
        config.batch_max = n.max(1);
    }
    eprintln!(
        "loading {} into {}",
        args.input.display(),
        redact(&config.db_url)
    );
    let bar = progress(config.progress.clone(), args.quiet);
    let result = job::run(&config).await;
    drop(bar);
    match result {
        Ok(report) => {
            print_report(&report);
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::FAILURE
        }
    }
}

fn generate(out: &PathBuf, rows: usize, seed: u64) -> ExitCode {
    let write = || -> std::io::Result<()> {
        if let Some(dir) = out.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir)?;
        }
        let file = std::io::BufWriter::new(std::fs::File::create(out)?);
        generator::generate(&generator::GenConfig::new(rows, seed), file)
    };
    match write() {
        Ok(()) => {
            eprintln!("wrote {rows} rows to {}", out.display());
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("error: {}: {e}", out.display());
            ExitCode::FAILURE
        }
    }
}

/// Hides a password in a database URL.
fn redact(url: &str) -> String {
    match (url.find("://"), url.rfind('@')) {
        (Some(s), Some(at)) if at > s => match url[s + 3..at].find(':') {
            Some(c) => format!("{}:***{}", &url[..s + 3 + c], &url[at..]),
            None => url.to_string(),
        },
        _ => url.to_string(),
    }
}

fn print_report(r: &Report) {
    let t = &r.totals;
    let secs = r.elapsed.as_secs_f64().max(1e-9);
    println!("\nstages:\n{}", r.stats);
    println!(
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
    );
    println!("\nwhere not to eat: the 10 businesses with the most severe (***) violations");
    let width = r
        .top
        .iter()
        .map(|t| t.businessname.len())
        .max()
        .unwrap_or(8);
    for (i, row) in r.top.iter().enumerate() {
        println!(
            "{:>2}. {:<width$}  licence {:<8} {:>5}",
            i + 1,
            row.businessname,
            row.licenseno,
            row.severe
        );
    }
}

/// A progress bar on stderr (rows/s and ETA by bytes read), while the returned guard lives.
#[cfg(feature = "progress")]
fn progress(p: Arc<Progress>, quiet: bool) -> Option<impl Drop> {
    use std::sync::atomic::Ordering;
    use std::time::Duration;

    if quiet {
        return None;
    }
    let bar = indicatif::ProgressBar::new(p.total_bytes.load(Ordering::Relaxed).max(1));
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
                tokio::time::sleep(Duration::from_millis(100)).await;
                let total = p.total_bytes.load(Ordering::Relaxed);
                if total > 0 {
                    bar.set_length(total);
                }
                bar.set_position(p.bytes.load(Ordering::Relaxed));
                let rows = p.rows.load(Ordering::Relaxed);
                let rate = rows as f64 / started.elapsed().as_secs_f64().max(1e-9);
                bar.set_message(format!("{rows} rows, {rate:.0} rows/s"));
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

/// Without the `progress` feature: no bar.
#[cfg(not(feature = "progress"))]
fn progress(_: Arc<Progress>, _: bool) -> Option<NoBar> {
    None
}

/// The guard of the absent progress bar.
#[cfg(not(feature = "progress"))]
struct NoBar;

#[cfg(not(feature = "progress"))]
impl Drop for NoBar {
    fn drop(&mut self) {}
}
