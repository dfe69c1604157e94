//! Group commit for the inbox.
//!
//! Each webhook request hands its event to a writer task and waits. A writer
//! takes everything queued at that moment (up to a batch limit), stores it
//! in one transaction, and only after the commit answers each request. Under
//! load many requests share one commit (one fsync), which is what makes
//! thousands of durable events per second possible; no request is answered
//! before its own row is durable.
//!
//! Several writers (on PostgreSQL) let commits overlap when many events
//! wait, but a writer with only a few waits for the commit in flight to end
//! and takes what arrived meanwhile: at a moderate rate, with every writer
//! free, each event would otherwise get a commit of its own. At 1,000
//! events/s that was one transaction per event (three round trips and a
//! WAL flush each), and the delivery loadtest's p50 halved on PostgreSQL
//! once commits carried what arrived during the previous one
//! (docs/performance.md, session 10).

use std::sync::Arc;

use tokio::sync::{mpsc, oneshot, Mutex};
use tokio::task::JoinSet;

use crate::store::provider_events::{NewProviderEvent, Stored};
use crate::store::{Store, StoreError, StoreResult};

const MAX_BATCH: usize = 256;
const QUEUE: usize = 8192;
/// Events enough for a commit of their own beside the one in flight.
const OVERLAP_AT: usize = 32;

struct Job {
    event: NewProviderEvent,
    reply: oneshot::Sender<StoreResult<Stored>>,
}

#[derive(Clone)]
pub struct Inbox {
    tx: mpsc::Sender<Job>,
}

impl Inbox {
    /// Starts `writers` writer tasks. They stop once every `Inbox` handle is
    /// dropped and the queue is drained, so nothing submitted is abandoned.
    pub fn start(store: Store, writers: usize) -> (Inbox, JoinSet<()>) {
        let (tx, rx) = mpsc::channel(QUEUE);
        let rx = Arc::new(Mutex::new(rx));
        let mut tasks = JoinSet::new();
        let commits = Arc::new(Commits::default());
        for _ in 0..writers.max(1) {
            tasks.spawn(write_batches(store.clone(), rx.clone(), commits.clone()));
        }
        (Inbox { tx }, tasks)
    }

    /// Stores one event; resolves once it is durable (or known to be a duplicate).
    pub async fn submit(&self, event: NewProviderEvent) -> StoreResult<Stored> {
        let (reply, answer) = oneshot::channel();
        self.tx
            .send(Job { event, reply })
            .await
            .map_err(|_| StoreError::Unavailable(sqlx::Error::PoolClosed))?;
        answer.await.map_err(|_| StoreError::Unavailable(sqlx::Error::PoolClosed))?
    }
}

/// The writers' commits under way, and a signal when one ends.
#[derive(Default)]
struct Commits {
    in_flight: std::sync::atomic::AtomicUsize,
    ended: tokio::sync::Notify,
}

async fn write_batches(store: Store, rx: Arc<Mutex<mpsc::Receiver<Job>>>, commits: Arc<Commits>) {
    use std::sync::atomic::Ordering;
    loop {
        let mut batch = Vec::new();
        {
            let mut rx = rx.lock().await;
            match rx.recv().await {
                Some(job) => batch.push(job),
                None => return,
            }
            while batch.len() < MAX_BATCH {
                match rx.try_recv() {
                    Ok(job) => batch.push(job),
                    Err(_) => break,
                }
            }
            // Few events and another commit under way: gather until it ends
            // (or enough wait to commit beside it), holding the queue so the
            // other writers do not take these events one by one meanwhile.
            let ended = commits.ended.notified();
            tokio::pin!(ended);
            ended.as_mut().enable();
            while batch.len() < OVERLAP_AT && commits.in_flight.load(Ordering::Acquire) > 0 {
                tokio::select! {
                    () = &mut ended => break,
                    job = rx.recv() => match job {
                        Some(job) => batch.push(job),
                        None => break,
                    },
                }
            }
            commits.in_flight.fetch_add(1, Ordering::AcqRel);
        }
        let _ended = CommitEnded(&commits);
        metrics::histogram!("inbox_batch_size").record(batch.len() as f64);
        // Events move into the insert; replies wait for its outcome.
        let (events, replies): (Vec<NewProviderEvent>, Vec<_>) =
            batch.into_iter().map(|j| (j.event, j.reply)).unzip();
        match store.insert_provider_events(&events).await {
            Ok(outcomes) => {
                for (reply, outcome) in replies.into_iter().zip(outcomes) {
                    let _ = reply.send(Ok(outcome));
                }
            }
            Err(e) => {
                let unavailable = e.is_unavailable();
                for reply in replies {
                    let err = if unavailable {
                        StoreError::Unavailable(sqlx::Error::PoolTimedOut)
                    } else {
                        StoreError::Corrupt(format!("inbox write failed: {e}"))
                    };
                    let _ = reply.send(Err(err));
                }
            }
        }
    }
}

/// Marks a writer's commit as ended when dropped, however it ended.
struct CommitEnded<'a>(&'a Commits);

impl Drop for CommitEnded<'_> {
    fn drop(&mut self) {
        self.0.in_flight.fetch_sub(1, std::sync::atomic::Ordering::AcqRel);
        self.0.ended.notify_waiters();
    }
}
