//! The results table, on SQLite or Postgres: one row per job, keyed by the job's id, so that a
//! job processed twice (redelivered after a crash) is written once.

use std::str::FromStr;

use sqlx::postgres::{PgPool, PgPoolOptions};
use sqlx::sqlite::{SqliteConnectOptions, SqliteJournalMode, SqlitePool, SqlitePoolOptions};
use sqlx::{Postgres, QueryBuilder, Sqlite};

use crate::job::JobResult;

const SCHEMA: &str = "CREATE TABLE IF NOT EXISTS job_results (
    job_id BIGINT PRIMARY KEY,
    checksum BIGINT NOT NULL,
    consumer TEXT NOT NULL,
    deliveries INTEGER NOT NULL
)";

/// A pool on SQLite (`sqlite://path`, created if missing) or Postgres (`postgres://...`).
#[derive(Debug, Clone)]
pub enum Db {
    /// SQLite, in WAL mode (several consumer processes write to one file).
    Sqlite(SqlitePool),
    /// Postgres.
    Postgres(PgPool),
}

impl Db {
    /// Connects and creates the table if it is missing.
    ///
    /// # Errors
    ///
    /// An unknown scheme, a database that cannot be reached or created.
    pub async fn connect(url: &str) -> Result<Db, sqlx::Error> {
        let db = if url.starts_with("sqlite:") {
            let options = SqliteConnectOptions::from_str(url)?
                .create_if_missing(true)
                .journal_mode(SqliteJournalMode::Wal)
                .busy_timeout(std::time::Duration::from_secs(30));
            Db::Sqlite(
                SqlitePoolOptions::new()
                    .max_connections(4)
                    .connect_with(options)
                    .await?,
            )
        } else if url.starts_with("postgres:") || url.starts_with("postgresql:") {
            Db::Postgres(PgPoolOptions::new().max_connections(4).connect(url).await?)
        } else {
            return Err(sqlx::Error::Configuration(
                format!("`{url}`: expected sqlite://... or postgres://...").into(),
            ));
        };
        match &db {
            Db::Sqlite(p) => sqlx::query(SCHEMA).execute(p).await.map(drop)?,
            Db::Postgres(p) => sqlx::query(SCHEMA).execute(p).await.map(drop)?,
        }
        Ok(db)
    }

    /// Writes `results` in one statement; a job already written is left as it is
    /// (`ON CONFLICT (job_id) DO NOTHING`). Returns how many rows were new.
    ///
    /// # Errors
    ///
    /// The database refused or could not be reached: nothing was written.
    pub async fn insert(&self, results: &[JobResult]) -> Result<u64, sqlx::Error> {
        if results.is_empty() {
            return Ok(0);
        }
        const INSERT: &str = "INSERT INTO job_results (job_id, checksum, consumer, deliveries) ";
        const CONFLICT: &str = " ON CONFLICT (job_id) DO NOTHING";
        match self {
            Db::Sqlite(p) => {
                let mut q = QueryBuilder::<Sqlite>::new(INSERT);
                q.push_values(results, |mut row, r| {
                    row.push_bind(r.job_id)
                        .push_bind(r.checksum)
                        .push_bind(&r.consumer)
                        .push_bind(i64::from(r.deliveries));
                });
                q.push(CONFLICT);
                Ok(q.build().execute(p).await?.rows_affected())
            }
            Db::Postgres(p) => {
                let mut q = QueryBuilder::<Postgres>::new(INSERT);
                q.push_values(results, |mut row, r| {
                    row.push_bind(r.job_id)
                        .push_bind(r.checksum)
                        .push_bind(&r.consumer)
                        .push_bind(i32::try_from(r.deliveries).unwrap_or(i32::MAX));
                });
                q.push(CONFLICT);
                Ok(q.build().execute(p).await?.rows_affected())
            }
        }
    }

    /// How many rows the table holds, and how many distinct job ids.
    ///
    /// # Errors
    ///
    /// The database could not be read.
    pub async fn counts(&self) -> Result<(i64, i64), sqlx::Error> {
        const COUNT: &str = "SELECT COUNT(*), COUNT(DISTINCT job_id) FROM job_results";
        match self {
            Db::Sqlite(p) => sqlx::query_as(COUNT).fetch_one(p).await,
            Db::Postgres(p) => sqlx::query_as(COUNT).fetch_one(p).await,
        }
    }
}
