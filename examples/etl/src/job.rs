//! The job: stream the CSV through the staged pipeline into the database.

use std::fs::File;
use std::io::{BufReader, Read};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use futures::{Stream, StreamExt, TryStreamExt, future};
use stagepipe::PipelineGraph;
use stagepipe::prelude::*;

use crate::db::{Db, Faults, TopRow, Written, is_transient};
use crate::model::{
    Checked, Columns, Inspection, Outcome, RawRow, Reject, Routed, process, route, transform,
    validate,
};

/// Errors that stop the job (malformed rows never do: they are rejected and counted).
pub type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// Where the CSV comes from.
#[derive(Clone, Debug)]
pub enum Input {
    /// A file on disk.
    Path(PathBuf),
    /// Bytes compiled into the program (the shipped sample), under a name for `rejects`.
    Bytes {
        /// The name under which its rejects are stored.
        name: String,
        /// The CSV.
        data: &'static [u8],
    },
}

impl Input {
    /// The name under which the rejects of this input are stored: the file name.
    pub fn source_name(&self) -> String {
        match self {
            Input::Path(p) => source_name(p),
            Input::Bytes { name, .. } => name.clone(),
        }
    }
}

impl std::fmt::Display for Input {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Input::Path(p) => write!(f, "{}", p.display()),
            Input::Bytes { name, .. } => write!(f, "{name} (built in)"),
        }
    }
}

/// What to load, where, and how.
#[derive(Clone, Debug)]
pub struct Config {
    /// The CSV (the real file, a generated one, or the built-in sample).
    pub input: Input,
    /// `sqlite://FILE` or `postgres://...`.
    pub db_url: String,
    /// Rows per batch: one transaction each.
    pub batch_max: usize,
    /// How long a partial batch waits for more rows before it is written.
    pub batch_wait: Duration,
    /// Batches being written at once (writer connections). With one writer, batches commit in
    /// input order, so of rows sharing a key the first in the input is kept; with several,
    /// the kept one is the one whose batch commits first (the counts are the same either way).
    pub in_flight: usize,
    /// Workers of the pool that runs parse/validate, transform and route (default: one per
    /// core).
    pub workers: Option<usize>,
    /// Read at most this many records.
    pub limit: Option<u64>,
    /// The retry policy of a batch that failed with a transient database error.
    pub retry: Backoff,
    /// Faults to inject (tests).
    pub faults: Faults,
    /// Live counters (for a progress display).
    pub progress: Arc<Progress>,
}

/// Rows per batch into SQLite: large transactions, since one writer does them all (each
/// commit writes every page the batch changed to the WAL, so fewer, larger commits write less).
pub const SQLITE_BATCH: usize = 10_000;
/// Batches in flight into SQLite: one (a single-writer database).
pub const SQLITE_WRITERS: usize = 1;
/// Rows per batch into Postgres (one `COPY` each).
pub const POSTGRES_BATCH: usize = 2000;
/// Batches in flight into Postgres.
pub const POSTGRES_WRITERS: usize = 3;

impl Config {
    /// The defaults for `input` into `db_url`.
    pub fn new(input: impl Into<PathBuf>, db_url: impl Into<String>) -> Self {
        Self::with_input(Input::Path(input.into()), db_url)
    }

    /// The defaults for `input` (a file or bytes) into `db_url`: batches of
    /// [`SQLITE_BATCH`] rows and [`SQLITE_WRITERS`] writer into SQLite, [`POSTGRES_BATCH`]
    /// and [`POSTGRES_WRITERS`] into Postgres.
    pub fn with_input(input: Input, db_url: impl Into<String>) -> Self {
        let db_url = db_url.into();
        let sqlite = db_url.starts_with("sqlite:");
        Config {
            input,
            in_flight: if sqlite {
                SQLITE_WRITERS
            } else {
                POSTGRES_WRITERS
            },
            batch_max: if sqlite { SQLITE_BATCH } else { POSTGRES_BATCH },
            db_url,
            batch_wait: Duration::from_millis(100),
            workers: None,
            limit: None,
            retry: Backoff::exponential(Duration::from_millis(20))
                .max_attempts(5)
                .max_delay(Duration::from_secs(2))
                .jitter(),
            faults: Faults::none(),
            progress: Arc::default(),
        }
    }
}

/// Counters the job updates as it goes.
#[derive(Debug, Default)]
pub struct Progress {
    /// Records read.
    pub rows: AtomicU64,
    /// Records done: written (loaded, duplicate or rejected) or skipped.
    pub done: AtomicU64,
    /// Bytes of the input read.
    pub bytes: AtomicU64,
    /// Bytes in the input.
    pub total_bytes: AtomicU64,
}

