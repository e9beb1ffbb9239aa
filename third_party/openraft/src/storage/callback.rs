//! Callbacks used by Storage API

use std::io;

use tokio::sync::oneshot;

use crate::async_runtime::AsyncOneshotSendExt;
use crate::core::notify::Notify;
use crate::raft_state::io_state::log_io_id::LogIOId;
use crate::type_config::alias::OneshotSenderOf;
use crate::LogId;
use crate::RaftTypeConfig;
use crate::StorageIOError;

/// A oneshot callback for completion of log io operation.
pub struct LogFlushed<C>
where C: RaftTypeConfig
{
    log_io_id: LogIOId<C::NodeId>,
    /// PATCHED: an `Option` so that `Drop` can tell a callback that was never completed.
    tx: Option<FlushedTx<C>>,
}

/// Where a [`LogFlushed`] reports to.
///
/// PATCHED (third_party/openraft/PATCHED.md): a leader's own appends report to `RaftCore`'s
/// notification channel instead of a oneshot that `RaftCore` waits on, so that `RaftCore`
/// replicates the entries while they are being flushed.
enum FlushedTx<C>
where C: RaftTypeConfig
{
    /// `RaftCore` waits on the receiver.
    Oneshot(OneshotSenderOf<C, Result<LogIOId<C::NodeId>, io::Error>>),
    /// `RaftCore` hears of it as [`Notify::LocalLogFlushed`], in flush order.
    Notify(tokio::sync::mpsc::UnboundedSender<Notify<C>>),
}

impl<C> LogFlushed<C>
where C: RaftTypeConfig
{
    pub(crate) fn new(
        log_io_id: LogIOId<C::NodeId>,
        tx: OneshotSenderOf<C, Result<LogIOId<C::NodeId>, io::Error>>,
    ) -> Self {
        Self {
            log_io_id,
            tx: Some(FlushedTx::Oneshot(tx)),
        }
    }

    /// PATCHED: a callback that reports to `RaftCore`'s notification channel.
    pub(crate) fn new_notify(log_io_id: LogIOId<C::NodeId>, tx: tokio::sync::mpsc::UnboundedSender<Notify<C>>) -> Self {
        Self {
            log_io_id,
            tx: Some(FlushedTx::Notify(tx)),
        }
    }

    /// Report log io completion event.
    ///
    /// It will be called when the log is successfully appended to the storage or an error occurs.
    pub fn log_io_completed(mut self, result: Result<(), io::Error>) {
        if let Err(e) = &result {
            tracing::error!("LogFlush error: {}, while flushing upto {}", e, self.log_io_id);
        }
        let log_io_id = self.log_io_id.clone();
        match self.tx.take() {
            None => {}
            Some(FlushedTx::Oneshot(tx)) => {
                let res = match result {
                    Err(e) => tx.send(Err(e)),
                    Ok(()) => tx.send(Ok(log_io_id)),
                };
                if let Err(e) = res {
                    tracing::error!("failed to send log io completion event: {:?}", e);
                }
            }
            Some(FlushedTx::Notify(tx)) => {
                let notify = Notify::LocalLogFlushed { log_io_id, result };
                if tx.send(notify).is_err() {
                    tracing::error!("failed to send log io completion event: RaftCore is gone");
                }
            }
        }
    }
}

/// PATCHED: a notify callback dropped without being completed (the log store failed in a way
/// it could not report) is reported as a failed flush, which stops `RaftCore`, instead of
/// leaving the leader waiting for a flush that never comes. (A dropped oneshot callback
/// already reads as an error on the waiting side.)
impl<C> Drop for LogFlushed<C>
where C: RaftTypeConfig
{
    fn drop(&mut self) {
        if let Some(FlushedTx::Notify(tx)) = self.tx.take() {
            let _ = tx.send(Notify::LocalLogFlushed {
                log_io_id: self.log_io_id.clone(),
                result: Err(io::Error::other("the log store dropped a flush callback without completing it")),
            });
        }
    }
}

/// A oneshot callback for completion of applying logs to state machine.
pub struct LogApplied<C>
where C: RaftTypeConfig
{
    last_log_id: LogId<C::NodeId>,
    tx: oneshot::Sender<Result<(LogId<C::NodeId>, Vec<C::R>), StorageIOError<C::NodeId>>>,
}

impl<C> LogApplied<C>
where C: RaftTypeConfig
{
    #[allow(dead_code)]
    pub(crate) fn new(
        last_log_id: LogId<C::NodeId>,
        tx: oneshot::Sender<Result<(LogId<C::NodeId>, Vec<C::R>), StorageIOError<C::NodeId>>>,
    ) -> Self {
        Self { last_log_id, tx }
    }

    /// Report apply io completion event.
    ///
    /// It will be called when the log is successfully applied to the state machine or an error
    /// occurs.
    pub fn completed(self, result: Result<Vec<C::R>, StorageIOError<C::NodeId>>) {
        let res = match result {
            Ok(x) => {
                tracing::debug!("LogApplied upto {}", self.last_log_id);
                let resp = (self.last_log_id.clone(), x);
                self.tx.send(Ok(resp))
            }
            Err(e) => {
                tracing::error!("LogApplied error: {}, while applying upto {}", e, self.last_log_id);
                self.tx.send(Err(e))
            }
        };

        if let Err(_e) = res {
            tracing::error!("failed to send apply complete event, last_log_id: {}", self.last_log_id);
        }
    }
}
