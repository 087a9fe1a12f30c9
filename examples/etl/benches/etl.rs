//! The ETL job against the plain sequential loop a user would otherwise write: 200k generated
//! rows into a fresh SQLite file, rows/s.
//!
//! Both load the same file with the same parse/validate/transform code and the same batched,
//! transactional inserts (the job's SQLite batch size, one writer); they differ only in how the
//! work is staged: one step after another, or parse and transform on the pool while the
//! previous batch is written.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use criterion::{Criterion, SamplingMode, Throughput, criterion_group, criterion_main};
use stagepipe_etl::{db, generator, job};

const ROWS: usize = 200_000;

struct Files {
    dir: PathBuf,
    csv: PathBuf,
}

impl Files {
    fn new() -> Self {
        let dir = std::env::temp_dir().join(format!("stagepipe-etl-bench-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let csv = dir.join("violations.csv");
        let out = std::io::BufWriter::new(std::fs::File::create(&csv).unwrap());
        generator::generate(&generator::GenConfig::new(ROWS, 7), out).unwrap();
        Files { dir, csv }
    }

    /// A fresh, empty database with the schema.
    async fn fresh_db(&self, connections: u32) -> (db::Db, String) {
        let path = self.dir.join("bench.sqlite");
        for suffix in ["", "-wal", "-shm"] {
            let _ = std::fs::remove_file(format!("{}{suffix}", path.display()));
        }
        let url = format!("sqlite://{}", path.display());
        let db = db::Db::connect(&url, connections).await.unwrap();
        db.ensure_schema().await.unwrap();
        (db, url)
    }
}

impl Drop for Files {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

async fn job_once(files: &Files, csv: &Path) -> (Duration, job::Totals, String) {
    let (db, url) = files.fresh_db(3).await;
    let config = job::Config::new(csv, url);
    let start = Instant::now();
    let (totals, stats) = job::load(&db, &config).await.unwrap();
    let took = start.elapsed();
    db.close().await;
    (took, totals, stats)
}

async fn sequential_once(files: &Files, csv: &Path) -> Duration {
    let (db, _) = files.fresh_db(1).await;
    let start = Instant::now();
    let totals = job::run_sequential(csv, &db, job::SQLITE_BATCH)
        .await
        .unwrap();
    let took = start.elapsed();
    assert_eq!(totals.read, ROWS as u64);
    db.close().await;
    took
}

fn etl(c: &mut Criterion) {
    let rt = tokio::runtime::Runtime::new().unwrap();
    let files = Files::new();
    let csv = files.csv.clone();

    // One run with the stats table, to see where the time goes.
    let (took, totals, stats) = rt.block_on(job_once(&files, &csv));
    eprintln!(
        "\netl: {} rows in {took:.2?} ({:.0} rows/s): {totals:?}\n{stats}\n",
        totals.read,
        totals.read as f64 / took.as_secs_f64()
    );

    let mut group = c.benchmark_group("etl_200k_rows_sqlite");
    group
        .sample_size(10)
        .sampling_mode(SamplingMode::Flat)
        .warm_up_time(Duration::from_secs(1))
        .measurement_time(Duration::from_secs(20))
        .throughput(Throughput::Elements(ROWS as u64));
    group.bench_function("sequential_loop", |b| {
        b.to_async(&rt).iter_custom(|iters| {
            let (files, csv) = (&files, &csv);
            async move {
                let mut total = Duration::ZERO;
                for _ in 0..iters {
                    total += sequential_once(files, csv).await;
                }
                total
            }
        })
    });
    group.bench_function("stagepipe_job", |b| {
        b.to_async(&rt).iter_custom(|iters| {
            let (files, csv) = (&files, &csv);
            async move {
                let mut total = Duration::ZERO;
                for _ in 0..iters {
                    total += job_once(files, csv).await.0;
                }
                total
            }
        })
    });
    group.finish();
}

criterion_group!(benches, etl);
criterion_main!(benches);
