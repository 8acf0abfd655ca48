//! Copying bytes between a visitor and a tunnel stream, both ways, keeping
//! half-close: when one side finishes sending, the other side's write half is
//! shut down (QUIC FIN, TCP FIN) and the opposite direction keeps flowing until
//! it finishes too. A service that reads a request to EOF before answering
//! works through the tunnel.

use tokio::io::{AsyncRead, AsyncWrite};

/// Buffer per direction. The 8 KiB default of `copy_bidirectional` costs
/// many more wake-ups per byte; 1 MiB measured ≈ 2.5× the throughput on a
/// TCP→QUIC→TCP relay on this project's machine (see DESIGN notes).
pub const SPLICE_BUFFER: usize = 1 << 20;

/// Bytes moved by a finished splice.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Spliced {
    /// From `a` to `b`.
    pub a_to_b: u64,
    /// From `b` to `a`.
    pub b_to_a: u64,
}

/// Copies `a → b` and `b → a` until both directions reached EOF, preserving
/// half-close. Returns the byte counts, or the first IO error.
pub async fn splice<A, B>(a: &mut A, b: &mut B) -> std::io::Result<Spliced>
where
    A: AsyncRead + AsyncWrite + Unpin + ?Sized,
    B: AsyncRead + AsyncWrite + Unpin + ?Sized,
{
    let (a_to_b, b_to_a) =
        tokio::io::copy_bidirectional_with_sizes(a, b, SPLICE_BUFFER, SPLICE_BUFFER).await?;
    Ok(Spliced { a_to_b, b_to_a })
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt, duplex};

    /// visitor ⇄ [splice] ⇄ service, where the service reads the whole
    /// request (to EOF) and only then answers.
    #[tokio::test]
    async fn a_service_that_answers_after_eof_works_through_the_splice() {
        let (mut visitor, mut relay_a) = duplex(64 * 1024);
        let (mut relay_b, mut service) = duplex(64 * 1024);
        let relay = tokio::spawn(async move { splice(&mut relay_a, &mut relay_b).await });
        let server = tokio::spawn(async move {
            let mut request = Vec::new();
            service.read_to_end(&mut request).await.unwrap();
            service.write_all(b"got ").await.unwrap();
            service.write_all(&request).await.unwrap();
            service.shutdown().await.unwrap();
        });
        visitor.write_all(b"hello").await.unwrap();
        visitor.shutdown().await.unwrap(); // half-close: still reading
        let mut answer = Vec::new();
        visitor.read_to_end(&mut answer).await.unwrap();
        assert_eq!(answer, b"got hello");
        server.await.unwrap();
        let moved = relay.await.unwrap().unwrap();
        assert_eq!(
            moved,
            Spliced {
                a_to_b: 5,
                b_to_a: 9
            }
        );
    }

    #[tokio::test]
    async fn large_transfers_arrive_intact_in_both_directions() {
        let (mut left, mut relay_a) = duplex(1 << 16);
        let (mut relay_b, mut right) = duplex(1 << 16);
        let relay = tokio::spawn(async move { splice(&mut relay_a, &mut relay_b).await });
        let data: Vec<u8> = (0..8_000_000u32).map(|i| (i * 31 % 251) as u8).collect();
        let expected = data.clone();
        let back = data.clone();
        let writer = tokio::spawn(async move {
            left.write_all(&data).await.unwrap();
            left.shutdown().await.unwrap();
            let mut echoed = Vec::new();
            left.read_to_end(&mut echoed).await.unwrap();
            echoed
        });
        let mut got = Vec::new();
        right.read_to_end(&mut got).await.unwrap();
        assert_eq!(got, expected);
        right.write_all(&back).await.unwrap();
        right.shutdown().await.unwrap();
        assert_eq!(writer.await.unwrap(), expected);
        let moved = relay.await.unwrap().unwrap();
        assert_eq!(moved.a_to_b, 8_000_000);
        assert_eq!(moved.b_to_a, 8_000_000);
    }
}
