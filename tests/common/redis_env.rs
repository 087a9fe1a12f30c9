//! The shared test Redis of `scripts/with-redis` (`STAGEPIPE_TEST_REDIS`).

use std::sync::atomic::{AtomicU64, Ordering};

use stagepipe::redis::ConnectionManager;

/// The server's URL.
///
/// # Panics
///
/// If `STAGEPIPE_TEST_REDIS` is not set, saying how to run the tests.
pub fn url() -> String {
    std::env::var("STAGEPIPE_TEST_REDIS").unwrap_or_else(|_| {
        panic!(
            "STAGEPIPE_TEST_REDIS is not set: run these tests through `scripts/with-redis`, e.g. \
             `./scripts/with-redis cargo test --features redis --test redis_limiter` (or all of \
             them with `./scripts/test`)"
        )
    })
}

/// A connection to it.
pub async fn conn() -> ConnectionManager {
    stagepipe::redis::connect(&url())
        .await
        .expect("the test Redis answers")
}

/// A connection to a port nothing listens on: every round trip fails at once (refused).
pub fn dead_conn() -> ConnectionManager {
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    stagepipe::redis::connect_lazy(&format!("redis://127.0.0.1:{port}/")).unwrap()
}

/// A name (of a limiter, breaker, window or stream) that no other test, or earlier run, uses.
pub fn unique(test: &str) -> String {
    static N: AtomicU64 = AtomicU64::new(0);
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_nanos();
    format!(
        "test:{test}:{}:{nanos}:{}",
        std::process::id(),
        N.fetch_add(1, Ordering::Relaxed)
    )
}
