//! The database layer: one API over SQLite (rusqlite) and Postgres (sqlx).
//!
//! * The schema is created if missing.
//! * `violations` has a natural key, (`licenseno`, `violdttm`, `violation`); inserts are
//!   `ON CONFLICT DO NOTHING`, so loading the same input twice adds nothing, and the rows a
//!   batch did not add are counted as duplicates.
//! * `rejects` keeps every malformed row with its source, line, kind and reason, keyed on
//!   (`source`, `line`) so that re-runs do not repeat them either.
//! * A batch (its rows and its rejects) is written in one transaction: it lands whole or not
//!   at all, so retrying a failed batch neither loses nor doubles a row.
//! * SQLite: one connection, owned by a thread of its own that runs every statement (SQLite
//!   has one writer at a time). WAL with `synchronous=NORMAL`; rows go in one at a time
//!   through a single-row `INSERT`, prepared once and run with the row's fields bound as
//!   borrowed text, as `sqlite3 .import` does. A new database gets 16 KiB pages. The WAL is
//!   checkpointed after commits (SQLite's automatic checkpoint) and stays bounded by about one
//!   batch; its peak size is measured ([`Db::wal_peak`]).
//! * Postgres: a batch is `COPY`ed straight into `violations`, inside a savepoint. When one of
//!   its keys is already there, the COPY fails, the savepoint takes its rows back, and the
//!   batch goes through a temporary staging table (one per connection, emptied at each
//!   commit) and `INSERT ... SELECT ... ON CONFLICT DO NOTHING`, so keys and duplicates behave
//!   exactly as with plain inserts. After such a batch the next ones are staged at once, until
//!   a staged batch has no duplicate ([`CopyMode`]).

use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use rusqlite::{Connection, OpenFlags, TransactionBehavior};
use sqlx::postgres::{PgPool, PgPoolOptions};
use sqlx::{Executor, Postgres, QueryBuilder};
use tokio::sync::{mpsc, oneshot};

use crate::model::{Inspection, Reject, Timestamp};

/// A connected database: SQLite (a file, no server) or Postgres.
#[derive(Clone, Debug)]
pub enum Db {
    /// An SQLite file.
    Sqlite(Sqlite),
    /// A Postgres server, and how its batches are being copied.
    Postgres(PgPool, CopyMode),
}

/// How batches are copied into Postgres: straight into `violations` while they meet no key
/// already there, through the staging table after one did (until a staged batch again has no
/// duplicate). Shared by the clones of a [`Db`].
#[derive(Clone, Debug, Default)]
pub struct CopyMode {
    staged: Arc<AtomicBool>,
    /// Batches that went through the staging table.
    staged_batches: Arc<AtomicU64>,
}

/// An error of the database layer.
#[derive(Debug)]
pub enum Error {
    /// From sqlx: Postgres, or a database URL that could not be read.
    Sqlx(sqlx::Error),
    /// From SQLite.
    Sqlite(rusqlite::Error),
    /// The SQLite connection's thread could not be started.
    Io(std::io::Error),
    /// The SQLite connection is closed (its thread has ended).
    Closed,
}

impl std::fmt::Display for Error {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Error::Sqlx(e) => e.fmt(f),
            Error::Sqlite(e) => e.fmt(f),
            Error::Io(e) => e.fmt(f),
            Error::Closed => f.write_str("the SQLite connection is closed"),
        }
    }
}

impl std::error::Error for Error {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            Error::Sqlx(e) => Some(e),
            Error::Sqlite(e) => Some(e),
            Error::Io(e) => Some(e),
            Error::Closed => None,
        }
    }
}

impl From<sqlx::Error> for Error {
    fn from(e: sqlx::Error) -> Self {
        Error::Sqlx(e)
    }
}

impl From<rusqlite::Error> for Error {
    fn from(e: rusqlite::Error) -> Self {
        Error::Sqlite(e)
    }
}

/// An SQLite database: one connection, owned by a thread of its own that runs every statement
/// sent to it, in order. Clones share the connection.
#[derive(Clone, Debug)]
pub struct Sqlite {
    jobs: mpsc::Sender<Message>,
    wal: Wal,
}

/// What the connection's thread is asked to do.
enum Message {
    /// Run a closure on the connection.
    Run(Box<dyn FnOnce(&mut Connection) + Send>),
    /// Close the connection, then say so.
    Close(oneshot::Sender<()>),
}