impl Progress {
    /// The bytes of the input whose records are done, estimated as the bytes read times the
    /// share of the records read that are done: what a progress bar shows, so that it reaches
    /// the end when the last batch is committed, not when the last record is read.
    pub fn bytes_done(&self) -> u64 {
        let rows = self.rows.load(Ordering::Relaxed);
        let done = self.done.load(Ordering::Relaxed).min(rows);
        let bytes = self.bytes.load(Ordering::Relaxed);
        if rows == 0 {
            0
        } else {
            (bytes as u128 * done as u128 / rows as u128) as u64
        }
    }
}

/// The totals of one run.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Totals {
    /// Records read.
    pub read: u64,
    /// Violation rows added to the database.
    pub loaded: u64,
    /// Rows without a violation (counted, not loaded).
    pub skipped: u64,
    /// Malformed rows (written to `rejects`).
    pub rejected: u64,
    /// Violation rows already in the database (same natural key).
    pub duplicates: u64,
    /// Batches written.
    pub batches: u64,
    /// Batch attempts that failed and were retried.
    pub retries: u64,
}

/// The outcome of a run: totals, the stats table, the answer.
#[derive(Clone, Debug)]
pub struct Report {
    /// The totals.
    pub totals: Totals,
    /// Per-stage stats, one line per stage.
    pub stats: String,
    /// The staged pipeline as it ran: stages, routes taken, counts.
    pub graph: PipelineGraph<Stage>,
    /// The top 10 businesses by severe violations.
    pub top: Vec<TopRow>,
    /// Wall-clock time of the load.
    pub elapsed: Duration,
    /// `"sqlite"` or `"postgres"`.
    pub backend: &'static str,
    /// The largest size of SQLite's WAL file seen after a commit (0 on Postgres).
    pub wal_peak: u64,
}

/// The name under which rejects of `input` are stored.
pub fn source_name(input: &Path) -> String {
    input
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| input.display().to_string())
}

/// Runs the job end to end: open the input and check its header, then connect, create the
/// schema, load, answer. A missing file or column fails before the database is touched.
pub async fn run(config: &Config) -> Result<Report, BoxError> {
    let (cols, rows) = read_csv(&config.input, config.limit, config.progress.clone())?;
    // SQLite: the writers' connections also answer the query at the end (each connection has
    // its own page cache; another one would fill a second cache). Postgres: one more, for the
    // answer and, in the tests, for terminating a connection in the middle of a COPY.
    let sqlite = config.db_url.starts_with("sqlite:");
    let connections = config.in_flight as u32 + u32::from(!sqlite);
    let db = Db::connect(&config.db_url, connections).await?;
    db.ensure_schema().await?;
    let started = Instant::now();
    let (totals, stats, graph) = run_pipeline(rows, cols, &db, config).await?;
    let elapsed = started.elapsed();
    let top = db.top_severe(10).await?;
    db.close().await;
    Ok(Report {
        totals,
        stats,
        graph,
        top,
        elapsed,
        backend: db.backend(),
        wal_peak: db.wal_peak(),
    })
}

/// Loads `config.input` into `db` (whose schema exists): the totals and the stats table.
pub async fn load(db: &Db, config: &Config) -> Result<(Totals, String), BoxError> {
    let (cols, rows) = read_csv(&config.input, config.limit, config.progress.clone())?;
    let (totals, stats, _graph) = run_pipeline(rows, cols, db, config).await?;
    Ok((totals, stats))
}

/// Opens `input`, maps its header, and streams its first `limit` records from a blocking
/// reader thread (bounded channel, so the file is never held in memory).
pub fn read_csv(
    input: &Input,
    limit: Option<u64>,
    progress: Arc<Progress>,
) -> Result<
    (
        Columns,
        impl Stream<Item = Result<RawRow, csv::Error>> + Send + 'static,
    ),
    BoxError,
