//! Listing entries and agents in pages over the real admin socket: pages in order, together
//! exactly the whole list, filters applied per page, and bad paging input refused.

use crate::common::*;
use ca_proto::admin::{CreateEntryRequest, ListAgentsRequest, ListEntriesRequest};
use tonic::Code;

const PARENT: &str = "spiffe://dev.example.org/agent/host-1";

#[tokio::test]
async fn entries_and_agents_list_in_pages() {
    let dir = tempfile::tempdir().unwrap();
    let node = start_node(dir.path(), |_| {}).await;
    let mut a = admin(&node.admin_socket).await;
    // 7 entries under PARENT (two with the same SPIFFE ID), 2 under another parent.
    for (i, parent) in std::iter::repeat_n(PARENT, 7)
        .chain(std::iter::repeat_n(
            "spiffe://dev.example.org/agent/host-2",
            2,
        ))
        .enumerate()
    {
        let id = format!("spiffe://{TD}/service/s{}", i.min(5));
        a.create_entry(CreateEntryRequest {
            entry: Some(entry(&id, parent, &[&format!("unix:uid:{i}")])),
        })
        .await
        .unwrap();
    }
    for i in 0..3 {
        new_agent(&node, &format!("spiffe://{TD}/agent/a{i}")).await;
    }

    let all = a
        .list_entries(ListEntriesRequest::default())
        .await
        .unwrap()
        .into_inner();
    assert_eq!(all.entries.len(), 9);
    assert!(all.next_page_token.is_empty(), "everything fits one answer");

    // Pages of 2, with and without a filter.
    for (parent, expect) in [("", 9), (PARENT, 7)] {
        let mut pages = Vec::new();
        let mut token = String::new();
        loop {
            let page = a
                .list_entries(ListEntriesRequest {
                    parent_id: parent.into(),
                    page_size: 2,
                    page_token: token,
                    ..Default::default()
                })
                .await
                .unwrap()
                .into_inner();
            assert!(page.entries.len() <= 2);
            pages.push(page.entries);
            if page.next_page_token.is_empty() {
                break;
            }
            token = page.next_page_token;
            assert!(pages.len() < 20, "paging does not end");
        }
        let listed: Vec<_> = pages.concat();
        let want: Vec<_> = all
            .entries
            .iter()
            .filter(|e| parent.is_empty() || e.parent_id == parent)
            .cloned()
            .collect();
        assert_eq!(listed.len(), expect);
        assert_eq!(listed, want, "pages of 2 under {parent:?}");
        assert_eq!(pages.len(), expect / 2 + 1, "full pages, then the rest");
    }

    // Agents (the 3 made above), in pages of 2.
    let first = a
        .list_agents(ListAgentsRequest {
            page_size: 2,
            page_token: String::new(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(first.agents.len(), 2);
    let second = a
        .list_agents(ListAgentsRequest {
            page_size: 2,
            page_token: first.next_page_token,
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(second.agents.len(), 1);
    assert!(second.next_page_token.is_empty());
    let ids: Vec<_> = first
        .agents
        .iter()
        .chain(&second.agents)
        .map(|a| a.spiffe_id.clone())
        .collect();
    let want: Vec<_> = (0..3)
        .map(|i| format!("spiffe://{TD}/agent/a{i}"))
        .collect();
    assert_eq!(ids, want);

    // Bad paging input.
    for (size, token, needle) in [
        (-1, "", "page_size must be between 1 and 10000"),
        (10_001, "", "page_size must be between 1 and 10000"),
        (2, "zz-not-hex", "page_token is not one this API gave out"),
        (2, "6f6e65", "page_token is not one this API gave out"), // "one": no separator
    ] {
        assert_status(
            a.list_entries(ListEntriesRequest {
                page_size: size,
                page_token: token.into(),
                ..Default::default()
            })
            .await,
            Code::InvalidArgument,
            &[needle],
        );
    }
    assert_status(
        a.list_agents(ListAgentsRequest {
            page_size: -5,
            page_token: String::new(),
        })
        .await,
        Code::InvalidArgument,
        &["page_size"],
    );
    node.shutdown().await;
}
