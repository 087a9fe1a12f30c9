//! A job: what a stream entry carries (`id`, `payload`), and its work.

use std::fmt;
use std::time::Duration;

use stagepipe::redis::{FieldError, Message};

/// One job, as a producer added it: `XADD <stream> * id <id> payload <text>`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Job {
    /// The job's id, unique in the stream: the key of its result row.
    pub id: i64,
    /// What to work on.
    pub payload: String,
    /// How many times the stream has delivered it (1 the first time).
    pub deliveries: u32,
}

/// The result of a job, as written to the database.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct JobResult {
    /// The job's id.
    pub job_id: i64,
    /// The work's outcome: a checksum of the payload.
    pub checksum: i64,
    /// The consumer that did the work.
    pub consumer: String,
    /// The delivery that did it.
    pub deliveries: u32,
}

/// A job that cannot be read from its entry, or whose work failed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum JobError {
    /// A field is missing or not UTF-8.
    Field(FieldError),
    /// The `id` field is not an integer.
    BadId(String),
    /// The payload asks the work to fail (`fail...`): a poison job, for the dead-letter stream.
    Poison,
}

impl fmt::Display for JobError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            JobError::Field(_) => f.write_str("malformed job entry"),
            JobError::BadId(id) => write!(f, "job id `{id}` is not an integer"),
            JobError::Poison => f.write_str("the job failed"),
        }
    }
}

impl std::error::Error for JobError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            JobError::Field(e) => Some(e),
            _ => None,
        }
    }
}

impl Job {
    /// The job a message carries.
    ///
    /// # Errors
    ///
    /// A missing or non-UTF-8 `id` or `payload`, or an `id` that is not an integer.
    pub fn from_message(msg: &Message) -> Result<Job, JobError> {
        let id = msg.text("id").map_err(JobError::Field)?;
        let id = id.parse().map_err(|_| JobError::BadId(id.to_owned()))?;
        let payload = msg.text("payload").map_err(JobError::Field)?.to_owned();
        Ok(Job {
            id,
            payload,
            deliveries: msg.deliveries(),
        })
    }
}

/// The work: waits `work` (a stand-in for a call to another service), then checksums the
/// payload (64-bit FNV-1a). A payload starting with `fail` fails.
///
/// # Errors
///
/// [`JobError::Poison`] for a payload starting with `fail`.
pub async fn process(job: Job, consumer: &str, work: Duration) -> Result<JobResult, JobError> {
    if !work.is_zero() {
        tokio::time::sleep(work).await;
    }
    if job.payload.starts_with("fail") {
        return Err(JobError::Poison);
    }
    Ok(JobResult {
        job_id: job.id,
        checksum: checksum(job.payload.as_bytes()),
        consumer: consumer.to_owned(),
        deliveries: job.deliveries,
    })
}

/// 64-bit FNV-1a of `bytes`, as the `i64` a database column holds.
pub fn checksum(bytes: &[u8]) -> i64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in bytes {
        h ^= u64::from(*b);
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    h as i64
}
