//! `WatchEntries` on a real node, from a client of its own (an agent's SVID, no agent
//! process): 50,000 entries arrive as chunked deltas on an open stream and as a chunked
//! full set on a new one, never one message over gRPC's 4 MiB limit; a stream resumed from
//! its revision gets only the bundle, then the changes; an eviction ends the stream.

use std::collections::HashSet;
use std::time::{Duration, Instant};

use ca_proto::admin::{BatchCreateEntriesRequest, DeleteEntryRequest, EvictAgentRequest};
use ca_proto::node::{WatchEntriesRequest, WatchEntriesResponse};
use prost::Message;
use tonic::Streaming;

use crate::common::{admin, agent_client, entry, new_agent, TD};

const ENTRIES: usize = 50_000;

/// Reads messages until `want` distinct entries arrived over complete updates; returns
/// them, the revision and how many messages it took. Checks every message's size.
async fn collect(
    stream: &mut Streaming<WatchEntriesResponse>,
    want: usize,
) -> (HashSet<String>, u64, usize) {
    let mut ids = HashSet::new();
    let mut messages = 0;
    loop {
        let m = tokio::time::timeout(Duration::from_secs(60), stream.message())
            .await
            .expect("an update within 60 s")
            .expect("the stream stays healthy")
            .expect("the stream stays open");
        messages += 1;
        assert!(
            m.encoded_len() < 4 << 20,
            "a message of {} bytes",
            m.encoded_len()
        );
        assert!(m.removed_entry_ids.is_empty(), "{:?}", m.removed_entry_ids);
        ids.extend(m.entries.iter().map(|e| e.id.clone()));
        if !m.more && ids.len() >= want {
            return (ids, m.revision, messages);
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fifty_thousand_entries_are_pushed_in_chunks_and_resumed() {
    let tmp = tempfile::tempdir().unwrap();
    let node = ca_node::start(ca_dev::node_config(tmp.path()))
        .await
        .unwrap();
    let agent_id = format!("spiffe://{TD}/agent/big");
    let svid = new_agent(&node, &agent_id).await;
    let mut client = agent_client(&node, &svid);

    // The first message: a full set of nothing, with the bundle.
    let mut open = client
        .watch_entries(WatchEntriesRequest { revision: 0 })
        .await
        .unwrap()
        .into_inner();
    let first = open.message().await.unwrap().unwrap();
    assert!(first.full && !first.more && first.entries.is_empty());
    assert!(first.bundle.is_some());

    // 50,000 entries under the agent, in batches of 1,000 through the admin API.
    let mut admin = admin(&node.admin_socket).await;
    let t0 = Instant::now();
    for b in 0..ENTRIES / 1000 {
        let entries = (0..1000)
            .map(|i| {
                entry(
                    &format!("spiffe://{TD}/svc/{b}-{i}"),
                    &agent_id,
                    &["unix:uid:4242"],
                )
            })
            .collect();
        let r = admin
            .batch_create_entries(BatchCreateEntriesRequest { entries })
            .await
            .unwrap()
            .into_inner();
        assert!(
            r.results.iter().all(|x| x.code == 0 && x.entry.is_some()),
            "{:?}",
            r.results.first()
        );
    }
    let created = t0.elapsed();

    // The open stream receives them as deltas.
    let (ids, revision, messages) = collect(&mut open, ENTRIES).await;
    eprintln!(
        "{ENTRIES} entries: created in {created:?}, on the open stream {:?} after the first batch began, in {messages} messages",
        t0.elapsed()
    );
    assert_eq!(ids.len(), ENTRIES);

    // A new stream from nothing gets them as a full set in chunks.
    let t1 = Instant::now();
    let mut fresh = client
        .watch_entries(WatchEntriesRequest { revision: 0 })
        .await
        .unwrap()
        .into_inner();
    let head = fresh.message().await.unwrap().unwrap();
    assert!(
        head.full && head.more,
        "a 50,000-entry set comes in several messages"
    );
    let mut full: HashSet<String> = head.entries.iter().map(|e| e.id.clone()).collect();
    let (rest, full_revision, n) = collect(&mut fresh, ENTRIES - full.len()).await;
    full.extend(rest);
    eprintln!(
        "full set of {} entries in {} messages, {:?}",
        full.len(),
        n + 1,
        t1.elapsed()
    );
    assert_eq!(full, ids);
    assert_eq!(full_revision, revision);

    // Resumed from that revision: the bundle only, then a deletion as it happens.
    let mut resumed = client
        .watch_entries(WatchEntriesRequest { revision })
        .await
        .unwrap()
        .into_inner();
    let m = resumed.message().await.unwrap().unwrap();
    assert!(
        !m.full && !m.more && m.entries.is_empty() && m.bundle.is_some(),
        "{:?}",
        (m.full, m.entries.len())
    );
    assert_eq!(m.revision, revision);
    let gone = ids.iter().next().unwrap().clone();
    admin
        .delete_entry(DeleteEntryRequest { id: gone.clone() })
        .await
        .unwrap();
    let m = tokio::time::timeout(Duration::from_secs(10), resumed.message())
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    assert_eq!(m.removed_entry_ids, [gone]);
    assert!(m.entries.is_empty() && m.revision > revision);

    // Evicted: the stream ends with PERMISSION_DENIED, and a new one is refused.
    admin
        .evict_agent(EvictAgentRequest {
            spiffe_id: agent_id.clone(),
        })
        .await
        .unwrap();
    let end = tokio::time::timeout(Duration::from_secs(10), async {
        loop {
            match resumed.message().await {
                Ok(Some(_)) => continue,
                other => return other,
            }
        }
    })
    .await
    .expect("the stream ends within 10 s of the eviction");
    let e = end.expect_err("ends with an error");
    assert_eq!(e.code(), tonic::Code::PermissionDenied, "{e:?}");
    assert!(e.message().contains("evicted"), "{}", e.message());
    let e = client
        .watch_entries(WatchEntriesRequest { revision: 0 })
        .await
        .expect_err("refused after the eviction");
    assert_eq!(e.code(), tonic::Code::PermissionDenied, "{e:?}");
    node.shutdown().await;
}

/// One agent holds at most `MAX_STREAMS_PER_AGENT` streams on a node: the next is refused
/// with RESOURCE_EXHAUSTED saying so, and closing one makes room.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_agent_holds_a_bounded_number_of_streams() {
    let tmp = tempfile::tempdir().unwrap();
    let node = ca_node::start(ca_dev::node_config(tmp.path()))
        .await
        .unwrap();
    let svid = new_agent(&node, &format!("spiffe://{TD}/agent/greedy")).await;
    let mut client = agent_client(&node, &svid);
    let mut open = Vec::new();
    for _ in 0..ca_node::watch_hub::MAX_STREAMS_PER_AGENT {
        let mut s = client
            .watch_entries(WatchEntriesRequest { revision: 0 })
            .await
            .unwrap()
            .into_inner();
        assert!(s.message().await.unwrap().unwrap().full);
        open.push(s);
    }
    let e = client
        .watch_entries(WatchEntriesRequest { revision: 0 })
        .await
        .expect_err("one stream too many");
    assert_eq!(e.code(), tonic::Code::ResourceExhausted, "{e:?}");
    assert!(
        e.message().contains("WatchEntries streams"),
        "{}",
        e.message()
    );
    drop(open.pop());
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        match client
            .watch_entries(WatchEntriesRequest { revision: 0 })
            .await
        {
            Ok(_) => break,
            Err(e) if e.code() == tonic::Code::ResourceExhausted => {
                assert!(
                    Instant::now() < deadline,
                    "the closed stream never made room"
                );
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            Err(e) => panic!("{e:?}"),
        }
    }
    node.shutdown().await;
}
