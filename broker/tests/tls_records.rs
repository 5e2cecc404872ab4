//! The TLS record layer of a broker connection still reassembles, splits
//! and polices records after the vendored rustls patch (see
//! `third_party/rustls/CREDSTREAM_PATCHES.md`).
//!
//! The patch changes how rustls' receive buffer (`DeframerVecBuffer`) is
//! filled and emptied: while nothing is buffered it reads into a stack
//! array and keeps only the bytes that arrived, and it frees the buffer
//! whenever everything in it has been consumed. So every read now starts
//! either on that new path or on the old one with a freshly trimmed
//! buffer, and each test here drives one way that could go wrong: a
//! record that arrives a byte at a time (the buffer is emptied and grown
//! around partial headers and partial bodies), many records in one read
//! (the buffer is consumed and freed again and again), and a header that
//! announces more than TLS allows (the length check must still run on the
//! stack path). The server side is always the broker's own acceptor
//! (`credstream_broker::tls::acceptor`), so the configuration under test is
//! the one the broker ships.

mod common;

use std::io;
use std::pin::Pin;
use std::task::{Context, Poll, ready};

use common::tls::{handshake, pki, round_trip, within_guard};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio_rustls::rustls;

/// Room for everything a test writes before the other side reads, so that
/// a writer never waits for a reader it is meant to run ahead of.
const PIPE: usize = 1 << 20;

/// `len` bytes that differ from their neighbours and repeat every 251
/// bytes, a period no record or read size divides, so a byte that is
/// lost, repeated or moved shows.
fn pattern(len: usize) -> Vec<u8> {
    (0..len).map(|i| (i % 251) as u8).collect()
}

/// A transport that hands rustls at most `max_read` bytes per read and
/// counts the reads, so a test can both force fragmentation and check
/// that what it meant to happen on the wire did happen.
struct MeteredReads<T> {
    io: T,
    max_read: usize,
    reads: usize,
    bytes: usize,
}

impl<T> MeteredReads<T> {
    fn new(io: T, max_read: usize) -> Self {
        Self {
            io,
            max_read,
            reads: 0,
            bytes: 0,
        }
    }
}

impl<T: AsyncRead + Unpin> AsyncRead for MeteredReads<T> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let room = buf.remaining().min(this.max_read);
        let mut limited = ReadBuf::new(buf.initialize_unfilled_to(room));
        ready!(Pin::new(&mut this.io).poll_read(cx, &mut limited))?;
        let n = limited.filled().len();
        buf.advance(n);
        if n > 0 {
            this.reads += 1;
            this.bytes += n;
        }
        Poll::Ready(Ok(()))
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for MeteredReads<T> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().io).poll_write(cx, buf)
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_shutdown(cx)
    }
}

#[tokio::test]
async fn records_that_arrive_one_byte_at_a_time_are_reassembled() {
    let pki = pki();
    let (client_io, server_io) = tokio::io::duplex(PIPE);
    let (mut server, mut client) =
        handshake(&pki, MeteredReads::new(server_io, 1), client_io).await;

    // Several full 16 KiB records and a partial one, then records far
    // smaller than one read, each flushed on its own.
    let mut sent = pattern(100_000);
    let tails: [&[u8]; 3] = [b"a", b"tail of two", b"the last small write"];
    let expected_len = sent.len() + tails.iter().map(|t| t.len()).sum::<usize>();

    let client_side = async {
        client.write_all(&sent).await.unwrap();
        client.flush().await.unwrap();
        for tail in tails {
            client.write_all(tail).await.unwrap();
            client.flush().await.unwrap();
        }
        let mut echoed = vec![0u8; expected_len];
        client.read_exact(&mut echoed).await.unwrap();
        echoed
    };
    let server_side = async {
        let mut received = vec![0u8; expected_len];
        server.read_exact(&mut received).await.unwrap();
        server.write_all(&received).await.unwrap();
        server.flush().await.unwrap();
        received
    };
    let (echoed, received) = within_guard("the transfer", async {
        tokio::join!(client_side, server_side)
    })
    .await;

    for tail in tails {
        sent.extend_from_slice(tail);
    }
    // `assert!`, not `assert_eq!`: a failure should not print 100 kB twice.
    assert!(
        received == sent,
        "the server received exactly what was sent"
    );
    assert!(echoed == sent, "the client received exactly the echo");
    let transport = server.get_ref().0;
    assert_eq!(
        transport.reads, transport.bytes,
        "every read carried one byte"
    );
    assert!(
        transport.bytes > sent.len(),
        "the records (with their headers and tags) all came one byte at a time: {} bytes",
        transport.bytes
    );
}