impl std::fmt::Debug for Message {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Message::Run(_) => "Run",
            Message::Close(_) => "Close",
        })
    }
}

impl Sqlite {
    /// Opens (creating it if missing) the database `target` on a new thread, set up for bulk
    /// loading.
    async fn open(target: SqliteTarget, wal: Wal) -> Result<Sqlite, Error> {
        let (jobs, mut rx) = mpsc::channel::<Message>(4);
        let (opened, is_open) = oneshot::channel();
        std::thread::Builder::new()
            .name("etl-sqlite".into())
            .spawn(move || {
                let mut conn = match open_sqlite(&target) {
                    Ok(conn) => {
                        let _ = opened.send(Ok(()));
                        conn
                    }
                    Err(e) => {
                        let _ = opened.send(Err(e));
                        return;
                    }
                };
                while let Some(message) = rx.blocking_recv() {
                    match message {
                        Message::Run(job) => job(&mut conn),
                        Message::Close(done) => {
                            drop(conn);
                            log_thread_cpu();
                            let _ = done.send(());
                            return;
                        }
                    }
                }
                log_thread_cpu();
            })
            .map_err(Error::Io)?;
        is_open.await.map_err(|_| Error::Closed)??;
        Ok(Sqlite { jobs, wal })
    }

    /// Runs `f` on the connection's thread and waits for its result. The call waits for room
    /// when the thread is busy (backpressure).
    async fn call<T, F>(&self, f: F) -> Result<T, Error>
    where
        T: Send + 'static,
        F: FnOnce(&mut Connection) -> Result<T, rusqlite::Error> + Send + 'static,
    {
        let (tx, rx) = oneshot::channel();
        self.jobs
            .send(Message::Run(Box::new(move |conn| {
                let _ = tx.send(f(conn));
            })))
            .await
            .map_err(|_| Error::Closed)?;
        Ok(rx.await.map_err(|_| Error::Closed)??)
    }

    /// Closes the connection and waits until it is closed.
    async fn close(&self) {
        let (tx, rx) = oneshot::channel();
        if self.jobs.send(Message::Close(tx)).await.is_ok() {
            let _ = rx.await;
        }
    }
}

/// Logs (at debug level) the CPU time this thread has used, where Linux tells it: the SQLite
/// connection's thread is the single writer, the job's critical path.
fn log_thread_cpu() {
    let cpu = std::fs::read_to_string("/proc/thread-self/schedstat")
        .ok()
        .and_then(|s| s.split_whitespace().next()?.parse::<u64>().ok());
    if let Some(ns) = cpu {
        tracing::debug!(
            target: "etl",
            cpu_s = ns as f64 / 1e9,
            "SQLite connection closed"
        );
    }
}

/// Where an SQLite URL points.
#[derive(Clone, Debug, PartialEq, Eq)]
enum SqliteTarget {
    /// A file, with the URL's query (`mode=ro`, ...) if it has one.
    File {
        path: PathBuf,
        query: Option<String>,
    },
    /// A private in-memory database (`sqlite::memory:`).
    Memory,
}

impl SqliteTarget {
    /// Reads `sqlite://FILE`, `sqlite:FILE` (either with `?query`) or `sqlite::memory:`.
    fn from_url(url: &str) -> SqliteTarget {
        let rest = url
            .strip_prefix("sqlite://")
            .or_else(|| url.strip_prefix("sqlite:"))
            .unwrap_or(url);
        let (path, query) = match rest.split_once('?') {
            Some((path, query)) => (path, Some(query.to_owned())),
            None => (rest, None),
        };
        if path == ":memory:" {
            SqliteTarget::Memory
        } else {
            SqliteTarget::File {
                path: PathBuf::from(path),
                query,
            }
        }
    }
}

