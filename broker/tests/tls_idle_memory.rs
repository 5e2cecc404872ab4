//! An idle broker TLS connection holds no receive buffer: the point of the
//! vendored rustls patch (see `third_party/rustls/CREDSTREAM_PATCHES.md`).
//!
//! Unpatched, rustls keeps a 4 KiB receive buffer per connection for the
//! connection's whole life, allocated again by every read that finds
//! nothing buffered, including the read an idle connection leaves pending.
//! With many mostly idle agent connections per broker that is most of what
//! a connection costs, so this measures it rather than trusting the patch:
//! connections past the handshake, with one message read each way and a
//! read pending on the server, are dropped one by one and the heap they
//! return is counted.
//!
//! The heap is counted by this test binary's global allocator
//! (`stats_alloc`, as in `tests/tests/cluster_memory.rs`; the workspace
//! forbids the `unsafe` a counting allocator of our own would need). The
//! test has a file of its own, and runs on a current-thread runtime, so
//! that nothing else allocates in the process while it measures.

mod common;

use std::alloc::System;
use std::future::poll_fn;
use std::pin::Pin;
use std::task::Poll;

use common::tls::{Pki, handshake, pki, round_trip};
use stats_alloc::{INSTRUMENTED_SYSTEM, StatsAlloc};
use tokio::io::{AsyncRead, DuplexStream, ReadBuf};
use tokio_rustls::{client, server};

#[global_allocator]
static HEAP: &StatsAlloc<System> = &INSTRUMENTED_SYSTEM;

/// What one unpatched rustls receive buffer alone took: a connection that
/// returns less on drop cannot have been holding one.
const UNPATCHED_RECEIVE_BUFFER: isize = 4096;

/// Connections measured: enough that one odd allocation does not decide
/// the mean.
const CONNECTIONS: usize = 20;

/// Bytes allocated and not yet freed, process-wide.
fn live_bytes() -> isize {
    let stats = HEAP.stats();
    stats.bytes_allocated as isize - stats.bytes_deallocated as isize + stats.bytes_reallocated
}

/// A connection as an idle agent leaves it: past the handshake, one
/// message read by each side, and a read pending on the server's side
/// (the read that, unpatched, allocated the receive buffer again).
async fn idle_connection(
    pki: &Pki,
) -> (
    server::TlsStream<DuplexStream>,
    client::TlsStream<DuplexStream>,
) {
    let (client_io, server_io) = tokio::io::duplex(64 * 1024);
    let (mut server, mut client) = handshake(pki, server_io, client_io).await;
    round_trip(&mut server, &mut client).await;
    assert!(
        read_would_block(&mut server).await,
        "nothing more was sent, so the server's read waits"
    );
    (server, client)
}

/// Polls one read of `stream` and tells whether it is pending (nothing to
/// read yet), leaving the read registered with the transport.
async fn read_would_block(stream: &mut (impl AsyncRead + Unpin)) -> bool {
    poll_fn(|cx| {
        let mut byte = [0u8; 1];
        let mut buf = ReadBuf::new(&mut byte);
        Poll::Ready(Pin::new(&mut *stream).poll_read(cx, &mut buf).is_pending())
    })
    .await
}

#[tokio::test(flavor = "current_thread")]
async fn an_idle_server_connection_keeps_no_receive_buffer() {
    let pki = pki();
    let mut servers = Vec::with_capacity(CONNECTIONS);
    let mut clients = Vec::with_capacity(CONNECTIONS);
    for _ in 0..CONNECTIONS {
        let (server, client) = idle_connection(&pki).await;
        servers.push(server);
        clients.push(client);
    }

    // The pipes are shared with the client halves, which stay, so what a
    // drop returns is what the server's TLS connection owned.
    let mut freed = Vec::with_capacity(CONNECTIONS);
    while let Some(server) = servers.pop() {
        let before = live_bytes();
        drop(server);
        freed.push(before - live_bytes());
    }
    let mean = freed.iter().sum::<isize>() / CONNECTIONS as isize;
    eprintln!(
        "an idle server TLS connection held {mean} bytes on the heap (per connection: {freed:?})"
    );
    assert!(
        mean > 0,
        "dropping a connection frees its keys and state; a count of {mean} means nothing was measured"
    );
    assert!(
        mean < UNPATCHED_RECEIVE_BUFFER,
        "an idle server connection held {mean} bytes, as much as a receive buffer alone"
    );
    drop(clients);
}
