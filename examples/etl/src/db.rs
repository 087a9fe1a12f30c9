//! The database layer: one API over SQLite and Postgres (sqlx).
//!
//! * The schema is created if missing.
//! * `violations` has a natural key, (`licenseno`, `violdttm`, `violation`); inserts are
//!   `ON CONFLICT DO NOTHING`, so loading the same input twice adds nothing, and the rows a
//!   batch did not add are counted as duplicates.
//! * `rejects` keeps every malformed row with its source, line, kind and reason, keyed on
//!   (`source`, `line`) so that re-runs do not repeat them either.
//! * A batch (its rows and its rejects) is written in one transaction: it lands whole or not
//!   at all, so retrying a failed batch neither loses nor doubles a row.
//! * SQLite: WAL with `synchronous=NORMAL`; rows go in through multi-row `INSERT`s of a few
//!   fixed sizes, so each is prepared once per connection and reused by every batch. With one
//!   writer (the default) the WAL is checkpointed after every commit and stays bounded by
//!   about one batch; its peak size is measured ([`Db::wal_peak`]).
//! * Postgres: a batch is `COPY`ed into a temporary staging table (one per connection,
//!   emptied at each commit), then moved with `INSERT ... SELECT ... ON CONFLICT DO NOTHING`,
//!   so keys and duplicates behave exactly as with plain inserts.

use std::collections::HashMap;
use std::fmt::Write as _;
use std::path::PathBuf;
use std::str::FromStr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use sqlx::postgres::{PgPool, PgPoolOptions};
use sqlx::sqlite::SqliteArguments;
use sqlx::sqlite::{
    SqliteConnectOptions, SqliteJournalMode, SqlitePool, SqlitePoolOptions, SqliteSynchronous,
};
use sqlx::{Arguments, Executor, Postgres, QueryBuilder, Sqlite};

use crate::model::{Inspection, Reject};

/// A connected database: SQLite (a file, no server) or Postgres.
#[derive(Clone, Debug)]
pub enum Db {
    /// An SQLite file.
    Sqlite(SqlitePool, Wal),
    /// A Postgres server.
    Postgres(PgPool),
}

/// The write-ahead log of an SQLite database: where it is, and the largest size seen after a
/// commit.
#[derive(Clone, Debug, Default)]
pub struct Wal {
    path: Option<PathBuf>,
    peak: Arc<AtomicU64>,
}

impl Wal {
    fn observe(&self) {
        if let Some(len) = self
            .path
            .as_ref()
            .and_then(|p| std::fs::metadata(p).ok())
            .map(|m| m.len())
        {
            self.peak.fetch_max(len, Ordering::Relaxed);
        }
    }
}

/// A batch's violation rows made ready for the database ahead of their turn to be written:
/// the bound values of each SQLite statement, or the `COPY` text for Postgres. Built while the
/// previous batch is being written, so that the writer only writes.
#[derive(Debug, Default)]
pub struct Ready {
    /// The rows: kept for SQLite (a retry binds them again), dropped once encoded for Postgres.
    rows: Vec<Inspection>,
    /// How many rows.
    len: usize,
    /// SQLite: the statements' sizes and values, taken by the first attempt.
    statements: Mutex<Option<Vec<(usize, SqliteArguments<'static>)>>>,
    /// Postgres: the rows in `COPY`'s text format (sent again by a retry).
    copy: Vec<u8>,
}

impl Ready {
    /// The number of violation rows.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether there are no violation rows.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }
}

/// The values of `rows` for [`sqlite_insert`], in the order of [`COLUMNS`].
fn sqlite_values(rows: &[Inspection]) -> SqliteArguments<'static> {
    let mut a = SqliteArguments::default();
    a.reserve(rows.len() * 22, 0);
    let ts = |t: &Option<crate::model::Timestamp>| t.map(|t| t.to_string());
    for r in rows {
        let mut add = |v: Option<String>| a.add(v).expect("text always encodes");
        add(Some(r.licenseno.clone()));
        add(ts(&r.violdttm));
        add(Some(r.violation.clone()));
        a.add(i32::from(r.level.unwrap_or(0)))
            .expect("an integer always encodes");
        let mut add = |v: Option<String>| a.add(v).expect("text always encodes");
        for s in [
            &r.businessname,
            &r.dbaname,
            &r.legalowner,
            &r.licensecat,
            &r.descript,
            &r.result,
        ] {
            add(Some(s.clone()));
        }
        add(ts(&r.resultdttm));
        add(Some(r.violdesc.clone()));
        add(Some(r.violstatus.clone()));
        add(ts(&r.statusdate));
        for s in [
            &r.comments,
            &r.address,
            &r.city,
            &r.state,
            &r.zip,
            &r.property_id,
            &r.location,
        ] {
            add(Some(s.clone()));
        }
        a.add(r.line as i64).expect("an integer always encodes");
    }
    a
}

