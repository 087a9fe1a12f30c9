//! The ETL end to end, into SQLite and into Postgres.
//!
//! Each load is checked against an independent, straightforward computation over the same CSV
//! (written here, not the job's own functions). The Postgres tests need a server: run them
//! through `scripts/with-postgres`, which starts a throwaway one and sets
//! `STAGEPIPE_TEST_POSTGRES`; without it they fail and say so.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::time::Duration;

use stagepipe::Backoff;
use stagepipe_etl::db::{Db, Faults, TopRow};
use stagepipe_etl::job::Config;
use stagepipe_etl::{cli, generator, job, model};

/// A scratch directory for one test, removed when dropped.
struct Scratch(PathBuf);

impl Scratch {
    fn new(name: &str) -> Self {
        let dir = std::env::temp_dir().join(format!("stagepipe-etl-{}-{name}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        Scratch(dir)
    }

    fn csv(&self, rows: usize, seed: u64) -> PathBuf {
        let path = self.0.join(format!("violations-{rows}-{seed}.csv"));
        let file = std::io::BufWriter::new(std::fs::File::create(&path).unwrap());
        generator::generate(&generator::GenConfig::new(rows, seed), file).unwrap();
        path
    }

    fn sqlite_url(&self) -> String {
        format!("sqlite://{}", self.0.join("etl.sqlite").display())
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

// ---------------------------------------------------------------------------------------------
// The independent computation: read the CSV with the csv crate and apply the rules directly.

#[derive(Debug, Default)]
struct Expected {
    read: u64,
    skipped: u64,
    /// Violation rows in the file (duplicates included).
    violation_rows: u64,
    /// Distinct natural keys among violation rows: what lands in the table.
    loaded: u64,
    /// (line, kind) of every malformed row.
    rejects: Vec<(i64, String)>,
    top: Vec<(String, String, i64)>,
}

fn is_date(s: &str) -> bool {
    // YYYY-MM-DD, optionally followed by ' ' or 'T' and HH:MM:SS[.digits], optionally 'Z'.
    let s = s.strip_suffix('Z').unwrap_or(s);
    let (date, time) = match s.split_once([' ', 'T']) {
        Some((d, t)) => (d, Some(t)),
        None => (s, None),
    };
    let parts: Vec<&str> = date.split('-').collect();
    let digits = |p: &str, n: usize| p.len() == n && p.bytes().all(|b| b.is_ascii_digit());
    if parts.len() != 3 || !digits(parts[0], 4) || !digits(parts[1], 2) || !digits(parts[2], 2) {
        return false;
    }
    let (y, m, d): (u32, u32, u32) = (
        parts[0].parse().unwrap(),
        parts[1].parse().unwrap(),
        parts[2].parse().unwrap(),
    );
    let feb = if y % 400 == 0 || (y % 4 == 0 && y % 100 != 0) {
        29
    } else {
        28
    };
    let month_days = [31, feb, 31, 30, 31, 30, 31, 31, 30, 31, 30, 31];
    if y == 0 || !(1..=12).contains(&m) || d == 0 || d > month_days[m as usize - 1] {
        return false;
    }
    match time {
        None => true,
        Some(t) => {
            let (hms, frac) = t.split_once('.').unwrap_or((t, "0"));
            let p: Vec<&str> = hms.split(':').collect();
            p.len() == 3
                && p.iter().all(|x| digits(x, 2))
                && p[0].parse::<u32>().unwrap() < 24
                && p[1].parse::<u32>().unwrap() < 60
                && p[2].parse::<u32>().unwrap() < 60
                && frac.bytes().all(|b| b.is_ascii_digit())
        }
    }
}

/// The key's timestamp as stored: seconds resolution, `T` and fractions dropped.
fn normal_time(s: &str) -> String {
    let s = s.replace('T', " ");
    let s = s
        .split('.')
        .next()
        .unwrap()
        .trim_end_matches('Z')
        .to_string();
    if s.len() == 10 {
        format!("{s} 00:00:00")
    } else {
        s
    }
}

fn expected(path: &Path) -> Expected {
    expected_first(path, u64::MAX)
}

/// [`expected`] over the first `limit` records.
fn expected_first(path: &Path, limit: u64) -> Expected {
    let mut reader = csv::ReaderBuilder::new()
        .flexible(true)
        .from_path(path)
        .unwrap();
    let header: Vec<String> = reader.headers().unwrap().iter().map(String::from).collect();
    let mut e = Expected::default();
    // key -> (businessname, level)
    let mut table: HashMap<(String, String, String), (String, i64)> = HashMap::new();
    for rec in reader
        .records()
        .take(limit.try_into().unwrap_or(usize::MAX))
    {
        let rec = rec.unwrap();
        e.read += 1;
        let line = rec.position().unwrap().line() as i64;
        if rec.len() != header.len() {
            e.rejects.push((line, "column_count".into()));
            continue;
        }
        let f: HashMap<&str, &str> = header
            .iter()
            .map(String::as_str)
            .zip(rec.iter().map(str::trim))
            .collect();
        let violation = f["violation"];
        let mut required = vec!["businessname", "licenseno"];
        if !violation.is_empty() {
            required.extend(["viol_level", "violdttm"]);
        }
        if required.iter().any(|c| f[c].is_empty()) {
            e.rejects.push((line, "missing_field".into()));
            continue;
        }
        let dates = ["issdttm", "expdttm", "resultdttm", "violdttm", "statusdate"];
        if dates.iter().any(|c| !f[c].is_empty() && !is_date(f[c])) {
            e.rejects.push((line, "bad_date".into()));
            continue;
        }
        let level = match f["viol_level"] {
            "" => 0,
            "*" => 1,
            "**" => 2,
            "***" => 3,
            _ => {
                e.rejects.push((line, "unknown_level".into()));
                continue;
            }
        };
        if violation.is_empty() {
            e.skipped += 1;
            continue;
        }
        e.violation_rows += 1;
        let key = (
            f["licenseno"].to_string(),
            normal_time(f["violdttm"]),
            violation.to_string(),
        );
        table
            .entry(key)
            .or_insert((f["businessname"].to_string(), level));
    }
    e.loaded = table.len() as u64;
    let mut severe: BTreeMap<(String, String), i64> = BTreeMap::new();
    for ((licence, _, _), (name, level)) in &table {
        if *level == 3 {
            *severe.entry((licence.clone(), name.clone())).or_default() += 1;
        }
    }
    let mut top: Vec<(String, String, i64)> = severe
        .into_iter()
        .map(|((licence, name), n)| (name, licence, n))
        .collect();
    top.sort_by(|a, b| b.2.cmp(&a.2).then(a.0.cmp(&b.0)).then(a.1.cmp(&b.1)));
    top.truncate(10);
    e.top = top;
    e
}

fn as_tuples(top: &[TopRow]) -> Vec<(String, String, i64)> {
    top.iter()
        .map(|t| (t.businessname.clone(), t.licenseno.clone(), t.severe))
        .collect()
}

// ---------------------------------------------------------------------------------------------
// The scenarios, shared by both databases.

/// First load equals the independent computation; a second run adds nothing.
async fn load_and_reload(url: &str, csv: &Path) {
    let want = expected(csv);
    assert!(
        want.loaded > 1000,
        "the sample should be a few thousand rows"
    );
    assert!(
        want.violation_rows > want.loaded,
        "the sample should hold duplicates"
    );

    let config = Config::new(csv, url);
    let first = job::run(&config).await.unwrap();
    let t = first.totals;
    assert_eq!(t.read, want.read);
    assert_eq!(t.loaded, want.loaded);
    assert_eq!(t.duplicates, want.violation_rows - want.loaded);
    assert_eq!(t.skipped, want.skipped);
    assert_eq!(t.rejected, want.rejects.len() as u64);
    assert_eq!(t.retries, 0);
    assert_eq!(as_tuples(&first.top), want.top);
    assert_eq!(first.top.len(), 10);

    let db = Db::connect(url, 1).await.unwrap();
    assert_eq!(db.count_violations().await.unwrap(), want.loaded as i64);
    assert_eq!(db.count_rejects().await.unwrap(), want.rejects.len() as i64);

    let second = job::run(&config).await.unwrap();
    assert_eq!(second.totals.loaded, 0, "a second run adds no rows");
    assert_eq!(second.totals.duplicates, want.violation_rows);
    assert_eq!(second.totals.rejected, want.rejects.len() as u64);
    assert_eq!(as_tuples(&second.top), want.top);
    assert_eq!(db.count_violations().await.unwrap(), want.loaded as i64);
    assert_eq!(db.count_rejects().await.unwrap(), want.rejects.len() as i64);
    db.close().await;
}

/// Every malformed row lands in `rejects`, at its line, with the right kind and a reason.
async fn rejects_every_kind(url: &str, csv: &Path) {
    let want = expected(csv);
    job::run(&Config::new(csv, url)).await.unwrap();
    let db = Db::connect(url, 1).await.unwrap();
    let got = db.rejects(&job::source_name(csv)).await.unwrap();
    let got_kinds: Vec<(i64, String)> = got.iter().map(|(l, k, _)| (*l, k.clone())).collect();
    assert_eq!(got_kinds, want.rejects);
    let kinds: HashSet<&str> = got.iter().map(|(_, k, _)| k.as_str()).collect();
    assert_eq!(
        kinds,
        HashSet::from(["column_count", "missing_field", "bad_date", "unknown_level"])
    );
    for (line, kind, reason) in &got {
        let ok = match kind.as_str() {
            "column_count" => reason.contains("fields, expected 26"),
            "missing_field" => reason.ends_with("is empty"),
            "bad_date" => reason.contains("is not a date"),
            "unknown_level" => reason.contains("is not *, ** or ***"),
            _ => false,
        };
        assert!(ok, "line {line}: {kind}: {reason}");
    }
    db.close().await;
}

/// A batch whose transaction fails mid-way is retried: nothing lost, nothing doubled. On
/// Postgres the connection is dropped by the server in the middle of the batch's `COPY`.
async fn fault_is_retried(url: &str, csv: &Path) {
    let want = expected(csv);
    let mut config = Config::new(csv, url);
    config.batch_max = 200; // several batches, so the fault hits one in the middle
    config.faults = Faults::fail_call(3);
    let report = job::run(&config).await.unwrap();
    let t = report.totals;
    assert_eq!(t.retries, 1, "the injected fault was retried once");
    if url.starts_with("postgres") {
        assert!(
            config.faults.surfaced(),
            "the COPY itself failed on the dropped connection"
        );
    }
    assert_eq!(config.faults.calls(), t.batches + 1);
    assert!(t.batches > 3);
    assert_eq!(t.loaded, want.loaded);
    assert_eq!(t.duplicates, want.violation_rows - want.loaded);
    assert_eq!(t.rejected, want.rejects.len() as u64);
    assert_eq!(as_tuples(&report.top), want.top);
    let db = Db::connect(url, 1).await.unwrap();
    assert_eq!(db.count_violations().await.unwrap(), want.loaded as i64);
    assert_eq!(db.count_rejects().await.unwrap(), want.rejects.len() as i64);
    db.close().await;
}

/// A fault that does not go away fails the job with a clear error after the attempts.
async fn persistent_fault_is_reported(url: &str, csv: &Path) {
    let mut config = Config::new(csv, url);
    config.retry = Backoff::fixed(Duration::from_millis(1)).max_attempts(1);
    config.faults = Faults::fail_call(1);
    let err = job::run(&config).await.unwrap_err().to_string();
    assert!(err.contains("failed after 1 attempts"), "{err}");
}

/// Every stored row as one string, all 22 columns, in key order: the same text on both
/// databases for the same rows.
async fn table_rows(db: &Db) -> Vec<String> {
    const SQL: &str = "SELECT licenseno || '|' || CAST(violdttm AS TEXT) || '|' || violation \
        || '|' || CAST(viol_level AS TEXT) || '|' || businessname || '|' || dbaname || '|' \
        || legalowner || '|' || licensecat || '|' || descript || '|' || result || '|' \
        || COALESCE(CAST(resultdttm AS TEXT), '-') || '|' || violdesc || '|' || violstatus \
        || '|' || COALESCE(CAST(statusdate AS TEXT), '-') || '|' || comments || '|' || address \
        || '|' || city || '|' || state || '|' || zip || '|' || property_id || '|' || location \
        || '|' || CAST(source_line AS TEXT) FROM violations ORDER BY licenseno, violdttm, violation";
    db.strings(SQL).await.unwrap()
}

/// Rewrites `csv` with the level column named `viollevel` (as in the file the Go ETLs read) and
/// the columns in reverse order: the same records, found by name.
fn renamed_and_reversed(csv: &Path, out: &Path) {
    let mut reader = csv::ReaderBuilder::new()
        .flexible(true)
        .has_headers(false)
        .from_path(csv)
        .unwrap();
    let mut writer = csv::WriterBuilder::new()
        .flexible(true)
        .from_path(out)
        .unwrap();
    for (i, rec) in reader.records().enumerate() {
        let rec = rec.unwrap();
        let mut fields: Vec<String> = rec.iter().map(String::from).collect();
        if i == 0 {
            for f in &mut fields {
                if f == "viol_level" {
                    *f = "viollevel".into();
                }
            }
        }
        // A record of the wrong width stays of the wrong width.
        fields.reverse();
        writer.write_record(&fields).unwrap();
    }
    writer.flush().unwrap();
}

/// Both spellings of the level column, in any column order, load the same rows.
async fn both_header_spellings(url_a: &str, url_b: &str, csv: &Path, scratch: &Path) {
    let other = scratch.join("viollevel-reversed.csv");
    renamed_and_reversed(csv, &other);
    let head = std::fs::read_to_string(&other).unwrap();
    assert!(head.lines().next().unwrap().contains(",viollevel,"));
    let want = expected(csv);
    // One writer each: with several, which of a key's duplicate rows is kept depends on which
    // batch commits first, and this test compares whole rows.
    let one_writer = |input: &Path, url: &str| {
        let mut config = Config::new(input, url);
        config.in_flight = 1;
        config
    };
    let a = job::run(&one_writer(csv, url_a)).await.unwrap().totals;
    let b = job::run(&one_writer(&other, url_b)).await.unwrap().totals;
    assert_eq!(a.loaded, want.loaded);
    assert_eq!(
        (b.read, b.loaded, b.skipped, b.rejected, b.duplicates),
        (a.read, a.loaded, a.skipped, a.rejected, a.duplicates)
    );
    let (da, db) = (
        Db::connect(url_a, 1).await.unwrap(),
        Db::connect(url_b, 1).await.unwrap(),
    );
    let rows = table_rows(&da).await;
    assert_eq!(rows.len() as u64, want.loaded);
    assert_eq!(rows, table_rows(&db).await);
    let levels: HashSet<&str> = rows.iter().map(|r| r.split('|').nth(3).unwrap()).collect();
    assert_eq!(levels, HashSet::from(["1", "2", "3"]));
    let kinds = |r: Vec<(i64, String, String)>| -> Vec<(i64, String)> {
        r.into_iter().map(|(l, k, _)| (l, k)).collect()
    };
    assert_eq!(
        kinds(da.rejects(&job::source_name(csv)).await.unwrap()),
        kinds(db.rejects(&job::source_name(&other)).await.unwrap())
    );
    da.close().await;
    db.close().await;
}

/// Writes `csv` without the column `drop`.
fn without_column(csv: &Path, drop: &str, out: &Path) {
    let mut reader = csv::ReaderBuilder::new()
        .flexible(true)
        .from_path(csv)
        .unwrap();
    let at = reader
        .headers()
        .unwrap()
        .iter()
        .position(|h| h == drop)
        .unwrap();
    let mut writer = csv::WriterBuilder::new()
        .flexible(true)
        .from_path(out)
        .unwrap();
    let strip = |r: &csv::StringRecord| -> Vec<String> {
        r.iter()
            .enumerate()
            .filter(|(i, _)| *i != at)
            .map(|(_, f)| f.to_string())
            .collect()
    };
    writer
        .write_record(strip(&reader.headers().unwrap().clone()))
        .unwrap();
    for rec in reader.records() {
        writer.write_record(strip(&rec.unwrap())).unwrap();
    }
    writer.flush().unwrap();
}

/// A header without a required column is refused with an error naming it, before the
/// database is touched.
async fn missing_column_is_refused(url: &str, csv: &Path, scratch: &Path) -> String {
    let bad = scratch.join("no-violdttm.csv");
    without_column(csv, "violdttm", &bad);
    let err = job::run(&Config::new(&bad, url))
        .await
        .unwrap_err()
        .to_string();
    assert!(err.contains("no column `violdttm`"), "{err}");
    assert!(err.contains("no-violdttm.csv"), "{err}");
    err
}

// ---------------------------------------------------------------------------------------------
// SQLite (embedded: always runs).

const ROWS: usize = 3000;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sqlite_load_matches_independent_count_and_rerun_adds_nothing() {
    let s = Scratch::new("sqlite-load");
    load_and_reload(&s.sqlite_url(), &s.csv(ROWS, 11)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sqlite_rejects_every_malformed_kind_with_reason() {
    let s = Scratch::new("sqlite-rejects");
    rejects_every_kind(&s.sqlite_url(), &s.csv(ROWS, 12)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sqlite_injected_fault_is_retried_without_loss_or_doubling() {
    let s = Scratch::new("sqlite-fault");
    fault_is_retried(&s.sqlite_url(), &s.csv(ROWS, 13)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sqlite_persistent_fault_is_reported() {
    let s = Scratch::new("sqlite-fault-reported");
    persistent_fault_is_reported(&s.sqlite_url(), &s.csv(600, 14)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sequential_baseline_agrees_with_the_job() {
    let s = Scratch::new("sequential");
    let csv = s.csv(ROWS, 15);
    let want = expected(&csv);
    let db = Db::connect(&s.sqlite_url(), 1).await.unwrap();
    db.ensure_schema().await.unwrap();
    let t = job::run_sequential(&csv, &db, 500).await.unwrap();
    assert_eq!(
        (t.read, t.loaded, t.skipped, t.rejected),
        (
            want.read,
            want.loaded,
            want.skipped,
            want.rejects.len() as u64
        )
    );
    assert_eq!(as_tuples(&db.top_severe(10).await.unwrap()), want.top);
    db.close().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sqlite_both_header_spellings_load_the_same_rows() {
    let s = Scratch::new("sqlite-headers");
    let b = format!("sqlite://{}", s.0.join("b.sqlite").display());
    both_header_spellings(&s.sqlite_url(), &b, &s.csv(ROWS, 16), &s.0).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sqlite_missing_column_is_refused_before_the_database_is_created() {
    let s = Scratch::new("sqlite-missing-column");
    let csv = s.csv(300, 17);
    missing_column_is_refused(&s.sqlite_url(), &csv, &s.0).await;
    assert!(
        !s.0.join("etl.sqlite").exists(),
        "no database file was created"
    );
}

/// Another writer holds SQLite's write lock, with some of the file's rows inserted, when the
/// job starts: the job reads on and waits for the lock (no error, no retry), then finds those
/// rows there and counts them as duplicates.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sqlite_waits_for_another_writer_and_counts_its_rows_as_duplicates() {
    const THEIRS: u64 = 25;
    let s = Scratch::new("sqlite-other-writer");
    let csv = s.csv(2000, 21);
    let want = expected(&csv);
    // The rows the other writer adds: the first 25 the job would load, taken from a load into
    // another database.
    let a = s.0.join("a.sqlite");
    job::run(&Config::new(&csv, format!("sqlite://{}", a.display())))
        .await
        .unwrap();
    let url = s.sqlite_url();
    let db = Db::connect(&url, 1).await.unwrap();
    db.ensure_schema().await.unwrap();
    db.close().await;

    let other = rusqlite::Connection::open(s.0.join("etl.sqlite")).unwrap();
    other
        .execute("ATTACH DATABASE ?1 AS a", [a.to_str().unwrap()])
        .unwrap();
    other.execute_batch("BEGIN IMMEDIATE").unwrap();
    let added = other
        .execute(
            &format!(
                "INSERT INTO violations SELECT * FROM a.violations ORDER BY source_line \
                 LIMIT {THEIRS}"
            ),
            [],
        )
        .unwrap();
    assert_eq!(added as u64, THEIRS);

    let mut config = Config::new(&csv, &url);
    config.batch_max = 200;
    let release = async {
        // The job reads several batches ahead while its writer waits for the lock.
        while config
            .progress
            .rows
            .load(std::sync::atomic::Ordering::Relaxed)
            < 600
        {
            tokio::task::yield_now().await;
        }
        other.execute_batch("COMMIT").unwrap();
    };
    let (report, ()) = tokio::join!(job::run(&config), release);
    drop(other);
    let report = report.unwrap();
    let t = report.totals;
    assert_eq!(t.retries, 0, "waited for the lock, did not fail");
    assert_eq!(t.loaded, want.loaded - THEIRS);
    assert_eq!(t.duplicates, want.violation_rows - want.loaded + THEIRS);
    assert_eq!(t.rejected, want.rejects.len() as u64);
    assert_eq!(as_tuples(&report.top), want.top);
    let db = Db::connect(&url, 1).await.unwrap();
    assert_eq!(db.count_violations().await.unwrap(), want.loaded as i64);
    db.close().await;
}

/// A new database is made with 16 KiB pages; one made before with SQLite's default 4 KiB
/// pages keeps them and loads the same rows.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sqlite_page_size_of_new_and_existing_databases() {
    let s = Scratch::new("sqlite-page-size");
    let csv = s.csv(1000, 22);
    let want = expected(&csv);
    let page_size = |path: &Path| -> i64 {
        rusqlite::Connection::open(path)
            .unwrap()
            .query_row("PRAGMA page_size", [], |r| r.get(0))
            .unwrap()
    };
    let old = s.0.join("old.sqlite");
    rusqlite::Connection::open(&old)
        .unwrap()
        .execute_batch("PRAGMA page_size = 4096; CREATE TABLE other (x INTEGER)")
        .unwrap();
    for (path, size) in [(s.0.join("etl.sqlite"), 16384), (old, 4096)] {
        let report = job::run(&Config::new(&csv, format!("sqlite://{}", path.display())))
            .await
            .unwrap();
        assert_eq!(report.totals.loaded, want.loaded);
        assert_eq!(as_tuples(&report.top), want.top);
        assert_eq!(page_size(&path), size, "{}", path.display());
    }
}

/// A closed SQLite database refuses further calls with an error that is not retried.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sqlite_closed_database_refuses_calls() {
    let s = Scratch::new("sqlite-closed");
    let db = Db::connect(&s.sqlite_url(), 1).await.unwrap();
    db.ensure_schema().await.unwrap();
    assert_eq!(db.count_violations().await.unwrap(), 0);
    db.close().await;
    let err = db.count_violations().await.unwrap_err();
    assert!(matches!(err, stagepipe_etl::db::Error::Closed), "{err:?}");
    assert!(!stagepipe_etl::db::is_transient(&err));
    assert_eq!(err.to_string(), "the SQLite connection is closed");
}

/// Runs the command line with `args`: (exit code, stdout, stderr).
async fn cli(args: &[&str]) -> (u8, String, String) {
    let (mut out, mut err) = (Vec::new(), Vec::new());
    let argv = std::iter::once("stagepipe-etl").chain(args.iter().copied());
    let code = cli::run(argv, &mut out, &mut err).await;
    (
        code,
        String::from_utf8(out).unwrap(),
        String::from_utf8(err).unwrap(),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cli_help_exits_0_on_stdout_with_the_defaults() {
    let (code, out, err) = cli(&["--help"]).await;
    assert_eq!(code, 0);
    assert_eq!(err, "");
    for s in [
        "Usage: stagepipe-etl [OPTIONS] [FILE]",
        "DATABASE_URL",
        "[default: sqlite://etl.sqlite]",
        "--batch",
        "--workers",
        "--writers",
        "--limit",
        "--json",
        "--generate",
    ] {
        assert!(out.contains(s), "{s} missing from:\n{out}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cli_limit_and_json_load_the_first_records_and_report_them() {
    let s = Scratch::new("cli-limit");
    let csv = s.csv(ROWS, 18);
    let url = s.sqlite_url();
    let want = expected_first(&csv, 1000);
    let (code, out, err) = cli(&[
        csv.to_str().unwrap(),
        "--db",
        &url,
        "--limit",
        "1000",
        "--batch",
        "300",
        "--json",
        "--quiet",
    ])
    .await;
    assert_eq!((code, err.as_str()), (0, ""));
    assert_eq!(out.lines().count(), 1, "one JSON object on one line: {out}");
    let j: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(j["read"], 1000);
    assert_eq!(j["loaded"], want.loaded);
    assert_eq!(j["skipped"], want.skipped);
    assert_eq!(j["rejected"], want.rejects.len() as u64);
    assert_eq!(j["duplicates"], want.violation_rows - want.loaded);
    assert_eq!(j["batch"], 300);
    assert_eq!(j["writers"], 1);
    assert_eq!(j["backend"], "sqlite");
    assert_eq!(j["limit"], 1000);
    assert!(j["wal_peak_bytes"].as_u64().unwrap() > 0);
    let top: Vec<(String, String, i64)> = j["top"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| {
            (
                t["businessname"].as_str().unwrap().to_string(),
                t["licenseno"].as_str().unwrap().to_string(),
                t["severe"].as_i64().unwrap(),
            )
        })
        .collect();
    assert_eq!(top, want.top);
    let db = Db::connect(&url, 1).await.unwrap();
    assert_eq!(db.count_violations().await.unwrap(), want.loaded as i64);
    let lines = db.rejects(&job::source_name(&csv)).await.unwrap();
    assert_eq!(
        lines
            .iter()
            .map(|(l, k, _)| (*l, k.clone()))
            .collect::<Vec<_>>(),
        want.rejects
    );
    db.close().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cli_without_a_file_loads_the_built_in_sample() {
    let s = Scratch::new("cli-sample");
    let url = s.sqlite_url();
    let (code, out, err) = cli(&["--db", &url, "--json", "--quiet"]).await;
    assert_eq!((code, err.as_str()), (0, ""));
    let j: serde_json::Value = serde_json::from_str(&out).unwrap();
    let want = expected(Path::new(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/data/violations-sample.csv"
    )));
    assert_eq!(j["input"], "violations-sample.csv (built in)");
    assert_eq!(j["read"], want.read);
    assert_eq!(j["loaded"], want.loaded);
    assert_eq!(j["rejected"], want.rejects.len() as u64);
    assert_eq!(cli::SAMPLE.len() as u64, {
        let path = concat!(env!("CARGO_MANIFEST_DIR"), "/data/violations-sample.csv");
        std::fs::metadata(path).unwrap().len()
    });
}

/// `--graph` prints the pipeline as it ran: every record enters `Parse`, the rejects leave
/// there as errors, the rest go through `Transform` and `Route` to done.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cli_graph_prints_the_routes_taken_with_their_counts() {
    let s = Scratch::new("cli-graph");
    let url = s.sqlite_url();
    let (code, out, err) = cli(&["--db", &url, "--graph", "--quiet"]).await;
    assert_eq!((code, err.as_str()), (0, ""));
    let want = expected(Path::new(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/data/violations-sample.csv"
    )));
    let graph = out.split("```mermaid\n").nth(1).expect("a mermaid block");
    let parsed = want.read - want.rejects.len() as u64;
    assert!(graph.starts_with("flowchart LR\n"), "{graph}");
    for edge in [
        format!("start -->|{}| s1", want.read),
        format!("s1 -->|{parsed}| s2"),
        format!("s1 -->|{}| failed", want.rejects.len()),
        format!("s3 -->|{parsed}| done"),
    ] {
        assert!(graph.contains(&edge), "{edge} in {graph}");
    }
    assert!(graph.trim_end().ends_with("```"));

    let (code, out, _) = cli(&["--db", &url, "--graph", "dot", "--quiet"]).await;
    assert_eq!(code, 0);
    let dot = &out[out.find("digraph pipeline {").expect("a DOT graph")..];
    assert!(dot.contains(&format!("s1 -> failed [label=\"{}\"];", want.rejects.len())));
    assert!(dot.trim_end().ends_with('}'));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cli_errors_are_one_line_and_non_zero() {
    let s = Scratch::new("cli-errors");
    let url = s.sqlite_url();
    let missing = s.0.join("no-such-file.csv");
    let (code, out, err) = cli(&[missing.to_str().unwrap(), "--db", &url]).await;
    assert_eq!(code, 1);
    assert_eq!(out, "");
    assert_eq!(
        err.lines().count(),
        2,
        "the loading line and one error: {err}"
    );
    let last = err.lines().last().unwrap();
    assert!(last.starts_with("error: cannot open"), "{err}");
    assert!(last.contains("no-such-file.csv"), "{err}");
    assert!(
        !s.0.join("etl.sqlite").exists(),
        "checked before connecting"
    );

    let (code, out, err) = cli(&["--batch", "0"]).await;
    assert_eq!((code, out.as_str()), (2, ""));
    assert_eq!(err.lines().count(), 1, "{err}");
    assert!(err.contains("--batch"), "{err}");
    let (code, _, err) = cli(&["--bogus"]).await;
    assert_eq!(code, 2);
    assert_eq!(err.lines().count(), 1, "{err}");

    let csv = s.csv(200, 19);
    let (code, _, err) = cli(&[csv.to_str().unwrap(), "--db", "mysql://x", "--quiet"]).await;
    assert_eq!(code, 1);
    assert_eq!(err.lines().count(), 1, "{err}");
    assert!(
        err.starts_with("error: ") && err.contains("unsupported database URL"),
        "{err}"
    );
}

#[test]
fn generator_is_deterministic_and_shaped_like_the_real_file() {
    let gen_bytes = |rows, seed| {
        let mut out = Vec::new();
        generator::generate(&generator::GenConfig::new(rows, seed), &mut out).unwrap();
        String::from_utf8(out).unwrap()
    };
    let a = gen_bytes(2000, 3);
    assert_eq!(a, gen_bytes(2000, 3));
    assert_ne!(a, gen_bytes(2000, 4));
    assert!(a.starts_with(&(model::HEADER.join(",") + "\n")));
    assert!(a.contains(",***,") && a.contains(",**,") && a.contains(",*,"));
    // Quoted fields holding commas, quotes and newlines.
    assert!(a.contains("\"Raw chicken stored above ready-to-eat produce.\nRe-organize"));
    assert!(a.contains("\"\"back door\"\""));
    assert!(a.contains(", Inc.\""));
    // The shipped sample is the generator's output.
    let sample = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/data/violations-sample.csv"
    ))
    .unwrap();
    assert_eq!(sample, gen_bytes(4000, 1));
}

#[test]
fn independent_date_check_agrees_on_edge_cases() {
    for (s, ok) in [
        ("2016-02-29 10:00:00", true),
        ("2015-02-29 10:00:00", false),
        ("2019-02-30 10:00:00", false),
        ("2015-13-45 25:61:00", false),
        ("20190304", false),
        ("last tuesday", false),
        ("2015-01-01T10:00:00.123", true),
    ] {
        assert_eq!(is_date(s), ok, "{s}");
        assert_eq!(model::Timestamp::parse(s).is_some(), ok, "{s}");
    }
}

// ---------------------------------------------------------------------------------------------
// Postgres (a real server: run through scripts/with-postgres).

/// A fresh database on the test server for one test.
async fn pg_database(name: &str) -> String {
    let base = std::env::var("STAGEPIPE_TEST_POSTGRES")
        .ok()
        .or_else(|| {
            std::env::var("DATABASE_URL")
                .ok()
                .filter(|u| u.starts_with("postgres"))
        })
        .unwrap_or_else(|| {
            panic!(
                "the Postgres tests need a PostgreSQL server: run them through \
                 `scripts/with-postgres cargo test -p stagepipe-etl` from the repository's \
                 root (it starts a throwaway local server), or set \
                 STAGEPIPE_TEST_POSTGRES=postgres://user@host:port/db"
            )
        });
    let admin = sqlx::postgres::PgPoolOptions::new()
        .max_connections(1)
        .connect(&base)
        .await
        .unwrap_or_else(|e| panic!("cannot connect to the test server {base}: {e}"));
    let db = format!("etl_test_{name}");
    sqlx::query(&format!("DROP DATABASE IF EXISTS {db} WITH (FORCE)"))
        .execute(&admin)
        .await
        .unwrap();
    sqlx::query(&format!("CREATE DATABASE {db}"))
        .execute(&admin)
        .await
        .unwrap();
    admin.close().await;
    let (prefix, _) = base.rsplit_once('/').expect("a database URL has a path");
    let query = base
        .split_once('?')
        .map(|(_, q)| format!("?{q}"))
        .unwrap_or_default();
    format!("{prefix}/{db}{query}")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_load_matches_independent_count_and_rerun_adds_nothing() {
    let url = pg_database("load").await;
    let s = Scratch::new("pg-load");
    load_and_reload(&url, &s.csv(ROWS, 21)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_rejects_every_malformed_kind_with_reason() {
    let url = pg_database("rejects").await;
    let s = Scratch::new("pg-rejects");
    rejects_every_kind(&url, &s.csv(ROWS, 22)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_dropped_connection_is_retried_without_loss_or_doubling() {
    let url = pg_database("fault").await;
    let s = Scratch::new("pg-fault");
    fault_is_retried(&url, &s.csv(ROWS, 23)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_persistent_fault_is_reported() {
    let url = pg_database("fault_reported").await;
    let s = Scratch::new("pg-fault-reported");
    persistent_fault_is_reported(&url, &s.csv(600, 24)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_both_header_spellings_load_the_same_rows() {
    let a = pg_database("headers_a").await;
    let b = pg_database("headers_b").await;
    let s = Scratch::new("pg-headers");
    both_header_spellings(&a, &b, &s.csv(ROWS, 25), &s.0).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_missing_column_is_refused_before_any_table_is_created() {
    let url = pg_database("missing_column").await;
    let s = Scratch::new("pg-missing-column");
    missing_column_is_refused(&url, &s.csv(300, 26), &s.0).await;
    let pool = sqlx::postgres::PgPoolOptions::new()
        .max_connections(1)
        .connect(&url)
        .await
        .unwrap();
    let tables: i64 = sqlx::query_scalar(
        "SELECT COUNT(*) FROM information_schema.tables WHERE table_schema = 'public'",
    )
    .fetch_one(&pool)
    .await
    .unwrap();
    assert_eq!(tables, 0);
    pool.close().await;
}

/// Small batches, several writers: every batch through its own `COPY`, in parallel, and a
/// re-run adds nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_copy_with_several_writers_then_rerun_adds_nothing() {
    let url = pg_database("writers").await;
    let s = Scratch::new("pg-writers");
    let csv = s.csv(ROWS, 27);
    let want = expected(&csv);
    let mut config = Config::new(&csv, &url);
    config.batch_max = 100;
    config.in_flight = 4;
    let first = job::run(&config).await.unwrap().totals;
    assert!(first.batches > 10);
    assert_eq!(first.loaded, want.loaded);
    assert_eq!(first.duplicates, want.violation_rows - want.loaded);
    let second = job::run(&config).await.unwrap().totals;
    assert_eq!((second.loaded, second.duplicates), (0, want.violation_rows));
    let db = Db::connect(&url, 1).await.unwrap();
    assert_eq!(db.count_violations().await.unwrap(), want.loaded as i64);
    assert_eq!(db.count_rejects().await.unwrap(), want.rejects.len() as i64);
    db.close().await;
}

/// A file without duplicates is copied in one pass, straight into the table; loading it again
/// finds every key there, so every batch goes through the staging table and adds nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_copies_in_one_pass_until_keys_are_already_there() {
    let url = pg_database("etl_one_pass").await;
    let s = Scratch::new("pg-one-pass");
    let csv = s.0.join("unique.csv");
    let mut file = generator::GenConfig::new(2000, 23);
    file.duplicate_every = 0;
    generator::generate(
        &file,
        std::io::BufWriter::new(std::fs::File::create(&csv).unwrap()),
    )
    .unwrap();
    let want = expected(&csv);
    assert_eq!(want.violation_rows, want.loaded, "no key twice in the file");

    let db = Db::connect(&url, 3).await.unwrap();
    db.ensure_schema().await.unwrap();
    let mut config = Config::new(&csv, &url);
    config.batch_max = 200;
    let (first, _) = job::load(&db, &config).await.unwrap();
    assert_eq!(first.loaded, want.loaded);
    assert_eq!(first.rejected, want.rejects.len() as u64);
    assert!(first.batches >= 6, "{first:?}");
    assert_eq!(db.staged_batches(), 0, "every batch in one pass");
    // Every value as SQLite stores the same file (timestamps, levels and lines included).
    let lite = s.sqlite_url();
    job::run(&Config::new(&csv, &lite)).await.unwrap();
    let lite = Db::connect(&lite, 1).await.unwrap();
    let rows = table_rows(&db).await;
    assert_eq!(rows.len() as u64, want.loaded);
    assert_eq!(rows, table_rows(&lite).await);
    lite.close().await;

    let (second, _) = job::load(&db, &config).await.unwrap();
    assert_eq!((second.loaded, second.duplicates), (0, want.violation_rows));
    assert_eq!(second.retries, 0);
    assert_eq!(db.staged_batches(), second.batches, "every batch staged");
    assert_eq!(db.count_violations().await.unwrap(), want.loaded as i64);
    assert_eq!(db.count_rejects().await.unwrap(), want.rejects.len() as i64);
    db.close().await;
}
