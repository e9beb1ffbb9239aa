//! A workload process for the deployment test: takes its X.509-SVID and bundle from the
//! agent's Workload API (`SPIFFE_ENDPOINT_SOCKET`) and talks mutual TLS with a peer
//! ([`ca_test_support::mtls`]).
//!
//! `chaos-workload serve <listen addr> <peer SPIFFE ID>` or
//! `chaos-workload connect <server addr> <peer SPIFFE ID>`. Prints a line per failure
//! (`HANDSHAKE FAILED ...`) at once and `ok <n> failed <m>` every 200 ms; on SIGTERM the
//! last such line, then exits.
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use ca_test_support::mtls::{alice, bob, Traffic};
use spiffe::X509Source;

fn usage() -> std::process::ExitCode {
    eprintln!("usage: chaos-workload serve|connect <addr> <peer SPIFFE ID>");
    std::process::ExitCode::from(2)
}

fn report(traffic: &Traffic) {
    println!(
        "ok {} failed {}",
        traffic.ok.load(Ordering::SeqCst),
        traffic.failures.lock().map(|f| f.len()).unwrap_or(0)
    );
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() -> std::process::ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let [role, addr, peer] = args.as_slice() else {
        return usage();
    };
    let Ok(addr) = addr.parse::<std::net::SocketAddr>() else {
        return usage();
    };
    let source = loop {
        // The agent may not have this workload's SVID yet: keep asking.
        match X509Source::builder().build().await {
            Ok(s) => break Arc::new(s),
            Err(e) => {
                eprintln!("no SVID yet: {e}");
                tokio::time::sleep(Duration::from_millis(500)).await;
            }
        }
    };
    let traffic = Arc::new(Traffic::default());
    let task = match role.as_str() {
        "serve" => {
            let listener = match tokio::net::TcpListener::bind(addr).await {
                Ok(l) => l,
                Err(e) => {
                    eprintln!("cannot listen on {addr}: {e}");
                    return std::process::ExitCode::FAILURE;
                }
            };
            tokio::spawn(bob(listener, source, traffic.clone(), peer.clone()))
        }
        "connect" => tokio::spawn(alice(addr, source, traffic.clone(), peer.clone())),
        _ => return usage(),
    };
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .expect("a SIGTERM handler");
    let mut tick = tokio::time::interval(Duration::from_millis(200));
    loop {
        tokio::select! {
            _ = tick.tick() => report(&traffic),
            _ = term.recv() => break,
        }
    }
    traffic.stop.store(true, Ordering::SeqCst);
    task.abort();
    report(&traffic);
    std::process::ExitCode::SUCCESS
}