/// The statements of `rows` for SQLite: (rows, values) per statement.
fn sqlite_statements(rows: &[Inspection]) -> Vec<(usize, SqliteArguments<'static>)> {
    let mut rest = rows;
    statement_sizes(rows.len())
        .map(|n| {
            let (chunk, tail) = rest.split_at(n);
            rest = tail;
            (n, sqlite_values(chunk))
        })
        .collect()
}

/// What one batch did.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Written {
    /// Violation rows added.
    pub inserted: u64,
    /// Violation rows whose natural key was already there.
    pub duplicates: u64,
    /// Reject rows added.
    pub rejects: u64,
}

/// One row of the answer: a business and its count of severe (`***`) violations.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TopRow {
    /// Business name.
    pub businessname: String,
    /// Licence number.
    pub licenseno: String,
    /// Severe violations on record.
    pub severe: i64,
}

/// Makes one chosen insert call fail after its statements ran (so its transaction is rolled
/// back), to show that a failed batch is retried without loss or doubling.
///
/// On Postgres the failure is real: half of the batch's `COPY` data is sent, then the server is
/// asked (from another connection) to terminate the copying connection, and the rest is sent
/// into the dropped connection. On SQLite an I/O error is returned before the commit.
#[derive(Clone, Debug, Default)]
pub struct Faults {
    fail_call: Option<u64>,
    calls: Arc<AtomicU64>,
    /// Whether the database itself reported the injected failure (the dropped connection).
    surfaced: Arc<std::sync::atomic::AtomicBool>,
}

impl Faults {
    /// No fault.
    pub fn none() -> Self {
        Faults::default()
    }

    /// The `n`th insert call (1-based, counting retries) fails once.
    pub fn fail_call(n: u64) -> Self {
        Faults {
            fail_call: Some(n),
            ..Faults::default()
        }
    }

    /// Insert calls made so far (retries included).
    pub fn calls(&self) -> u64 {
        self.calls.load(Ordering::SeqCst)
    }

    /// Whether the injected failure came from the database (on Postgres: the `COPY` failed on
    /// the terminated connection), not from the fallback error.
    pub fn surfaced(&self) -> bool {
        self.surfaced.load(Ordering::SeqCst)
    }

    fn fire(&self) -> bool {
        let n = self.calls.fetch_add(1, Ordering::SeqCst) + 1;
        self.fail_call == Some(n)
    }
}

/// Whether a database error is worth retrying: lost connections, pool time-outs, lock
/// contention, serialization failures, deadlocks, server shut-downs.
pub fn is_transient(e: &sqlx::Error) -> bool {
    match e {
        sqlx::Error::Io(_) | sqlx::Error::PoolTimedOut | sqlx::Error::WorkerCrashed => true,
        sqlx::Error::Database(db) => match db.code().as_deref() {
            // SQLite: BUSY, LOCKED (and their extended codes).
            Some(c)
                if c.parse::<u32>()
                    .is_ok_and(|n| n & 0xff == 5 || n & 0xff == 6) =>
            {
                true
            }
            // Postgres: serialization failure, deadlock, admin shutdown, connection exceptions.
            Some("40001" | "40P01" | "57P01" | "57P02" | "57P03") => true,
            Some(c) => c.starts_with("08"),
            None => false,
        },
        _ => false,
    }
}

const COLUMNS: &str = "licenseno, violdttm, violation, viol_level, businessname, dbaname, \
    legalowner, licensecat, descript, result, resultdttm, violdesc, violstatus, statusdate, \
    comments, address, city, state, zip, property_id, location, source_line";