> {
    let (source, size): (Box<dyn Read + Send>, u64) = match input {
        Input::Path(path) => {
            let file =
                File::open(path).map_err(|e| format!("cannot open {}: {e}", path.display()))?;
            let size = file.metadata()?.len();
            (Box::new(file), size)
        }
        Input::Bytes { data, .. } => (Box::new(*data), data.len() as u64),
    };
    progress.total_bytes.store(size, Ordering::Relaxed);
    let mut reader = csv_reader(source);
    let header = reader
        .byte_headers()
        .map_err(|e| format!("{input}: cannot read the header: {e}"))?
        .clone();
    let cols = Columns::from_header(&csv::StringRecord::from_byte_record_lossy(header))
        .map_err(|e| format!("{input}: {e}"))?;
    let limit = limit.unwrap_or(u64::MAX);
    // Records travel in small chunks: one wake-up per chunk, not per record.
    const CHUNK: usize = 128;
    let (tx, mut rx) = tokio::sync::mpsc::channel::<Vec<Result<RawRow, csv::Error>>>(16);
    tokio::task::spawn_blocking(move || {
        let mut record = csv::ByteRecord::new();
        let mut chunk = Vec::with_capacity(CHUNK);
        let mut read = 0;
        loop {
            let (done, failed) = if read == limit {
                (true, false)
            } else {
                match reader.read_byte_record(&mut record) {
                    Ok(false) => (true, false),
                    Ok(true) => {
                        read += 1;
                        let pos = record.position().expect("a read record has a position");
                        progress.rows.fetch_add(1, Ordering::Relaxed);
                        progress
                            .bytes
                            .store(reader.position().byte(), Ordering::Relaxed);
                        chunk.push(Ok(RawRow {
                            line: pos.line(),
                            record: csv::StringRecord::from_byte_record_lossy(record.clone()),
                        }));
                        (false, false)
                    }
                    Err(e) => {
                        chunk.push(Err(e));
                        (true, true)
                    }
                }
            };
            if chunk.len() == CHUNK || (done && !chunk.is_empty()) {
                let full = std::mem::replace(&mut chunk, Vec::with_capacity(CHUNK));
                // The receiver gone means the job was dropped: stop reading.
                if tx.blocking_send(full).is_err() {
                    return;
                }
            }
            if done || failed {
                return;
            }
        }
    });
    let rows = futures::stream::poll_fn(move |cx| rx.poll_recv(cx)).flat_map(futures::stream::iter);
    Ok((cols, rows))
}

fn csv_reader<R: Read>(file: R) -> csv::Reader<BufReader<R>> {
    csv::ReaderBuilder::new()
        .flexible(true)
        .from_reader(BufReader::with_capacity(1 << 16, file))
}

/// The stages of one CSV record.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Stage {
    /// Check the record and parse what is checked: a malformed row fails here (a reject).
    Parse,
    /// Typed timestamps, level 1–3, trimmed text.
    Transform,
    /// Rows with a violation to the loader, the rest counted as skipped.
    Route,
}

/// A record on its way through the stages.
#[derive(Debug)]
pub enum Row {
    /// As read.
    Raw(RawRow),
    /// Validated.
    Checked(Checked),
    /// Typed and trimmed.
    Typed(Inspection),
    /// Routed: to load or skipped.
    Routed(Outcome),
    /// The reader failed (an I/O error, not a malformed row): stops the job.
    Unreadable(String),
}

/// The job's state machine: parse/validate → transform → route.
#[derive(Debug)]
pub struct Etl {
    cols: Columns,
}

impl StateMachine for Etl {
    type Stage = Stage;
    type Data = Row;
    type Error = Reject;

    fn start(&self) -> Stage {
        Stage::Parse
    }

    async fn run(&self, stage: Stage, row: Row) -> Result<Next<Stage, Row>, Reject> {
        Ok(match (stage, row) {
            (Stage::Parse, Row::Raw(raw)) => {
                Next::Stage(Stage::Transform, Row::Checked(validate(raw, &self.cols)?))
            }
            (Stage::Transform, Row::Checked(c)) => {
                Next::Stage(Stage::Route, Row::Typed(transform(c, &self.cols)))
            }
            (Stage::Route, Row::Typed(r)) => Next::Done(Row::Routed(match route(r) {
                Routed::Load(r) => Outcome::Load(r),
                Routed::Skip => Outcome::Skip,
            })),
            (_, row @ Row::Unreadable(_)) => Next::Done(row),
            (stage, row) => unreachable!("{stage:?} never receives {row:?}"),
        })
    }
}

