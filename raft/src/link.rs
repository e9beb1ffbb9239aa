//! The replication link: AppendEntries (replication and heartbeats) on a connection of its
//! own, without HTTP/2.
//!
//! A link is any byte stream the node's [`crate::Connector`] opens to a peer; in
//! production a mutually authenticated TLS connection to the peer's node port that
//! negotiated the ALPN protocol [`LINK_ALPN`], which the node hands to [`serve_link`]
//! instead of its gRPC server. Messages are the gRPC transport's own protobuf messages,
//! each sent as a 4-byte big-endian length and the encoded message: the leader writes one
//! `AppendEntriesRequest`, the follower answers it with one `AppendEntriesReply`, and
//! only then does the next request go out. A link is checked out of [`crate::network::Peers`]
//! for one exchange and put back once its reply has been read, so a call that is dropped
//! midway takes its link with it and a late reply can never answer a later request.
//!
//! Why: a round trip through the HTTP/2 stacks of tonic and hyper (client task, connection
//! tasks, server task) costs more than the follower's fsync; here each end is one task
//! reading and writing the socket itself. A node without links (older build, plaintext
//! test connector) is reached over the gRPC `AppendEntriesStream` or unary `AppendEntries`.

use ca_proto::raft as pb;
use prost::Message;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::sync::watch;

use crate::network::MAX_MESSAGE_SIZE;
use crate::policy::Admitted;
use crate::service::{append_entries, ends_exchange};
use crate::types::Raft;

/// The ALPN protocol name of a replication link on a node's TLS port.
pub const LINK_ALPN: &[u8] = b"spiffe-ca-raft-append/1";

/// A byte stream a link runs on.
pub trait LinkIo: AsyncRead + AsyncWrite + Send + Unpin + 'static {}
impl<T: AsyncRead + AsyncWrite + Send + Unpin + 'static> LinkIo for T {}

/// An open link, as a [`crate::Connector`] returns it.
pub type BoxLink = Box<dyn LinkIo>;

/// Writes `msg` as one frame and flushes it.
pub(crate) async fn write_frame<M: Message>(
    io: &mut (impl AsyncWrite + Unpin),
    msg: &M,
) -> std::io::Result<()> {
    let len = msg.encoded_len();
    let mut buf = Vec::with_capacity(4 + len);
    buf.extend_from_slice(&frame_len(len)?.to_be_bytes());
    msg.encode(&mut buf).map_err(std::io::Error::other)?;
    io.write_all(&buf).await?;
    io.flush().await
}

fn frame_len(len: usize) -> std::io::Result<u32> {
    if len > MAX_MESSAGE_SIZE {
        return Err(std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            format!(
                "a replication link frame of {len} bytes is over the {MAX_MESSAGE_SIZE}-byte limit"
            ),
        ));
    }
    Ok(len as u32)
}

/// What reading a frame gave.
#[derive(Debug)]
pub(crate) enum Frame<M> {
    /// One whole message.
    Message(M),
    /// The peer closed the link cleanly between frames.
    Closed,
    /// A frame arrived whole but is not a valid message (or too long to take); the link
    /// cannot be trusted further.
    Malformed(String),
}

/// Reads one frame. An I/O error, or a connection that ends inside a frame, is an error.
pub(crate) async fn read_frame<M: Message + Default>(
    io: &mut (impl AsyncRead + Unpin),
) -> std::io::Result<Frame<M>> {
    let mut len = [0u8; 4];
    // A clean end of the link is an end between frames.
    let first = io.read(&mut len).await?;
    if first == 0 {
        return Ok(Frame::Closed);
    }
    io.read_exact(&mut len[first..]).await?;
    let len = u32::from_be_bytes(len) as usize;
    if len > MAX_MESSAGE_SIZE {
        return Ok(Frame::Malformed(format!(
            "a frame of {len} bytes is over the {MAX_MESSAGE_SIZE}-byte limit"
        )));
    }
    let mut buf = vec![0u8; len];
    io.read_exact(&mut buf).await?;
    Ok(match M::decode(buf.as_slice()) {
        Ok(m) => Frame::Message(m),
        Err(e) => Frame::Malformed(format!(
            "not a protobuf {}: {e}",
            std::any::type_name::<M>()
        )),
    })
}