fn schema(ts: &str) -> [String; 3] {
    [
        format!(
            "CREATE TABLE IF NOT EXISTS violations (
                licenseno TEXT NOT NULL,
                violdttm {ts} NOT NULL,
                violation TEXT NOT NULL,
                viol_level INTEGER NOT NULL,
                businessname TEXT NOT NULL,
                dbaname TEXT NOT NULL,
                legalowner TEXT NOT NULL,
                licensecat TEXT NOT NULL,
                descript TEXT NOT NULL,
                result TEXT NOT NULL,
                resultdttm {ts},
                violdesc TEXT NOT NULL,
                violstatus TEXT NOT NULL,
                statusdate {ts},
                comments TEXT NOT NULL,
                address TEXT NOT NULL,
                city TEXT NOT NULL,
                state TEXT NOT NULL,
                zip TEXT NOT NULL,
                property_id TEXT NOT NULL,
                location TEXT NOT NULL,
                source_line BIGINT NOT NULL,
                PRIMARY KEY (licenseno, violdttm, violation)
            )"
        ),
        "CREATE TABLE IF NOT EXISTS rejects (
            source TEXT NOT NULL,
            line BIGINT NOT NULL,
            kind TEXT NOT NULL,
            reason TEXT NOT NULL,
            raw TEXT NOT NULL,
            PRIMARY KEY (source, line)
        )"
        .to_string(),
        "CREATE INDEX IF NOT EXISTS violations_by_level ON violations (viol_level, licenseno)"
            .to_string(),
    ]
}

/// The staging table of `COPY` on Postgres: temporary (one per connection), emptied at every
/// commit, without keys.
const STAGE: &str = "CREATE TEMP TABLE IF NOT EXISTS violations_stage (
    licenseno TEXT, violdttm TIMESTAMP, violation TEXT, viol_level INTEGER, businessname TEXT,
    dbaname TEXT, legalowner TEXT, licensecat TEXT, descript TEXT, result TEXT,
    resultdttm TIMESTAMP, violdesc TEXT, violstatus TEXT, statusdate TIMESTAMP, comments TEXT,
    address TEXT, city TEXT, state TEXT, zip TEXT, property_id TEXT, location TEXT,
    source_line BIGINT
) ON COMMIT DELETE ROWS";

/// Appends `rows` to `out` in `COPY`'s text format, in the order of [`COLUMNS`].
fn copy_text(rows: &[Inspection], out: &mut Vec<u8>) {
    fn text(out: &mut Vec<u8>, s: &str) {
        let b = s.as_bytes();
        if !b.iter().any(|c| matches!(c, b'\\' | b'\t' | b'\n' | b'\r')) {
            out.extend_from_slice(b);
            return;
        }
        for &c in b {
            match c {
                b'\\' => out.extend_from_slice(b"\\\\"),
                b'\t' => out.extend_from_slice(b"\\t"),
                b'\n' => out.extend_from_slice(b"\\n"),
                b'\r' => out.extend_from_slice(b"\\r"),
                c => out.push(c),
            }
        }
    }
    fn ts(out: &mut Vec<u8>, t: &Option<crate::model::Timestamp>) {
        match t {
            Some(t) => {
                let mut s = String::with_capacity(19);
                let _ = write!(s, "{t}");
                out.extend_from_slice(s.as_bytes());
            }
            None => out.extend_from_slice(b"\\N"),
        }
    }
    for r in rows {
        let tab = |out: &mut Vec<u8>| out.push(b'\t');
        text(out, &r.licenseno);
        tab(out);
        ts(out, &r.violdttm);
        tab(out);
        text(out, &r.violation);
        tab(out);
        out.push(b'0' + r.level.unwrap_or(0));
        for s in [
            &r.businessname,
            &r.dbaname,
            &r.legalowner,
            &r.licensecat,
            &r.descript,
            &r.result,
        ] {
            tab(out);
            text(out, s);
        }
        tab(out);
        ts(out, &r.resultdttm);
        for s in [&r.violdesc, &r.violstatus] {
            tab(out);
            text(out, s);
        }
        tab(out);
        ts(out, &r.statusdate);
        for s in [
            &r.comments,
            &r.address,
            &r.city,
            &r.state,
            &r.zip,
            &r.property_id,
            &r.location,
        ] {
            tab(out);
            text(out, s);
        }
        tab(out);
        let _ = write!(Adapter(out), "{}", r.line);
        out.push(b'\n');
    }
}

/// `fmt::Write` into a byte buffer.
struct Adapter<'a>(&'a mut Vec<u8>);