#[tokio::test]
async fn many_records_in_one_read_are_all_delivered() {
    const MESSAGES: usize = 200;
    let pki = pki();
    let (client_io, server_io) = tokio::io::duplex(PIPE);
    let (mut server, mut client) =
        handshake(&pki, MeteredReads::new(server_io, usize::MAX), client_io).await;

    // Each message is written and flushed alone, so each is its own record,
    // and all of them are queued in the pipe before the server reads one.
    let mut sent = Vec::new();
    within_guard("the client's writes", async {
        for i in 0..MESSAGES {
            let message = format!("message {i} of {MESSAGES};");
            client.write_all(message.as_bytes()).await.unwrap();
            client.flush().await.unwrap();
            sent.extend_from_slice(message.as_bytes());
        }
    })
    .await;

    let reads_before = server.get_ref().0.reads;
    let mut received = vec![0u8; sent.len()];
    within_guard("the server's reads", server.read_exact(&mut received))
        .await
        .unwrap();

    assert!(
        received == sent,
        "the server received every message, in order"
    );
    let reads = server.get_ref().0.reads - reads_before;
    assert!(
        reads < MESSAGES,
        "{MESSAGES} records arrived in {reads} reads, so reads carried several records"
    );
}

/// The header of a TLS 1.2/1.3 application data record announcing 18,433
/// bytes: more than TLS 1.3 allows (2^14 + 256) and more than rustls
/// accepts (under 2^14 + 2048, TLS 1.2's limit).
const OVERSIZED_RECORD_HEADER: [u8; 5] = [0x17, 0x03, 0x03, 0x48, 0x01];

#[tokio::test]
async fn a_record_longer_than_tls_allows_is_refused() {
    let pki = pki();
    let (client_io, server_io) = tokio::io::duplex(PIPE);
    let (mut server, mut client) = handshake(&pki, server_io, client_io).await;
    // Records before the bad one are delivered: the patch must not make
    // rustls refuse good data either.
    round_trip(&mut server, &mut client).await;

    // Past the client's TLS layer, straight onto the wire.
    let raw = client.get_mut().0;
    let mut bad = OVERSIZED_RECORD_HEADER.to_vec();
    bad.extend_from_slice(&[0xab; 64]);
    raw.write_all(&bad).await.unwrap();
    raw.flush().await.unwrap();

    let mut buf = [0u8; 256];
    let refused = within_guard("the server's read of the bad record", server.read(&mut buf))
        .await
        .expect_err("the server refuses the record instead of returning data");
    eprintln!("the server's read failed with: {refused}");
    assert_eq!(refused.kind(), io::ErrorKind::InvalidData);
    let cause = refused
        .get_ref()
        .and_then(|e| e.downcast_ref::<rustls::Error>());
    assert_eq!(
        cause,
        Some(&rustls::Error::InvalidMessage(
            rustls::InvalidMessage::MessageTooLarge
        )),
        "refused for its length, not for something else"
    );

    // The acceptor, and whatever the refusal did to shared state, still
    // serves a well-behaved connection.
    let (client_io, server_io) = tokio::io::duplex(PIPE);
    let (mut server, mut client) = handshake(&pki, server_io, client_io).await;
    round_trip(&mut server, &mut client).await;
}
