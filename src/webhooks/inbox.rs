//! Group commit for the inbox.
//!
//! Each webhook request hands its event to a writer task and waits. A writer
//! takes everything queued at that moment (up to a batch limit), stores it
//! in one transaction, and only after the commit answers each request. Under
//! load many requests share one commit (one fsync), which is what makes
//! thousands of durable events per second possible; no request is answered
//! before its own row is durable.

use std::sync::Arc;

use tokio::sync::{mpsc, oneshot, Mutex};
use tokio::task::JoinSet;

use crate::store::provider_events::{NewProviderEvent, Stored};
use crate::store::{Store, StoreError, StoreResult};

const MAX_BATCH: usize = 256;
const QUEUE: usize = 8192;

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
        for _ in 0..writers.max(1) {
            tasks.spawn(write_batches(store.clone(), rx.clone()));
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

async fn write_batches(store: Store, rx: Arc<Mutex<mpsc::Receiver<Job>>>) {
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
        }
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
