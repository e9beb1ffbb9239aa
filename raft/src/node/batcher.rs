//! Writes that arrive together go to the log as one entry.
//!
//! openraft appends, replicates, syncs and applies every `client_write` on its own, so under
//! load the leader pays all of that once per command. The [`WriteBatcher`] queues
//! [`Command::batchable`] writes; a task takes the first one waiting, then everything else
//! already queued (up to [`MAX_BATCH`]), and proposes them as one [`Command::Batch`], whose
//! [`Response::Batch`] is handed back answer by answer. At most [`BATCHES_IN_FLIGHT`]
//! batches are proposed at once: the writes that arrive meanwhile make up the next one. A
//! write that finds the queue empty goes alone, so one write at a time is not delayed.

use std::future::Future;
use std::sync::Arc;

use tokio::sync::{mpsc, oneshot, Semaphore};

use crate::{Error, Result};
use ca_state::{Command, Response};

/// The most commands in one batch.
pub const MAX_BATCH: usize = 256;

/// How many batches (or single writes) are proposed at once. Fewer in flight make bigger
/// batches; one measured best in the write benchmark (docs/BENCHMARKS.md).
pub const BATCHES_IN_FLIGHT: usize = 1;

type Pending = (Command, oneshot::Sender<Result<Response>>);

/// The queue of writes waiting to be proposed; see the module docs.
#[derive(Debug)]
pub(crate) struct WriteBatcher {
    queue: mpsc::UnboundedSender<Pending>,
}

impl WriteBatcher {
    /// Starts the batching task; `propose` takes one command (a single write or a batch) to
    /// the log. The task ends when the batcher is dropped.
    pub(crate) fn start<F, Fut>(propose: F) -> Self
    where
        F: Fn(Command) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = Result<Response>> + Send + 'static,
    {
        let (tx, rx) = mpsc::unbounded_channel();
        tokio::spawn(run(rx, Arc::new(propose)));
        Self { queue: tx }
    }

    /// Proposes `cmd` with whatever else is waiting; its own answer.
    pub(crate) async fn write(&self, cmd: Command) -> Result<Response> {
        let (tx, rx) = oneshot::channel();
        self.queue
            .send((cmd, tx))
            .map_err(|_| Error::Unavailable("the node is shutting down".into()))?;
        rx.await
            .map_err(|_| Error::Unavailable("the node is shutting down".into()))?
    }
}

async fn run<F, Fut>(mut rx: mpsc::UnboundedReceiver<Pending>, propose: Arc<F>)
where
    F: Fn(Command) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = Result<Response>> + Send + 'static,
{
    let slots = Arc::new(Semaphore::new(BATCHES_IN_FLIGHT));
    while let Some(first) = rx.recv().await {
        let Ok(slot) = Arc::clone(&slots).acquire_owned().await else {
            return;
        };
        let mut batch = vec![first];
        while batch.len() < MAX_BATCH {
            match rx.try_recv() {
                Ok(p) => batch.push(p),
                Err(_) => break,
            }
        }
        let propose = Arc::clone(&propose);
        tokio::spawn(async move {
            deliver(batch, propose.as_ref()).await;
            drop(slot);
        });
    }
}

async fn deliver<F, Fut>(mut batch: Vec<Pending>, propose: &F)
where
    F: Fn(Command) -> Fut,
    Fut: Future<Output = Result<Response>>,
{
    if batch.len() == 1 {
        let (cmd, tx) = batch.pop().expect("one write");
        let _ = tx.send(propose(cmd).await);
        return;
    }
    let (commands, answers): (Vec<Command>, Vec<_>) = batch.into_iter().unzip();
    let n = commands.len();
    match propose(Command::Batch { commands }).await {
        Ok(Response::Batch(rs)) if rs.len() == n => {
            for (tx, r) in answers.into_iter().zip(rs) {
                let _ = tx.send(Ok(r));
            }
        }
        Ok(other) => {
            for tx in answers {
                let _ = tx.send(Err(Error::Corrupt(format!(
                    "a batch of {n} writes was answered {other:?}"
                ))));
            }
        }
        Err(e) => {
            for tx in answers {
                let _ = tx.send(Err(e.for_each_caller()));
            }
        }
    }
}
