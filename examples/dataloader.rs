//! The dataloader pattern: many concurrent requests look up users by id; one loader collects
//! the ids, drops the duplicates and fetches each batch with a single query.
//!
//! Each request registers its reply with the loader before sending the id, so a lookup whose
//! id is dropped as a duplicate is answered by the query that fetches its twin.
//!
//! Run it with `cargo run --example dataloader`.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures::StreamExt;
use futures::channel::mpsc;
use stagepipe::PipelineExt;
use tokio::sync::oneshot;

#[derive(Debug, Clone)]
struct User {
    id: u64,
    name: String,
}

/// The "database": an in-memory table, with a query that takes a few milliseconds.
struct Database {
    users: HashMap<u64, User>,
}

impl Database {
    fn new(rows: u64) -> Self {
        let users = (1..=rows)
            .map(|id| {
                (
                    id,
                    User {
                        id,
                        name: format!("user-{id}"),
                    },
                )
            })
            .collect();
        Self { users }
    }

    /// `SELECT * FROM users WHERE id IN (...)`.
    async fn fetch(&self, ids: &[u64]) -> Vec<User> {
        tokio::time::sleep(Duration::from_millis(2)).await;
        ids.iter()
            .filter_map(|id| self.users.get(id).cloned())
            .collect()
    }
}

/// Replies waiting for a user, by id.
type Waiting = Arc<Mutex<HashMap<u64, Vec<oneshot::Sender<Option<User>>>>>>;

/// A handle the requests use to look a user up.
#[derive(Clone)]
struct Loader {
    ids: mpsc::UnboundedSender<u64>,
    waiting: Waiting,
}

impl Loader {
    async fn load(&self, id: u64) -> Option<User> {
        let (reply, answer) = oneshot::channel();
        self.waiting
            .lock()
            .unwrap()
            .entry(id)
            .or_default()
            .push(reply);
        self.ids.unbounded_send(id).ok()?;
        answer.await.ok().flatten()
    }
}

#[derive(Debug, Default)]
struct Counts {
    queries: u64,
    rows: u64,
}

/// Starts the loader: batches of up to 100 distinct ids, each sent at most 5 ms after its first.
fn start(db: Arc<Database>) -> (Loader, tokio::task::JoinHandle<Counts>) {
    let (tx, rx) = mpsc::unbounded();
    let waiting = Waiting::default();
    let loader = Loader {
        ids: tx,
        waiting: waiting.clone(),
    };
    let task = tokio::spawn(async move {
        let mut counts = Counts::default();
        let mut batches = rx.batch_dedupe(100, Duration::from_millis(5), |id: &u64| *id);
        while let Some(ids) = batches.next().await {
            let users = db.fetch(&ids).await;
            counts.queries += 1;
            counts.rows += ids.len() as u64;
            let mut found: HashMap<u64, User> = users.into_iter().map(|u| (u.id, u)).collect();
            let mut waiting = waiting.lock().unwrap();
            for id in ids {
                let user = found.remove(&id);
                for reply in waiting.remove(&id).unwrap_or_default() {
                    let _ = reply.send(user.clone());
                }
            }
        }
        counts
    });
    (loader, task)
}

#[tokio::main]
async fn main() {
    const REQUESTS: u64 = 1000;
    const LOOKUPS_PER_REQUEST: u64 = 5;
    let db = Arc::new(Database::new(300));
    let (loader, loader_task) = start(db);

    // Each request renders a page that shows five users (some ids do not exist).
    let mut requests = Vec::new();
    for r in 0..REQUESTS {
        let loader = loader.clone();
        requests.push(tokio::spawn(async move {
            let mut names = Vec::new();
            for k in 0..LOOKUPS_PER_REQUEST {
                let id = (r * 7919 + k * 104_729) % 320 + 1;
                if let Some(user) = loader.load(id).await {
                    names.push(user.name);
                }
            }
            names.len()
        }));
    }
    let mut found = 0;
    for request in requests {
        found += request.await.expect("request task");
    }
    // All senders gone: the loader flushes its last batch and ends.
    drop(loader);
    let counts = loader_task.await.expect("loader task");

    let lookups = REQUESTS * LOOKUPS_PER_REQUEST;
    println!("{lookups} lookups from {REQUESTS} concurrent requests ({found} users found)");
    println!(
        "{} queries fetched {} ids: {} lookups saved ({:.0}%), {:.1} lookups per query",
        counts.queries,
        counts.rows,
        lookups - counts.rows,
        100.0 * (lookups - counts.rows) as f64 / lookups as f64,
        lookups as f64 / counts.queries as f64,
    );
}
