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

use std::str::FromStr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use sqlx::postgres::{PgPool, PgPoolOptions};
use sqlx::sqlite::{
    SqliteConnectOptions, SqliteJournalMode, SqlitePool, SqlitePoolOptions, SqliteSynchronous,
};
use sqlx::{Postgres, QueryBuilder, Sqlite};

use crate::model::{Inspection, Reject};

/// A connected database: SQLite (a file, no server) or Postgres.
#[derive(Clone, Debug)]
pub enum Db {
    /// An SQLite file.
    Sqlite(SqlitePool),
    /// A Postgres server.
    Postgres(PgPool),
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
/// On Postgres the failure is real: the server is asked to terminate the connection in the
/// middle of the transaction. On SQLite an I/O error is returned before the commit.
#[derive(Clone, Debug, Default)]
pub struct Faults {
    fail_call: Option<u64>,
    calls: Arc<AtomicU64>,
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
            calls: Arc::default(),
        }
    }

    /// Insert calls made so far (retries included).
    pub fn calls(&self) -> u64 {
        self.calls.load(Ordering::SeqCst)
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

/// Pushes the `VALUES` of `rows` and the conflict clause; `ts` is the cast after a timestamp
/// parameter (`"::timestamp"` on Postgres, `""` on SQLite, which stores ISO text).
macro_rules! push_rows {
    ($qb:expr, $rows:expr, $ts:expr) => {{
        let ts = |t: &Option<crate::model::Timestamp>| t.map(|t| t.to_string());
        $qb.push_values($rows, |mut b, r: &Inspection| {
            b.push_bind(r.licenseno.as_str())
                .push_bind(ts(&r.violdttm))
                .push_unseparated($ts)
                .push_bind(r.violation.as_str())
                .push_bind(i32::from(r.level.unwrap_or(0)))
                .push_bind(r.businessname.as_str())
                .push_bind(r.dbaname.as_str())
                .push_bind(r.legalowner.as_str())
                .push_bind(r.licensecat.as_str())
                .push_bind(r.descript.as_str())
                .push_bind(r.result.as_str())
                .push_bind(ts(&r.resultdttm))
                .push_unseparated($ts)
                .push_bind(r.violdesc.as_str())
                .push_bind(r.violstatus.as_str())
                .push_bind(ts(&r.statusdate))
                .push_unseparated($ts)
                .push_bind(r.comments.as_str())
                .push_bind(r.address.as_str())
                .push_bind(r.city.as_str())
                .push_bind(r.state.as_str())
                .push_bind(r.zip.as_str())
                .push_bind(r.property_id.as_str())
                .push_bind(r.location.as_str())
                .push_bind(r.line as i64);
        });
        $qb.push(" ON CONFLICT (licenseno, violdttm, violation) DO NOTHING");
    }};
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

/// Rows per multi-row `INSERT` statement (keeps the bound parameters under every backend's
/// limit).
const ROWS_PER_STATEMENT: usize = 500;

impl Db {
    /// Connects to `url` (`sqlite://path` creates the file if missing; `postgres://...`),
    /// with at most `connections` connections.
    pub async fn connect(url: &str, connections: u32) -> Result<Db, sqlx::Error> {
        if url.starts_with("postgres://") || url.starts_with("postgresql://") {
            let pool = PgPoolOptions::new()
                .max_connections(connections)
                .acquire_timeout(Duration::from_secs(30))
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
                .pragma("temp_store", "memory");
            let pool = SqlitePoolOptions::new()
                .max_connections(connections)
                .connect_with(options)
                .await?;
            Ok(Db::Sqlite(pool))
        } else {
            Err(sqlx::Error::Configuration(
                format!("unsupported database URL {url:?}: use sqlite://FILE or postgres://...")
                    .into(),
            ))
        }
    }

    /// `"sqlite"` or `"postgres"`.
    pub fn backend(&self) -> &'static str {
        match self {
            Db::Sqlite(_) => "sqlite",
            Db::Postgres(_) => "postgres",
        }
    }

    /// Creates the tables and index if they are missing.
    pub async fn ensure_schema(&self) -> Result<(), sqlx::Error> {
        match self {
            Db::Sqlite(p) => {
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

    /// Writes one batch, its violation rows and its rejects, in one transaction.
    pub async fn write_batch(
        &self,
        source: &str,
        rows: &[Inspection],
        rejects: &[Reject],
        faults: &Faults,
    ) -> Result<Written, sqlx::Error> {
        let fail = faults.fire();
        let mut w = Written::default();
        match self {
            Db::Sqlite(p) => {
                let mut tx = p.begin().await?;
                for chunk in rows.chunks(ROWS_PER_STATEMENT) {
                    let mut qb =
                        QueryBuilder::<Sqlite>::new(format!("INSERT INTO violations ({COLUMNS}) "));
                    push_rows!(qb, chunk, "");
                    w.inserted += qb.build().execute(&mut *tx).await?.rows_affected();
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
                tx.commit().await?;
            }
            Db::Postgres(p) => {
                let mut tx = p.begin().await?;
                for chunk in rows.chunks(ROWS_PER_STATEMENT) {
                    let mut qb = QueryBuilder::<Postgres>::new(format!(
                        "INSERT INTO violations ({COLUMNS}) "
                    ));
                    push_rows!(qb, chunk, "::timestamp");
                    w.inserted += qb.build().execute(&mut *tx).await?.rows_affected();
                }
                for chunk in rejects.chunks(ROWS_PER_STATEMENT) {
                    let mut qb = QueryBuilder::<Postgres>::new(
                        "INSERT INTO rejects (source, line, kind, reason, raw) ",
                    );
                    push_rejects!(qb, source, chunk);
                    w.rejects += qb.build().execute(&mut *tx).await?.rows_affected();
                }
                if fail {
                    // A real dropped connection in the middle of the transaction.
                    sqlx::query("SELECT pg_terminate_backend(pg_backend_pid())")
                        .execute(&mut *tx)
                        .await?;
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
            Db::Sqlite(p) => sqlx::query_scalar(sql).fetch_one(p).await,
            Db::Postgres(p) => sqlx::query_scalar(sql).fetch_one(p).await,
        }
    }

    /// Every reject of `source` as (line, kind, reason), by line.
    pub async fn rejects(&self, source: &str) -> Result<Vec<(i64, String, String)>, sqlx::Error> {
        match self {
            Db::Sqlite(p) => {
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
            Db::Sqlite(p) => {
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
            Db::Sqlite(p) => p.close().await,
            Db::Postgres(p) => p.close().await,
        }
    }
}