impl std::fmt::Write for Adapter<'_> {
    fn write_str(&mut self, s: &str) -> std::fmt::Result {
        self.0.extend_from_slice(s.as_bytes());
        Ok(())
    }
}

/// The multi-row `INSERT` of `n` rows into SQLite, built once and kept: the same text is the
/// same prepared statement in every connection's statement cache.
fn sqlite_insert(n: usize) -> &'static str {
    static CACHE: OnceLock<Mutex<HashMap<usize, &'static str>>> = OnceLock::new();
    let mut cache = CACHE
        .get_or_init(Mutex::default)
        .lock()
        .unwrap_or_else(|e| e.into_inner());
    cache.entry(n).or_insert_with(|| {
        let one = format!("({})", vec!["?"; 22].join(","));
        let sql = format!(
            "INSERT INTO violations ({COLUMNS}) VALUES {} \
             ON CONFLICT (licenseno, violdttm, violation) DO NOTHING",
            vec![one.as_str(); n].join(",")
        );
        Box::leak(sql.into_boxed_str())
    })
}

/// Splits `len` rows into statements of [`ROWS_PER_STATEMENT`] rows, then of decreasing powers
/// of two: a handful of distinct statements, each prepared once.
fn statement_sizes(mut len: usize) -> impl Iterator<Item = usize> {
    std::iter::from_fn(move || {
        if len == 0 {
            return None;
        }
        let n = if len >= ROWS_PER_STATEMENT {
            ROWS_PER_STATEMENT
        } else {
            1 << (usize::BITS - 1 - len.leading_zeros())
        };
        len -= n;
        Some(n)
    })
}

macro_rules! push_rejects {
    ($qb:expr, $source:expr, $rejects:expr) => {{
        $qb.push_values($rejects, |mut b, r: &Reject| {
            b.push_bind($source)
                .push_bind(r.line as i64)
                .push_bind(r.kind.as_str())
                .push_bind(r.reason.as_str())
                .push_bind(r.raw.as_str());
        });
        $qb.push(" ON CONFLICT (source, line) DO NOTHING");
    }};
}

/// Rows per multi-row `INSERT` statement (keeps the bound parameters, 22 per row, under
/// every backend's limit).
const ROWS_PER_STATEMENT: usize = 1024;

impl Db {
    /// Connects to `url` (`sqlite://path` creates the file if missing; `postgres://...`),
    /// with at most `connections` connections.
    pub async fn connect(url: &str, connections: u32) -> Result<Db, sqlx::Error> {
        if url.starts_with("postgres://") || url.starts_with("postgresql://") {
            let pool = PgPoolOptions::new()
                .max_connections(connections)
                .acquire_timeout(Duration::from_secs(30))
                .after_connect(|conn, _| {
                    Box::pin(async move {
                        conn.execute(STAGE).await?;
                        Ok(())
                    })
                })
                .connect(url)
                .await?;
            Ok(Db::Postgres(pool))
        } else if url.starts_with("sqlite:") {
            let options = SqliteConnectOptions::from_str(url)?
                .create_if_missing(true)
                .journal_mode(SqliteJournalMode::Wal)
                .synchronous(SqliteSynchronous::Normal)
                .busy_timeout(Duration::from_secs(30))
                // Bulk loading: a larger page cache (64 MiB) and statement journals in memory
                // instead of a temporary file per transaction.
                .pragma("cache_size", "-65536")
                .pragma("temp_store", "memory")
                // A WAL grown past 64 MiB (by a huge batch) is cut back after a checkpoint.
                .pragma("journal_size_limit", "67108864");
            let path = options.get_filename();
            let wal = Wal {
                path: (path != std::path::Path::new(":memory:"))
                    .then(|| PathBuf::from(format!("{}-wal", path.display()))),
                peak: Arc::default(),
            };
            let pool = SqlitePoolOptions::new()
                .max_connections(connections)
                .connect_with(options)
                .await?;
            Ok(Db::Sqlite(pool, wal))
        } else {
            Err(sqlx::Error::Configuration(
                format!("unsupported database URL {url:?}: use sqlite://FILE or postgres://...")
                    .into(),
            ))
        }
    }

