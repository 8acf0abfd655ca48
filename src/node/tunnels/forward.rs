//! Visitors that other nodes forward here (streams of kind `Forward`): read
//! the [`Visit`] header, pass it (early bytes and all) on a stream to the
//! tunnel's client attached here, answer `Ready` (or why not), then splice.

use std::sync::Arc;
use std::time::Duration;

use specter_tunnel::protocol::{Visit, VisitReply};
use tokio_util::sync::CancellationToken;

use super::Tunnels;
use super::visit::{OpenError, Path, Paths};
use crate::net::IncomingStream;
use crate::net::streams::StreamInbox;
use crate::wire::{
    STREAM_NOT_HERE, break_stream, read_frame, stopped_by_peer, write_frame, write_msg,
};

/// A forwarded stream must deliver its [`Visit`] header this soon.
pub const VISIT_HEADER_TIMEOUT: Duration = Duration::from_secs(10);

/// Serves forwarded visitors from `forwards` until `stop` fires.
pub async fn serve(tunnels: Arc<Tunnels>, mut forwards: StreamInbox, stop: CancellationToken) {
    loop {
        let stream = tokio::select! {
            biased;
            () = stop.cancelled() => return,
            s = forwards.recv() => match s {
                Some(s) => s,
                None => return,
            },
        };
        tokio::spawn(tunnels.clone().serve_forward(stream));
    }
}

impl Tunnels {
    /// Serves a forwarded visitor that another node sent here.
    async fn serve_forward(self: Arc<Self>, stream: IncomingStream) {
        let IncomingStream {
            peer,
            mut send,
            mut recv,
            held: _held,
        } = stream;
        let header = tokio::time::timeout(VISIT_HEADER_TIMEOUT, read_frame::<Visit>(&mut recv));
        let visit = match header.await {
            Ok(Ok(v)) if v.check().is_ok() => v,
            _ => {
                let _ = send.reset(STREAM_NOT_HERE);
                let _ = recv.stop(STREAM_NOT_HERE);
                return;
            }
        };
        let paths = Paths {
            queue: self
                .local(&visit.name)
                .into_iter()
                .map(Path::Local)
                .collect(),
            route_pending: false,
        };
        let mut client = match self.race(&visit.name, &visit, paths).await {
            Ok(pair) => pair,
            Err(OpenError::TargetRefused) => {
                let _ = write_frame(&mut send, &VisitReply::TargetRefused).await;
                return;
            }
            Err(_) => {
                tracing::info!(from = %peer, tunnel = %visit.name, "forwarded visitor for a tunnel not attached here");
                let _ = send.reset(STREAM_NOT_HERE);
                let _ = recv.stop(STREAM_NOT_HERE);
                return;
            }
        };
        if write_msg(&mut send, &VisitReply::Ready).await.is_err() {
            return;
        }
        // Either far end that stops reading ends both hops: an idle,
        // half-closed splice would never write to find out.
        let (entry_gone, client_gone) = (stopped_by_peer(&send), stopped_by_peer(&client.send));
        let gone = async move {
            tokio::select! {
                () = entry_gone => {}
                () = client_gone => {}
            }
        };
        // Copied through the splice's buffer, not relayed as quinn's chunks
        // (`wire::QuicEnd`): with 16 uploads at once, chunks moved between
        // the two streams doubled this node's peak RSS (README, Figures).
        let mut entry = tokio::io::join(&mut recv, &mut send);
        let spliced = specter_tunnel::splice::splice_watching(
            &mut entry,
            &mut client,
            specter_tunnel::splice::SPLICE_STALL,
            gone,
        )
        .await;
        if let Err(err) = spliced {
            // Both hops are reset: dropped, quinn would finish them cleanly
            // and a cut answer would look complete.
            self.forwards_broken
                .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            if specter_tunnel::splice::far_side_gone(&err) {
                // The entry or the client stopped reading: their choice.
                tracing::debug!(from = %peer, tunnel = %visit.name, %err, "forwarded stream ended by a far side; reset");
            } else {
                tracing::info!(from = %peer, tunnel = %visit.name, %err, "forwarded stream broken mid-way; reset");
            }
            break_stream(&mut send, &mut recv);
            client.reset();
        }
    }
}
