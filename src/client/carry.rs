//! Carrying one visitor: the node opened a stream and wrote a [`Visit`]
//! header; dial the tunnel's local target, write the header's early bytes
//! (the visitor's request, sent without waiting for us), answer `Ready` (or
//! `TargetRefused`), then splice.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use specter_tunnel::protocol::{Visit, VisitReply};
use tokio::io::AsyncWriteExt;

use super::target::Target;
use crate::wire::{break_stream, read_frame, write_frame, write_msg};

/// A visitor stream must deliver its header this soon.
const VISIT_HEADER_TIMEOUT: Duration = Duration::from_secs(10);

/// A target that has not accepted a connection by then is reported as
/// refused. Long enough for two SYN retransmits (1 s, then 2 s more) when a
/// burst overflows the target's accept queue; well below the node's 10 s
/// deadline for an answer.
const TARGET_CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

/// The visitor's early bytes (a request head, at most 64 KiB) must be taken
/// by a target just connected this soon: a socket buffer takes them at once
/// unless the target never reads. With the connect, well inside the node's
/// 10 s wait for `Ready`.
const EARLY_WRITE_TIMEOUT: Duration = Duration::from_secs(2);

/// Carries one visitor: reads the header, dials the target, splices.
pub(super) async fn carry(
    mut send: quinn::SendStream,
    mut recv: quinn::RecvStream,
    targets: Arc<HashMap<String, Target>>,
) {
    let header = tokio::time::timeout(VISIT_HEADER_TIMEOUT, read_frame::<Visit>(&mut recv));
    let visit = match header.await {
        Ok(Ok(v)) => v,
        _ => return,
    };
    if let Err(why) = visit.check() {
        tracing::warn!(tunnel = %visit.name, "malformed visit header: {why}");
        break_stream(&mut send, &mut recv);
        return;
    }
    let Some(target) = targets.get(&visit.name) else {
        tracing::warn!(tunnel = %visit.name, "visit for a tunnel this client does not serve");
        let _ = write_frame(&mut send, &VisitReply::TargetRefused).await;
        return;
    };
    // Answer well inside the node's wait for `Ready`, so a target that drops
    // connection attempts is reported as refused instead of making the node
    // give up on this whole attachment.
    let connecting = tokio::time::timeout(
        TARGET_CONNECT_TIMEOUT,
        tokio::net::TcpStream::connect(target.addr.as_str()),
    );
    let mut local = match connecting
        .await
        .unwrap_or_else(|_| Err(std::io::ErrorKind::TimedOut.into()))
    {
        Ok(s) => s,
        Err(err) => {
            tracing::warn!(tunnel = %visit.name, visitor = %visit.visitor, kind = ?visit.kind, target = %target.addr, %err, "target refused the visitor");
            let _ = write_frame(&mut send, &VisitReply::TargetRefused).await;
            return;
        }
    };
    let _ = local.set_nodelay(true);
    // Bounded: a target that accepts and never reads must not hold the
    // stream after the node gave up on it.
    let early = tokio::time::timeout(EARLY_WRITE_TIMEOUT, local.write_all(&visit.early));
    if let Err(err) = early
        .await
        .unwrap_or_else(|_| Err(std::io::ErrorKind::TimedOut.into()))
    {
        tracing::warn!(tunnel = %visit.name, visitor = %visit.visitor, target = %target.addr, %err, "target closed before taking the visitor's first bytes");
        let _ = write_frame(&mut send, &VisitReply::TargetRefused).await;
        return;
    }
    if write_msg(&mut send, &VisitReply::Ready).await.is_err() {
        return;
    }
    // The node stops reading when its end gives up (its splice's stall
    // deadline, its visitor gone): with a target that never answers, a
    // half-closed splice would otherwise wait on the target for good.
    let spliced = crate::wire::splice_stream(
        &mut send,
        &mut recv,
        &mut local,
        specter_tunnel::splice::SPLICE_STALL,
    );
    match spliced.await {
        Ok(_) => {
            // Still counted until the node has acknowledged the last bytes
            // (a detaching attachment closes once nothing is counted, and a
            // close drops what the node has not acknowledged), or stopped
            // the stream, or the connection ended. Bytes the node does not
            // take end in a reset at its splice's stall deadline, and a
            // silent node at the idle timeout, so this wait is bounded.
            drop(local);
            let _ = send.stopped().await;
        }
        Err(err) => {
            // Not a clean end: the node (and the visitor) must see a reset,
            // and the target a closed connection.
            if specter_tunnel::splice::far_side_gone(&err) {
                // The node's choice (its end gave up, or it let an idle
                // pooled upstream go): nothing went wrong here.
                tracing::debug!(tunnel = %visit.name, visitor = %visit.visitor, "the node stopped reading the visitor stream; closed");
            } else {
                tracing::info!(tunnel = %visit.name, visitor = %visit.visitor, %err, "visitor stream broken mid-way; reset");
            }
            break_stream(&mut send, &mut recv);
        }
    }
}