    /// The largest size the SQLite WAL file had after a commit (0 on Postgres).
    pub fn wal_peak(&self) -> u64 {
        match self {
            Db::Sqlite(_, wal) => wal.peak.load(Ordering::Relaxed),
            Db::Postgres(_) => 0,
        }
    }

    /// Makes `rows` ready to be written by [`write_batch`](Self::write_batch).
    pub fn ready(&self, rows: Vec<Inspection>) -> Ready {
        let len = rows.len();
        match self {
            Db::Sqlite(..) => Ready {
                statements: Mutex::new(Some(sqlite_statements(&rows))),
                rows,
                len,
                copy: Vec::new(),
            },
            Db::Postgres(_) => {
                let mut copy = Vec::with_capacity(len * 320);
                copy_text(&rows, &mut copy);
                Ready {
                    len,
                    copy,
                    ..Ready::default()
                }
            }
        }
    }

    /// `"sqlite"` or `"postgres"`.
    pub fn backend(&self) -> &'static str {
        match self {
            Db::Sqlite(..) => "sqlite",
            Db::Postgres(_) => "postgres",
        }
    }

    /// Creates the tables and index if they are missing.
    pub async fn ensure_schema(&self) -> Result<(), sqlx::Error> {
        match self {
            Db::Sqlite(p, _) => {
                for stmt in schema("TEXT") {
                    sqlx::query(&stmt).execute(p).await?;
                }
            }
            Db::Postgres(p) => {
                for stmt in schema("TIMESTAMP") {
                    sqlx::query(&stmt).execute(p).await?;
                }
            }
        }
        Ok(())
    }

    /// Writes one batch, its violation rows (made [`ready`](Self::ready)) and its rejects, in
    /// one transaction.
    pub async fn write_batch(
        &self,
        source: &str,
        rows: &Ready,
        rejects: &[Reject],
        faults: &Faults,
    ) -> Result<Written, sqlx::Error> {
        let fail = faults.fire();
        let mut w = Written::default();
        match self {
            Db::Sqlite(p, wal) => {
                // Take the write lock at once: a second writer waits here, not halfway through.
                let mut tx = p.begin_with("BEGIN IMMEDIATE").await?;
                let statements = rows
                    .statements
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .take()
                    .unwrap_or_else(|| sqlite_statements(&rows.rows));
                for (n, values) in statements {
                    w.inserted += sqlx::query_with(sqlite_insert(n), values)
                        .execute(&mut *tx)
                        .await?
                        .rows_affected();
                }
                for chunk in rejects.chunks(ROWS_PER_STATEMENT) {
                    let mut qb = QueryBuilder::<Sqlite>::new(
                        "INSERT INTO rejects (source, line, kind, reason, raw) ",
                    );
                    push_rejects!(qb, source, chunk);
                    w.rejects += qb.build().execute(&mut *tx).await?.rows_affected();
                }
                if fail {
                    // Dropping `tx` rolls the batch back.
                    return Err(sqlx::Error::Io(std::io::Error::new(
                        std::io::ErrorKind::ConnectionReset,
                        "injected fault: connection reset before commit",
                    )));
                }
                // With one writer, the commit also checkpoints the WAL (SQLite's automatic
                // checkpoint at 1000 pages), which then starts over at the next batch.
                tx.commit().await?;
                wal.observe();
            }
            Db::Postgres(p) => {
                let mut tx = p.begin().await?;
                if !rows.is_empty() {
                    let data = &rows.copy;
                    let pid: Option<i32> = if fail {
                        Some(
                            sqlx::query_scalar("SELECT pg_backend_pid()")
                                .fetch_one(&mut *tx)
                                .await?,
                        )
                    } else {
                        None
                    };
                    let mut copy = tx
                        .copy_in_raw(&format!("COPY violations_stage ({COLUMNS}) FROM STDIN"))
                        .await?;
                    if let Some(pid) = pid {
                        // A real dropped connection in the middle of the COPY: half the data
                        // is sent, the server terminates the backend, the rest is sent.
                        let half = data.len() / 2;
                        copy.send(&data[..half]).await?;
                        sqlx::query("SELECT pg_terminate_backend($1, 10000)")
                            .bind(pid)
                            .execute(p)
                            .await?;
                        let rest = async {
                            copy.send(&data[half..]).await?;
                            copy.finish().await
                        };
                        if let Err(e) = rest.await {
                            faults.surfaced.store(true, Ordering::SeqCst);
                            return Err(e);
                        }
                    } else {
                        copy.send(data.as_slice()).await?;
                        copy.finish().await?;
                    }
                    w.inserted = sqlx::query(&format!(
                        "INSERT INTO violations ({COLUMNS}) SELECT {COLUMNS} FROM violations_stage \
                         ON CONFLICT (licenseno, violdttm, violation) DO NOTHING"
                    ))
                    .execute(&mut *tx)
                    .await?
                    .rows_affected();
                }
                for chunk in rejects.chunks(ROWS_PER_STATEMENT) {
                    let mut qb = QueryBuilder::<Postgres>::new(
                        "INSERT INTO rejects (source, line, kind, reason, raw) ",
                    );
                    push_rejects!(qb, source, chunk);
                    w.rejects += qb.build().execute(&mut *tx).await?.rows_affected();
                }
                if fail {
                    return Err(sqlx::Error::Io(std::io::Error::new(
                        std::io::ErrorKind::ConnectionReset,
                        "injected fault: the server did not drop the connection",
                    )));
                }
                tx.commit().await?;
            }
        }
        w.duplicates = rows.len() as u64 - w.inserted;
        Ok(w)
    }

    /// Ends a load: on SQLite, checkpoints the whole WAL into the database and truncates it, so
    /// that the file is complete on its own when the job ends. Nothing on Postgres.
    pub async fn checkpoint(&self) -> Result<(), sqlx::Error> {
        if let Db::Sqlite(p, wal) = self {
            wal.observe();
            sqlx::query("PRAGMA wal_checkpoint(TRUNCATE)")
                .execute(p)
                .await?;
        }
        Ok(())
    }

    /// Rows in `violations`.
    pub async fn count_violations(&self) -> Result<i64, sqlx::Error> {
        self.scalar("SELECT COUNT(*) FROM violations").await
    }

    /// Rows in `rejects`.
    pub async fn count_rejects(&self) -> Result<i64, sqlx::Error> {
        self.scalar("SELECT COUNT(*) FROM rejects").await
    }

    async fn scalar(&self, sql: &str) -> Result<i64, sqlx::Error> {
        match self {
            Db::Sqlite(p, _) => sqlx::query_scalar(sql).fetch_one(p).await,
            Db::Postgres(p) => sqlx::query_scalar(sql).fetch_one(p).await,
        }
    }

    /// Every reject of `source` as (line, kind, reason), by line.
    pub async fn rejects(&self, source: &str) -> Result<Vec<(i64, String, String)>, sqlx::Error> {
        match self {
            Db::Sqlite(p, _) => {
                sqlx::query_as(
                    "SELECT line, kind, reason FROM rejects WHERE source = ? ORDER BY line",
                )
                .bind(source)
                .fetch_all(p)
                .await
            }
            Db::Postgres(p) => {
                sqlx::query_as(
                    "SELECT line, kind, reason FROM rejects WHERE source = $1 ORDER BY line",
                )
                .bind(source)
                .fetch_all(p)
                .await
            }
        }
    }

    /// The answer: the 10 businesses with the most severe (`***`) violations, most first
    /// (ties by name, then licence).
    pub async fn top_severe(&self, n: i64) -> Result<Vec<TopRow>, sqlx::Error> {
        const SQL: &str = "SELECT businessname, licenseno, COUNT(*) AS severe FROM violations \
            WHERE viol_level = 3 GROUP BY licenseno, businessname \
            ORDER BY severe DESC, businessname, licenseno LIMIT ";
        let rows: Vec<(String, String, i64)> = match self {
            Db::Sqlite(p, _) => {
                sqlx::query_as(&format!("{SQL}?"))
                    .bind(n)
                    .fetch_all(p)
                    .await?
            }
            Db::Postgres(p) => {
                sqlx::query_as(&format!("{SQL}$1"))
                    .bind(n)
                    .fetch_all(p)
                    .await?
            }
        };
        Ok(rows
            .into_iter()
            .map(|(businessname, licenseno, severe)| TopRow {
                businessname,
                licenseno,
                severe,
            })
            .collect())
    }

    /// Closes the pool (waits for connections to finish).
    pub async fn close(&self) {
        match self {
            Db::Sqlite(p, _) => p.close().await,
            Db::Postgres(p) => p.close().await,
        }
    }
}