/// Serves one replication link from a peer until it closes, sends something that is not a
/// valid request (answered with a `rejected` reply saying why), this node reports it failed
/// or stopped (answered with that error), or `stop` turns true (or its sender is dropped).
/// Requests are handed to `raft` one at a time, each answered before the next is read.
///
/// The caller authenticates the peer first (`caller`, from the node's
/// [`crate::policy::PeerPolicy`]); each request is served only while `caller` still passes
/// [`Admitted::recheck`], else it is answered `rejected` with the reason and the link ends.
pub async fn serve_link<IO: AsyncRead + AsyncWrite + Unpin>(
    raft: Raft,
    mut io: IO,
    mut stop: watch::Receiver<bool>,
    caller: Admitted,
) {
    use pb::append_entries_reply::Result as R;
    loop {
        let frame = tokio::select! {
            frame = read_frame::<pb::AppendEntriesRequest>(&mut io) => frame,
            _ = stop.wait_for(|stop| *stop) => return,
        };
        let reply = match frame {
            Ok(Frame::Message(req)) => {
                let served = match caller.recheck() {
                    Ok(()) => append_entries(&raft, req).await,
                    Err(refused) => Err(refused),
                };
                match served {
                    Ok(reply) => reply,
                    Err(status) => pb::AppendEntriesReply {
                        result: Some(R::Rejected(status.message().to_owned())),
                    },
                }
            }
            Ok(Frame::Malformed(why)) => pb::AppendEntriesReply {
                result: Some(R::Rejected(format!(
                    "malformed AppendEntries request: {why}"
                ))),
            },
            Ok(Frame::Closed) => return,
            Err(e) => {
                tracing::debug!(error = %e, "replication link read failed");
                return;
            }
        };
        let last = ends_exchange(&reply);
        if let Err(e) = write_frame(&mut io, &reply).await {
            tracing::debug!(error = %e, "replication link write failed");
            return;
        }
        if last {
            let _ = io.shutdown().await;
            return;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn frames_round_trip_and_bad_ones_are_told_apart() {
        let (mut a, mut b) = tokio::io::duplex(1024);
        let req = pb::AppendEntriesRequest {
            vote: Some(pb::Vote {
                term: 3,
                node_id: 1,
                committed: true,
            }),
            entries: vec![b"{}".to_vec(); 3],
            ..Default::default()
        };
        write_frame(&mut a, &req).await.unwrap();
        match read_frame::<pb::AppendEntriesRequest>(&mut b)
            .await
            .unwrap()
        {
            Frame::Message(got) => assert_eq!(got, req),
            other => panic!("{other:?}"),
        }

        // A length over the limit is refused without reading (or allocating) the body.
        a.write_all(&u32::MAX.to_be_bytes()).await.unwrap();
        match read_frame::<pb::AppendEntriesRequest>(&mut b)
            .await
            .unwrap()
        {
            Frame::Malformed(why) => assert!(why.contains("over the"), "{why}"),
            other => panic!("{other:?}"),
        }

        // Bytes that are not the message.
        a.write_all(&3u32.to_be_bytes()).await.unwrap();
        a.write_all(&[0xff, 0xff, 0xff]).await.unwrap();
        match read_frame::<pb::AppendEntriesRequest>(&mut b)
            .await
            .unwrap()
        {
            Frame::Malformed(why) => assert!(why.contains("not a protobuf"), "{why}"),
            other => panic!("{other:?}"),
        }

        // The peer goes away inside a frame: an error, not a clean close.
        a.write_all(&10u32.to_be_bytes()).await.unwrap();
        a.write_all(&[1, 2]).await.unwrap();
        drop(a);
        assert!(read_frame::<pb::AppendEntriesRequest>(&mut b)
            .await
            .is_err());
        // And between frames: a clean close.
        let (a, mut b) = tokio::io::duplex(64);
        drop(a);
        assert!(matches!(
            read_frame::<pb::AppendEntriesRequest>(&mut b)
                .await
                .unwrap(),
            Frame::Closed
        ));
    }
}