/// The streaming part of the job: the staged pipeline (parse/validate → transform → route)
/// → batches → batched inserts in flight, each in a transaction retried on transient errors,
/// with stats at each step. Returns the totals, the stats table and the pipeline's graph.
pub async fn run_pipeline<S>(
    rows: S,
    cols: Columns,
    db: &Db,
    config: &Config,
) -> Result<(Totals, String, PipelineGraph<Stage>), BoxError>
where
    S: Stream<Item = Result<RawRow, csv::Error>> + Send,
{
    let source = config.input.source_name();
    let mut builder = Pipeline::builder(Etl { cols });
    if let Some(n) = config.workers {
        builder = builder.workers(n.max(1));
    }
    let pipeline = builder.build();
    let progress = &config.progress;
    let read = Stats::new("read");
    let routed = Stats::new("to load");
    let written = Stats::new("written");
    let limit = InFlightLimit::new(config.in_flight);
    let mut totals = Totals::default();
    let skipped = AtomicU64::new(0);

    let result = rows
        .map(|r| match r {
            Ok(raw) => Row::Raw(raw),
            Err(e) => Row::Unreadable(e.to_string()),
        })
        .with_stats(&read)
        .through(&pipeline)
        .filter_map(|result| {
            let outcome = match result {
                Ok(Row::Routed(Outcome::Skip)) => {
                    skipped.fetch_add(1, Ordering::Relaxed);
                    progress.done.fetch_add(1, Ordering::Relaxed);
                    None
                }
                Ok(Row::Routed(o)) => Some(Ok(o)),
                Ok(Row::Unreadable(e)) => Some(Err(BoxError::from(e))),
                Ok(other) => unreachable!("a finished row is routed: {other:?}"),
                Err(StageError::Failed { error, .. }) => Some(Ok(Outcome::Reject(error))),
                Err(e) => Some(Err(format!("the pipeline failed: {e}").into())),
            };
            future::ready(outcome)
        })
        .with_stats(&routed)
        .batch(config.batch_max, config.batch_wait)
        // Make the next batch ready (Postgres: encode it) while the previous one is written.
        .map(|batch| {
            let batch: Vec<Outcome> = batch.into_iter().collect::<Result<_, _>>()?;
            let records = batch.len() as u64;
            let (rows, rejects) = split(batch);
            Ok::<_, BoxError>((records, db.ready(rows), rejects))
        })
        .in_flight(&limit, |batch| {
            let source = source.as_str();
            let faults = &config.faults;
            async move {
                let (records, rows, rejects) = batch?;
                let mut attempts = 0;
                let written = config
                    .retry
                    .retry_if(
                        || {
                            attempts += 1;
                            if attempts > 1 {
                                tracing::warn!(
                                    target: "etl",
                                    rows = rows.len(),
                                    attempt = attempts,
                                    "retrying a batch after a transient database error"
                                );
                            }
                            db.write_batch(source, &rows, &rejects, faults)
                        },
                        is_transient,
                    )
                    .await
                    .map_err(|e| {
                        format!(
                            "a batch of {} rows failed after {attempts} attempts: {e}",
                            rows.len()
                        )
                    })?;
                progress.done.fetch_add(records, Ordering::Relaxed);
                tracing::debug!(
                    target: "etl",
                    rows = rows.len(),
                    rejects = rejects.len(),
                    inserted = written.inserted,
                    duplicates = written.duplicates,
                    attempts,
                    "batch committed"
                );
                Ok::<_, BoxError>((rejects.len() as u64, written, attempts - 1))
            }
        })
        .with_stats(&written)
        .try_for_each(|(rejected, w, failed): (u64, Written, u64)| {
            totals.loaded += w.inserted;
            totals.duplicates += w.duplicates;
            totals.rejected += rejected;
            totals.batches += 1;
            totals.retries += failed;
            future::ready(Ok(()))
        })
        .await;
    result?;
    db.checkpoint().await?;
    totals.skipped = skipped.load(Ordering::Relaxed);
    totals.read = read.snapshot().items;
    let stats = format!(
        "{}\n{}",
        pipeline.stats(),
        [read, routed, written]
            .iter()
            .map(|s| s.snapshot().to_string())
            .collect::<Vec<_>>()
            .join("\n")
    );
    Ok((totals, stats, pipeline.graph()))
}

fn split(batch: Vec<Outcome>) -> (Vec<Inspection>, Vec<Reject>) {
    let mut rows = Vec::with_capacity(batch.len());
    let mut rejects = Vec::new();
    for o in batch {
        match o {
            Outcome::Load(r) => rows.push(r),
            Outcome::Reject(r) => rejects.push(r),
            Outcome::Skip => {}
        }
    }
    (rows, rejects)
}

/// The same load written the obvious way, one step after another: read a record, process it,
/// and insert every 500 rows in a transaction. The baseline of the benchmark.
pub async fn run_sequential(input: &Path, db: &Db, batch_max: usize) -> Result<Totals, BoxError> {
    let source = source_name(input);
    let mut reader = csv_reader(File::open(input)?);
    let cols = Columns::from_header(&reader.headers()?.clone())?;
    let mut totals = Totals::default();
    let mut batch = Vec::with_capacity(batch_max);
    let mut record = csv::ByteRecord::new();
    let faults = Faults::none();
    loop {
        let more = reader.read_byte_record(&mut record)?;
        if more {
            totals.read += 1;
            let row = RawRow {
                line: record
                    .position()
                    .expect("a read record has a position")
                    .line(),
                record: csv::StringRecord::from_byte_record_lossy(record.clone()),
            };
            match process(row, &cols) {
                Outcome::Skip => totals.skipped += 1,
                other => batch.push(other),
            }
        }
        if batch.len() == batch_max || (!more && !batch.is_empty()) {
            let (rows, rejects) = split(std::mem::take(&mut batch));
            let w = db
                .write_batch(&source, &db.ready(rows), &rejects, &faults)
                .await?;
            totals.loaded += w.inserted;
            totals.duplicates += w.duplicates;
            totals.rejected += rejects.len() as u64;
            totals.batches += 1;
        }
        if !more {
            return Ok(totals);
        }
    }
}
