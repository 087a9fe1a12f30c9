//! Adding jobs to the stream.

use redis::RedisError;
use redis::aio::ConnectionManager;

/// The payload of job `id`.
pub fn payload(id: i64) -> String {
    format!("job {id}")
}

/// Adds jobs `first..first + jobs` to `stream` (`XADD <stream> * id <id> payload <payload>`),
/// 1000 to a round trip. Returns their entry ids.
///
/// # Errors
///
/// A command that failed.
pub async fn produce(
    conn: &mut ConnectionManager,
    stream: &str,
    first: i64,
    jobs: u64,
) -> Result<Vec<String>, RedisError> {
    let mut ids = Vec::with_capacity(usize::try_from(jobs).unwrap_or(0));
    let end = first.saturating_add(i64::try_from(jobs).unwrap_or(i64::MAX));
    let mut next = first;
    while next < end {
        let chunk_end = end.min(next + 1000);
        let mut pipe = redis::pipe();
        for id in next..chunk_end {
            pipe.cmd("XADD")
                .arg(stream)
                .arg("*")
                .arg("id")
                .arg(id)
                .arg("payload")
                .arg(payload(id));
        }
        let added: Vec<String> = pipe.query_async(conn).await?;
        ids.extend(added);
        next = chunk_end;
    }
    Ok(ids)
}