/// Opens the SQLite database `target` and sets it up for bulk loading.
fn open_sqlite(target: &SqliteTarget) -> Result<Connection, rusqlite::Error> {
    static CONFIGURE: std::sync::Once = std::sync::Once::new();
    CONFIGURE.call_once(|| {
        // Before SQLite's first use in the process: no global statistics of memory use, so
        // that an allocation does not take SQLite's global mutex. (Once SQLite is initialized
        // this is refused with `SQLITE_MISUSE`, harmlessly.)
        // SAFETY: `sqlite3_config` must not run while another thread uses SQLite; the `Once`
        // runs it before this module opens any connection, and nothing else here uses SQLite.
        unsafe {
            rusqlite::ffi::sqlite3_config(rusqlite::ffi::SQLITE_CONFIG_MEMSTATUS, 0);
        }
    });
    let flags = OpenFlags::SQLITE_OPEN_READ_WRITE
        | OpenFlags::SQLITE_OPEN_CREATE
        | OpenFlags::SQLITE_OPEN_NO_MUTEX;
    let conn = match target {
        SqliteTarget::Memory => Connection::open_in_memory()?,
        SqliteTarget::File { path, query: None } => Connection::open_with_flags(path, flags)?,
        SqliteTarget::File {
            path,
            query: Some(query),
        } => Connection::open_with_flags(
            format!("file:{}?{query}", path.display()),
            flags | OpenFlags::SQLITE_OPEN_URI,
        )?,
    };
    conn.busy_timeout(Duration::from_secs(30))?;
    conn.execute_batch(
        // A new database gets 16 KiB pages (an existing one keeps its own): a quarter of the
        // pages to find, split and write for the same rows, which halves the writer's time
        // on this load (two keys inserted in random order).
        "PRAGMA page_size = 16384;
         PRAGMA journal_mode = WAL;
         PRAGMA synchronous = NORMAL;
         -- Bulk loading: a larger page cache (64 MiB) and statement journals in memory
         -- instead of a temporary file per transaction.
         PRAGMA cache_size = -65536;
         PRAGMA temp_store = MEMORY;
         -- A WAL grown past 64 MiB (by a huge batch) is cut back after a checkpoint.
         PRAGMA journal_size_limit = 67108864;",
    )?;
    Ok(conn)
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
/// the rows themselves for SQLite (shared with the connection's thread, and bound again by a
/// retry), or the `COPY` text for Postgres (encoded while the previous batch is written).
#[derive(Debug, Default)]
pub struct Ready {
    /// SQLite: the rows.
    rows: Arc<Vec<Inspection>>,
    /// How many rows.
    len: usize,
    /// Postgres: the rows in `COPY`'s binary format (sent again by a retry).
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
/// into the dropped connection. On SQLite every row and reject of the batch is inserted, then
/// the transaction is rolled back and `SQLITE_BUSY` is returned instead of committing.
#[derive(Clone, Debug, Default)]
pub struct Faults {
    fail_call: Option<u64>,
    calls: Arc<AtomicU64>,
    /// Whether the database itself reported the injected failure (the dropped connection).
    surfaced: Arc<AtomicBool>,
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
/// contention (SQLite's `BUSY` and `LOCKED`), serialization failures, deadlocks, server
/// shut-downs.
pub fn is_transient(e: &Error) -> bool {
    match e {
        Error::Sqlx(e) => is_transient_sqlx(e),
        Error::Sqlite(rusqlite::Error::SqliteFailure(e, _)) => matches!(
            e.code,
            rusqlite::ErrorCode::DatabaseBusy | rusqlite::ErrorCode::DatabaseLocked
        ),
        Error::Sqlite(_) | Error::Io(_) | Error::Closed => false,
    }
}

fn is_transient_sqlx(e: &sqlx::Error) -> bool {
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

/// Appends `rows` to `out` in `COPY`'s binary format, in the order of [`COLUMNS`]: the
/// header, one tuple per row, the trailer. The server reads the values as they are (no text
/// to parse: timestamps are microseconds since 2000-01-01).
fn copy_binary(rows: &[Inspection], out: &mut Vec<u8>) {
    fn text(out: &mut Vec<u8>, s: &str) {
        out.extend_from_slice(&(s.len() as i32).to_be_bytes());
        out.extend_from_slice(s.as_bytes());
    }
    fn ts(out: &mut Vec<u8>, t: &Option<Timestamp>) {
        match t {
            Some(t) => {
                out.extend_from_slice(&8i32.to_be_bytes());
                out.extend_from_slice(&pg_micros(t).to_be_bytes());
            }
            None => out.extend_from_slice(&(-1i32).to_be_bytes()),
        }
    }
    out.extend_from_slice(b"PGCOPY\n\xff\r\n\0");
    out.extend_from_slice(&0i32.to_be_bytes()); // flags
    out.extend_from_slice(&0i32.to_be_bytes()); // header extension
    for r in rows {
        out.extend_from_slice(&22i16.to_be_bytes());
        text(out, &r.licenseno);
        ts(out, &r.violdttm);
        text(out, &r.violation);
        out.extend_from_slice(&4i32.to_be_bytes());
        out.extend_from_slice(&i32::from(r.level.unwrap_or(0)).to_be_bytes());
        for s in [
            &r.businessname,
            &r.dbaname,
            &r.legalowner,
            &r.licensecat,
            &r.descript,
            &r.result,
        ] {
            text(out, s);
        }
        ts(out, &r.resultdttm);
        text(out, &r.violdesc);
        text(out, &r.violstatus);
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
            text(out, s);
        }
        out.extend_from_slice(&8i32.to_be_bytes());
        out.extend_from_slice(&(r.line as i64).to_be_bytes());
    }
    out.extend_from_slice(&(-1i16).to_be_bytes());
}

/// `t` as Postgres stores a `TIMESTAMP`: microseconds since 2000-01-01 00:00:00.
fn pg_micros(t: &Timestamp) -> i64 {
    // Days from 1970-01-01 to the date (Howard Hinnant's `days_from_civil`).
    let (m, d) = (i64::from(t.month), i64::from(t.day));
    let y = i64::from(t.year) - i64::from(m <= 2);
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let doy = (153 * (m + if m > 2 { -3 } else { 9 }) + 2) / 5 + d - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    let days = era * 146_097 + doe - 719_468 - 10_957; // 10,957 days from 1970 to 2000
    let secs =
        days * 86_400 + i64::from(t.hour) * 3600 + i64::from(t.minute) * 60 + i64::from(t.second);
    secs * 1_000_000
}

/// The single-row `INSERT` of a violation into SQLite, prepared once by the connection (its
/// statement cache) and run once per row.
const SQLITE_INSERT: &str = "INSERT INTO violations (licenseno, violdttm, violation, viol_level, \
    businessname, dbaname, legalowner, licensecat, descript, result, resultdttm, violdesc, \
    violstatus, statusdate, comments, address, city, state, zip, property_id, location, \
    source_line) VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?) \
    ON CONFLICT (licenseno, violdttm, violation) DO NOTHING";

/// The single-row `INSERT` of a reject into SQLite.
const SQLITE_REJECT: &str = "INSERT INTO rejects (source, line, kind, reason, raw) \
    VALUES (?,?,?,?,?) ON CONFLICT (source, line) DO NOTHING";

/// `t` as SQLite stores it (`YYYY-MM-DD HH:MM:SS`, as its `Display`), written into `buf`.
fn ts_text<'b>(t: &Option<Timestamp>, buf: &'b mut [u8; 19]) -> Option<&'b str> {
    let t = t.as_ref()?;
    fn put(buf: &mut [u8], mut v: u32) {
        for b in buf.iter_mut().rev() {
            *b = b'0' + (v % 10) as u8;
            v /= 10;
        }
    }
    put(&mut buf[0..4], u32::from(t.year));
    buf[4] = b'-';
    put(&mut buf[5..7], u32::from(t.month));
    buf[7] = b'-';
    put(&mut buf[8..10], u32::from(t.day));
    buf[10] = b' ';
    put(&mut buf[11..13], u32::from(t.hour));
    buf[13] = b':';
    put(&mut buf[14..16], u32::from(t.minute));
    buf[16] = b':';
    put(&mut buf[17..19], u32::from(t.second));
    Some(std::str::from_utf8(buf).expect("digits and separators are ASCII"))
}

/// Writes one batch into SQLite in one transaction, on the connection's thread: every row
/// through [`SQLITE_INSERT`], every reject through [`SQLITE_REJECT`]. With `fail`, rolls
/// back and returns `SQLITE_BUSY` instead of committing (an injected fault).
fn sqlite_write(
    conn: &mut Connection,
    source: &str,
    rows: &[Inspection],
    rejects: &[Reject],
    fail: bool,
) -> Result<Written, rusqlite::Error> {
    let mut w = Written::default();
    // Take the write lock at once: another writer waits here, not halfway through.
    let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
    {
        let mut insert = tx.prepare_cached(SQLITE_INSERT)?;
        let (mut a, mut b, mut c) = ([0; 19], [0; 19], [0; 19]);
        for r in rows {
            w.inserted += insert.execute(rusqlite::params![
                r.licenseno,
                ts_text(&r.violdttm, &mut a),
                r.violation,
                i32::from(r.level.unwrap_or(0)),
                r.businessname,
                r.dbaname,
                r.legalowner,
                r.licensecat,
                r.descript,
                r.result,
                ts_text(&r.resultdttm, &mut b),
                r.violdesc,
                r.violstatus,
                ts_text(&r.statusdate, &mut c),
                r.comments,
                r.address,
                r.city,
                r.state,
                r.zip,
                r.property_id,
                r.location,
                r.line as i64,
            ])? as u64;
        }
        let mut reject = tx.prepare_cached(SQLITE_REJECT)?;
        for r in rejects {
            w.rejects += reject.execute(rusqlite::params![
                source,
                r.line as i64,
                r.kind.as_str(),
                r.reason,
                r.raw,
            ])? as u64;
        }
    }
    if fail {
        tx.rollback()?;
        return Err(rusqlite::Error::SqliteFailure(
            rusqlite::ffi::Error::new(rusqlite::ffi::SQLITE_BUSY),
            Some("injected fault: the database was busy at commit".into()),
        ));
    }
    // The commit also checkpoints the WAL when it has grown past 1000 pages (SQLite's
    // automatic checkpoint); with one writer it then starts over at the next batch.
    tx.commit()?;
    Ok(w)
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

/// Rows per multi-row `INSERT` of rejects into Postgres (keeps the bound parameters, 5 per
/// row, under its limit).
const ROWS_PER_STATEMENT: usize = 1024;

/// `COPY`s `data` (binary format, the columns of [`COLUMNS`]) into `table`: the rows copied.
///
/// With `kill` (an injected fault), sends half of the data, has the server terminate this
/// connection's backend from another connection, then sends the rest into the dropped
/// connection.
async fn copy_in(
    conn: &mut sqlx::PgConnection,
    table: &str,
    data: &[u8],
    kill: Option<(i32, &PgPool)>,
    faults: &Faults,
) -> Result<u64, sqlx::Error> {
    let mut copy = conn
        .copy_in_raw(&format!(
            "COPY {table} ({COLUMNS}) FROM STDIN WITH (FORMAT binary)"
        ))
        .await?;
    match kill {
        None => {
            copy.send(data).await?;
            copy.finish().await
        }
        Some((pid, pool)) => {
            let half = data.len() / 2;
            copy.send(&data[..half]).await?;
            sqlx::query("SELECT pg_terminate_backend($1, 10000)")
                .bind(pid)
                .execute(pool)
                .await?;
            let rest = async {
                copy.send(&data[half..]).await?;
                copy.finish().await
            };
            let result = rest.await;
            if result.is_err() {
                faults.surfaced.store(true, Ordering::SeqCst);
            }
            result
        }
    }
}

/// Whether `e` is Postgres' unique violation (a key already in the table).
fn is_unique_violation(e: &sqlx::Error) -> bool {
    matches!(e, sqlx::Error::Database(db) if db.code().as_deref() == Some("23505"))
}

impl Db {
    /// Connects to `url` (`sqlite://path` creates the file if missing; `postgres://...`),
    /// with at most `connections` connections. SQLite has one connection, whatever
    /// `connections` says: one writer at a time is all it allows.
    pub async fn connect(url: &str, connections: u32) -> Result<Db, Error> {
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
            Ok(Db::Postgres(pool, CopyMode::default()))
        } else if url.starts_with("sqlite:") {
            let target = SqliteTarget::from_url(url);
            let wal = Wal {
                path: match &target {
                    SqliteTarget::File { path, .. } => {
                        Some(PathBuf::from(format!("{}-wal", path.display())))
                    }
                    SqliteTarget::Memory => None,
                },
                peak: Arc::default(),
            };
            Ok(Db::Sqlite(Sqlite::open(target, wal).await?))
        } else {
            Err(Error::Sqlx(sqlx::Error::Configuration(
                format!("unsupported database URL {url:?}: use sqlite://FILE or postgres://...")
                    .into(),
            )))
        }
    }

    /// The largest size the SQLite WAL file had after a commit (0 on Postgres).
    pub fn wal_peak(&self) -> u64 {
        match self {
            Db::Sqlite(s) => s.wal.peak.load(Ordering::Relaxed),
            Db::Postgres(..) => 0,
        }
    }

    /// Postgres: how many batches went through the staging table, since they (or the batch
    /// before them) met keys already in `violations`; the others were copied in one pass.
    /// 0 on SQLite.
    pub fn staged_batches(&self) -> u64 {
        match self {
            Db::Sqlite(_) => 0,
            Db::Postgres(_, mode) => mode.staged_batches.load(Ordering::Relaxed),
        }
    }

    /// Makes `rows` ready to be written by [`write_batch`](Self::write_batch).
    pub fn ready(&self, rows: Vec<Inspection>) -> Ready {
        let len = rows.len();
        match self {
            Db::Sqlite(..) => Ready {
                rows: Arc::new(rows),
                len,
                copy: Vec::new(),
            },
            Db::Postgres(..) => {
                let mut copy = Vec::with_capacity(len * 320);
                copy_binary(&rows, &mut copy);
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
            Db::Postgres(..) => "postgres",
        }
    }

    /// Creates the tables and index if they are missing.
    pub async fn ensure_schema(&self) -> Result<(), Error> {
        match self {
            Db::Sqlite(s) => {
                s.call(|conn| {
                    for stmt in schema("TEXT") {
                        conn.execute_batch(&stmt)?;
                    }
                    Ok(())
                })
                .await?;
            }
            Db::Postgres(p, _) => {
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
    ) -> Result<Written, Error> {
        let fail = faults.fire();
        let mut w = Written::default();
        match self {
            Db::Sqlite(s) => {
                let (source, rows, rejects) =
                    (source.to_owned(), rows.rows.clone(), rejects.to_vec());
                w = s
                    .call(move |conn| sqlite_write(conn, &source, &rows, &rejects, fail))
                    .await?;
                s.wal.observe();
            }
            Db::Postgres(p, mode) => {
                let mut tx = p.begin().await?;
                if !rows.is_empty() {
                    let data = &rows.copy;
                    let mut kill = if fail {
                        let pid: i32 = sqlx::query_scalar("SELECT pg_backend_pid()")
                            .fetch_one(&mut *tx)
                            .await?;
                        Some((pid, p))
                    } else {
                        None
                    };
                    let mut staged = mode.staged.load(Ordering::Relaxed);
                    if !staged {
                        // One pass: straight into the table. A key already there fails the
                        // COPY, whose rows the savepoint takes back; then the staging path.
                        sqlx::query("SAVEPOINT direct").execute(&mut *tx).await?;
                        match copy_in(&mut tx, "violations", data, kill.take(), faults).await {
                            Ok(n) => {
                                w.inserted = n;
                                sqlx::query("RELEASE SAVEPOINT direct")
                                    .execute(&mut *tx)
                                    .await?;
                            }
                            Err(e) if is_unique_violation(&e) => {
                                sqlx::query("ROLLBACK TO SAVEPOINT direct")
                                    .execute(&mut *tx)
                                    .await?;
                                mode.staged.store(true, Ordering::Relaxed);
                                staged = true;
                            }
                            Err(e) => return Err(e.into()),
                        }
                    }
                    if staged {
                        mode.staged_batches.fetch_add(1, Ordering::Relaxed);
                        copy_in(&mut tx, "violations_stage", data, kill.take(), faults).await?;
                        w.inserted = sqlx::query(&format!(
                            "INSERT INTO violations ({COLUMNS}) SELECT {COLUMNS} \
                             FROM violations_stage \
                             ON CONFLICT (licenseno, violdttm, violation) DO NOTHING"
                        ))
                        .execute(&mut *tx)
                        .await?
                        .rows_affected();
                        if w.inserted == rows.len() as u64 {
                            // No duplicate in this batch: the next one tries the one pass.
                            mode.staged.store(false, Ordering::Relaxed);
                        }
                    }
                }
                for chunk in rejects.chunks(ROWS_PER_STATEMENT) {
                    let mut qb = QueryBuilder::<Postgres>::new(
                        "INSERT INTO rejects (source, line, kind, reason, raw) ",
                    );
                    push_rejects!(qb, source, chunk);
                    w.rejects += qb.build().execute(&mut *tx).await?.rows_affected();
                }
                if fail {
                    return Err(Error::Sqlx(sqlx::Error::Io(std::io::Error::new(
                        std::io::ErrorKind::ConnectionReset,
                        "injected fault: the server did not drop the connection",
                    ))));
                }
                tx.commit().await?;
            }
        }
        w.duplicates = rows.len() as u64 - w.inserted;
        Ok(w)
    }

    /// Ends a load: on SQLite, checkpoints the whole WAL into the database and truncates it, so
    /// that the file is complete on its own when the job ends. Nothing on Postgres.
    pub async fn checkpoint(&self) -> Result<(), Error> {
        if let Db::Sqlite(s) = self {
            s.wal.observe();
            s.call(|conn| conn.execute_batch("PRAGMA wal_checkpoint(TRUNCATE)"))
                .await?;
        }
        Ok(())
    }

    /// Rows in `violations`.
    pub async fn count_violations(&self) -> Result<i64, Error> {
        self.scalar("SELECT COUNT(*) FROM violations").await
    }

    /// Rows in `rejects`.
    pub async fn count_rejects(&self) -> Result<i64, Error> {
        self.scalar("SELECT COUNT(*) FROM rejects").await
    }

    async fn scalar(&self, sql: &'static str) -> Result<i64, Error> {
        match self {
            Db::Sqlite(s) => {
                s.call(move |conn| conn.query_row(sql, [], |r| r.get(0)))
                    .await
            }
            Db::Postgres(p, _) => Ok(sqlx::query_scalar(sql).fetch_one(p).await?),
        }
    }

    /// The first column of every row of `sql`, as text (`NULL` as an empty string): for
    /// checking what was stored.
    pub async fn strings(&self, sql: &str) -> Result<Vec<String>, Error> {
        match self {
            Db::Sqlite(s) => {
                let sql = sql.to_owned();
                s.call(move |conn| {
                    conn.prepare(&sql)?
                        .query_map([], |r| r.get::<_, Option<String>>(0))?
                        .map(|v| v.map(Option::unwrap_or_default))
                        .collect()
                })
                .await
            }
            Db::Postgres(p, _) => {
                let rows: Vec<Option<String>> = sqlx::query_scalar(sql).fetch_all(p).await?;
                Ok(rows.into_iter().map(Option::unwrap_or_default).collect())
            }
        }
    }

    /// Every reject of `source` as (line, kind, reason), by line.
    pub async fn rejects(&self, source: &str) -> Result<Vec<(i64, String, String)>, Error> {
        match self {
            Db::Sqlite(s) => {
                let source = source.to_owned();
                s.call(move |conn| {
                    conn.prepare(
                        "SELECT line, kind, reason FROM rejects WHERE source = ? ORDER BY line",
                    )?
                    .query_map([source], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)))?
                    .collect()
                })
                .await
            }
            Db::Postgres(p, _) => Ok(sqlx::query_as(
                "SELECT line, kind, reason FROM rejects WHERE source = $1 ORDER BY line",
            )
            .bind(source)
            .fetch_all(p)
            .await?),
        }
    }

    /// The answer: the 10 businesses with the most severe (`***`) violations, most first
    /// (ties by name, then licence).
    pub async fn top_severe(&self, n: i64) -> Result<Vec<TopRow>, Error> {
        const SQL: &str = "SELECT businessname, licenseno, COUNT(*) AS severe FROM violations \
            WHERE viol_level = 3 GROUP BY licenseno, businessname \
            ORDER BY severe DESC, businessname, licenseno LIMIT ";
        let rows: Vec<(String, String, i64)> = match self {
            Db::Sqlite(s) => {
                s.call(move |conn| {
                    conn.prepare(&format!("{SQL}?"))?
                        .query_map([n], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)))?
                        .collect()
                })
                .await?
            }
            Db::Postgres(p, _) => {
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

    /// Closes the connections (waits for them to finish).
    pub async fn close(&self) {
        match self {
            Db::Sqlite(s) => s.close().await,
            Db::Postgres(p, _) => p.close().await,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sqlite_urls() {
        let file = |path: &str, query: Option<&str>| SqliteTarget::File {
            path: PathBuf::from(path),
            query: query.map(str::to_owned),
        };
        assert_eq!(
            SqliteTarget::from_url("sqlite://etl.sqlite"),
            file("etl.sqlite", None)
        );
        assert_eq!(
            SqliteTarget::from_url("sqlite:///tmp/a b.sqlite"),
            file("/tmp/a b.sqlite", None)
        );
        assert_eq!(SqliteTarget::from_url("sqlite:x.db"), file("x.db", None));
        assert_eq!(
            SqliteTarget::from_url("sqlite://x.db?mode=rwc"),
            file("x.db", Some("mode=rwc"))
        );
        assert_eq!(
            SqliteTarget::from_url("sqlite::memory:"),
            SqliteTarget::Memory
        );
        assert_eq!(
            SqliteTarget::from_url("sqlite://:memory:"),
            SqliteTarget::Memory
        );
    }

    #[test]
    fn postgres_timestamps_count_microseconds_from_2000() {
        let micros = |s: &str| pg_micros(&Timestamp::parse(s).unwrap());
        assert_eq!(micros("2000-01-01 00:00:00"), 0);
        assert_eq!(micros("2000-01-01 00:00:01"), 1_000_000);
        assert_eq!(micros("1999-12-31 23:59:59"), -1_000_000);
        assert_eq!(micros("2000-03-01 00:00:00"), 60 * 86_400 * 1_000_000); // 2000 is leap
        // `SELECT EXTRACT(EPOCH FROM TIMESTAMP '2024-02-29 13:45:10' - TIMESTAMP '2000-01-01')`
        assert_eq!(micros("2024-02-29 13:45:10"), 762_529_510_000_000);
        assert_eq!(micros("1970-01-01 00:00:00"), -946_684_800_000_000);
    }

    #[test]
    fn timestamps_are_stored_as_displayed() {
        let mut buf = [0; 19];
        assert_eq!(ts_text(&None, &mut buf), None);
        for (year, month, day, hour, minute, second) in [
            (2008, 1, 2, 3, 4, 5),
            (1999, 12, 31, 23, 59, 59),
            (2024, 2, 29, 0, 0, 0),
        ] {
            let t = Timestamp {
                year,
                month,
                day,
                hour,
                minute,
                second,
            };
            assert_eq!(ts_text(&Some(t), &mut buf), Some(t.to_string().as_str()));
        }
    }

    #[test]
    fn sqlite_busy_and_locked_are_transient_other_errors_not() {
        let failure = |code| {
            Error::Sqlite(rusqlite::Error::SqliteFailure(
                rusqlite::ffi::Error::new(code),
                None,
            ))
        };
        assert!(is_transient(&failure(rusqlite::ffi::SQLITE_BUSY)));
        assert!(is_transient(&failure(rusqlite::ffi::SQLITE_LOCKED)));
        assert!(is_transient(&failure(rusqlite::ffi::SQLITE_BUSY_SNAPSHOT)));
        assert!(!is_transient(&failure(rusqlite::ffi::SQLITE_CONSTRAINT)));
        assert!(!is_transient(&failure(rusqlite::ffi::SQLITE_CORRUPT)));
        assert!(!is_transient(&Error::Closed));
        assert!(is_transient(&Error::Sqlx(sqlx::Error::PoolTimedOut)));
    }

    #[tokio::test]
    async fn an_injected_fault_rolls_the_whole_batch_back() {
        let db = Db::connect("sqlite::memory:", 1).await.unwrap();
        db.ensure_schema().await.unwrap();
        let text = |s: &str| s.to_string();
        let row = Inspection {
            line: 2,
            businessname: text("B"),
            dbaname: text(""),
            legalowner: text(""),
            licenseno: text("L1"),
            licensecat: text("FS"),
            descript: text(""),
            result: text("HE_Fail"),
            resultdttm: None,
            violation: text("V1"),
            level: Some(3),
            violdesc: text(""),
            violdttm: Timestamp::parse("2020-01-02 03:04:05"),
            violstatus: text("Fail"),
            statusdate: None,
            comments: text(""),
            address: text(""),
            city: text(""),
            state: text(""),
            zip: text(""),
            property_id: text(""),
            location: text(""),
        };
        let reject = Reject {
            line: 3,
            kind: crate::model::RejectKind::BadDate,
            reason: "violdttm is not a date".into(),
            raw: "x".into(),
        };
        let faults = Faults::fail_call(1);
        let ready = db.ready(vec![row.clone()]);
        let err = db
            .write_batch("f.csv", &ready, std::slice::from_ref(&reject), &faults)
            .await
            .unwrap_err();
        assert!(is_transient(&err), "{err}");
        assert!(err.to_string().contains("injected fault"), "{err}");
        assert_eq!(db.count_violations().await.unwrap(), 0);
        assert_eq!(db.count_rejects().await.unwrap(), 0);
        // The retry writes the same rows: all of them, once.
        let w = db
            .write_batch("f.csv", &ready, std::slice::from_ref(&reject), &faults)
            .await
            .unwrap();
        assert_eq!(
            w,
            Written {
                inserted: 1,
                duplicates: 0,
                rejects: 1
            }
        );
        let again = db
            .write_batch("f.csv", &db.ready(vec![row]), &[reject], &faults)
            .await
            .unwrap();
        assert_eq!(
            again,
            Written {
                inserted: 0,
                duplicates: 1,
                rejects: 0
            }
        );
        assert_eq!(db.count_violations().await.unwrap(), 1);
        assert_eq!(db.count_rejects().await.unwrap(), 1);
        db.close().await;
    }
}
