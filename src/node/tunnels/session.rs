//! A tunnel client's connection to this node: the hello (names, token),
//! registration of each name in the DHT, the session that renews the leases,
//! answers peer-sample requests and pushes down notices, and the detach when
//! the connection ends or the client asks for it.

use std::sync::{Arc, PoisonError};
use std::time::Duration;

use quinn::{Connection, SendStream};
use rand::seq::SliceRandom;
use specter_dht::{ClientId, Outcome, Peer, WriteOp};
use specter_tunnel::names;
use specter_tunnel::protocol::{
    ClientMsg, MAX_NAMES_PER_CLIENT, NodeMsg, RefuseCode, TUNNEL_PROTOCOL_VERSION,
};
use tokio_util::sync::CancellationToken;

use super::quota::Exceeded;
use super::{LEASE, REASSERT_AFTER, RENEW, Tunnels};
use crate::clock::now_ms;
use crate::net::tls::peer_client_id;
use crate::node::membership::READY_WAIT;
use crate::node::membership::{MemberChange, Update};
use crate::wire::{
    CLOSE_DETACH_CUT, CLOSE_DETACHED, CLOSE_REFUSED, CLOSE_REPLACED, FrameReader, read_frame,
    write_msg,
};

/// A client must send its hello this soon after connecting.
pub const HELLO_TIMEOUT: Duration = Duration::from_secs(10);
/// Nodes in a peer sample.
pub const PEER_SAMPLE: usize = 8;
/// A client's peer-sample requests are answered at most this often; those
/// that come in between are answered together, once the gap has passed. A
/// client asks at most once a second when it is short of nodes, and after
/// each down notice (a burst when several nodes die at once); without a
/// gap, one client asking in a loop would keep a core busy sampling and
/// encoding members.
pub const PEERS_ANSWER_GAP: Duration = Duration::from_millis(250);
/// A lease renewal that could not be stored (the DHT was unreachable) is
/// tried again this soon, well inside [`LEASE`], instead of at the next
/// [`RENEW`].
pub const RENEW_RETRY: Duration = Duration::from_secs(2);
/// After a refusal is written, how long the client gets to read it before the
/// connection closes.
const REFUSAL_LINGER: Duration = Duration::from_secs(2);
/// A client that asked to detach closes its connection once the streams
/// open on it have ended (it waits at most
/// [`crate::client::DETACH_DRAIN`]); the node keeps its side open that long
/// and a little more, so that the client, not the node, closes it: a close
/// drops whatever the closing side has not sent yet. Past this, the
/// connection is closed with what is left on it.
pub const DETACH_LINGER: Duration = Duration::from_secs(crate::client::DETACH_DRAIN.as_secs() + 20);
/// Detached connections one client key may keep open at a node for their
/// streams: a stop or a trimmed spare detaches one connection per node, and
/// a few more cover a client trimmed again soon after it re-attached
/// (within [`DETACH_LINGER`]). Past it the oldest is closed, so a key that
/// attaches and detaches in a loop cannot pile connections up here.
pub const LINGERING_PER_CLIENT: usize = 4;

/// Whether the client closed `conn` with visitor streams still open
/// ([`CLOSE_DETACH_CUT`]).
fn closed_with_cut(conn: &Connection) -> bool {
    matches!(conn.close_reason(),
        Some(quinn::ConnectionError::ApplicationClosed(c)) if c.error_code == CLOSE_DETACH_CUT)
}

impl Tunnels {
    /// Serves one client connection until it closes or `stop` fires.
    pub async fn serve_client(self: Arc<Self>, conn: Connection, stop: CancellationToken) {
        let remote = conn.remote_address();
        let Some(client) = peer_client_id(&conn) else {
            conn.close(CLOSE_REFUSED, b"no client certificate");
            return;
        };
        let accepted = tokio::time::timeout(HELLO_TIMEOUT, async {
            let (send, mut recv) = conn.accept_bi().await.ok()?;
            let hello: ClientMsg = read_frame(&mut recv).await.ok()?;
            Some((send, recv, hello))
        })
        .await;
        let Ok(Some((mut send, recv, hello))) = accepted else {
            tracing::info!(%remote, "client sent no hello in time");
            conn.close(CLOSE_REFUSED, b"no hello");
            return;
        };
        // A node that has not joined yet would store the registration where
        // no other node looks: the client takes its other nodes meanwhile.
        let registered = if self.ready.wait(READY_WAIT).await {
            self.register(client, hello).await
        } else {
            Err((RefuseCode::Unavailable, None))
        };
        let mut names = match registered {
            Ok(names) => names,
            Err((code, name)) => {
                tracing::info!(%remote, %client, ?name, %code, "refused client");
                let _ = write_msg(&mut send, &NodeMsg::Refused { code, name }).await;
                let _ = send.finish();
                // Give the refusal time to arrive before closing.
                let _ = tokio::time::timeout(REFUSAL_LINGER, conn.closed()).await;
                return;
            }
        };
        crate::net::quic::prove_client(&conn);
        self.attach_here(client, &names, &conn);
        tracing::info!(%remote, %client, ?names, "client attached");
        let welcome = NodeMsg::Welcome {
            node: self.me,
            ingress: self.public.get().cloned(),
        };
        let mut detaching = false;
        if write_msg(&mut send, &welcome).await.is_ok() {
            let mut control = FrameReader::new(recv);
            detaching = self
                .session(&conn, client, &mut names, &mut send, &mut control, &stop)
                .await;
        }
        if !detaching && closed_with_cut(&conn) {
            // Told to stop twice before its `Detach` left: the client cut
            // its visitors without asking, and says so in its close.
            // (Counted before it is forgotten here, which `/metrics` shows.)
            self.detaches_cut
                .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        }
        let gone = self.detach_here(&names, &conn);
        if let Some(evict) = self.on_detach.get() {
            names.iter().for_each(|n| evict(n, None));
        }
        // No new visitor comes over this connection now: a client that
        // asked to detach reads this end, then waits for the streams still
        // open before it closes.
        let _ = send.finish();
        tracing::info!(%remote, %client, ?names, "client detached");
        for n in &gone {
            // The client may have reconnected here while we waited on the DHT:
            // a detach now would tombstone its fresh attachment.
            if !self.local(n).is_empty() {
                continue;
            }
            let op = WriteOp::Detach {
                client,
                node: self.me.id,
                version: now_ms(),
            };
            let _ = self.dht.put(n, op).await;
        }
        if detaching {
            self.linger(&conn, client, &stop).await;
        }
    }

    /// Holds a detached client connection until its client closes it (once
    /// its streams have ended, or cut at its deadline), or [`DETACH_LINGER`],
    /// or `stop`; counts the detaches that cut a visitor.
    async fn linger(&self, conn: &Connection, client: ClientId, stop: &CancellationToken) {
        use std::sync::atomic::Ordering::Relaxed;
        let oldest = {
            let mut lingering = self
                .lingering
                .lock()
                .unwrap_or_else(PoisonError::into_inner);
            let list = lingering.entry(client).or_default();
            // Closed ones are on their way out (their own task counts them).
            list.retain(|c| c.close_reason().is_none());
            list.push_back(conn.clone());
            (list.len() > LINGERING_PER_CLIENT)
                .then(|| list.pop_front())
                .flatten()
        };
        if let Some(old) = oldest {
            // Closed here before its client closed it: counted as cut here,
            // not again by its own task (which sees a local close).
            self.detaches_cut.fetch_add(1, Relaxed);
            tracing::info!(remote = %old.remote_address(), %client, "closed the oldest detached connection of a client past {LINGERING_PER_CLIENT}");
            old.close(
                CLOSE_REPLACED,
                b"too many detached connections of this client",
            );
        }
        self.detaching.fetch_add(1, Relaxed);
        tokio::select! {
            _ = conn.closed() => {
                // The client closed with visitor streams still open.
                if closed_with_cut(conn) {
                    self.detaches_cut.fetch_add(1, Relaxed);
                }
            }
            () = stop.cancelled() => {}
            () = tokio::time::sleep(DETACH_LINGER) => {
                self.detaches_cut.fetch_add(1, Relaxed);
                tracing::info!(remote = %conn.remote_address(), "detached client kept its connection past the deadline; closed");
                conn.close(CLOSE_DETACHED, b"detach deadline");
            }
        }
        self.detaching.fetch_sub(1, Relaxed);
        let mut lingering = self
            .lingering
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        if let Some(list) = lingering.get_mut(&client) {
            list.retain(|c| c.stable_id() != conn.stable_id());
            if list.is_empty() {
                lingering.remove(&client);
            }
        }
    }

    /// Lists `conn` under `names`, dropping the client's older connections
    /// here: the owner reconnected, so those are stale (it restarted or lost
    /// its network), and waiting for their idle timeout would only delay.
    fn attach_here(&self, client: ClientId, names: &[String], conn: &Connection) {
        let mut attached = self.attached.lock().unwrap_or_else(PoisonError::into_inner);
        for n in names {
            let conns = attached.entry(n.clone()).or_default();
            for old in conns.iter().filter(|c| peer_client_id(c) == Some(client)) {
                old.close(
                    CLOSE_REPLACED,
                    b"replaced by a newer connection of the same client",
                );
            }
            conns.retain(|c| peer_client_id(c) != Some(client) && c.close_reason().is_none());
            conns.push(conn.clone());
        }
    }

    /// Takes `conn` off `names`; returns the names no connection holds here
    /// any more (a reconnect may already have replaced this one).
    fn detach_here(&self, names: &[String], conn: &Connection) -> Vec<String> {
        let mut gone = Vec::new();
        let mut attached = self.attached.lock().unwrap_or_else(PoisonError::into_inner);
        for n in names {
            if let Some(conns) = attached.get_mut(n) {
                conns.retain(|c| c.stable_id() != conn.stable_id());
                if conns.is_empty() {
                    attached.remove(n);
                    gone.push(n.clone());
                }
            }
        }
        gone
    }

    /// The attached session; true when it ended at the client's request
    /// ([`ClientMsg::Detach`]).
    async fn session(
        &self,
        conn: &Connection,
        client: ClientId,
        names: &mut Vec<String>,
        send: &mut SendStream,
        control: &mut FrameReader,
        stop: &CancellationToken,
    ) -> bool {
        let since = std::time::Instant::now();
        let mut renew = tokio::time::interval(RENEW);
        renew.tick().await;
        // A sample is owed from `next_sample` on (see PEERS_ANSWER_GAP).
        let mut next_sample = tokio::time::Instant::now();
        let mut owed = false;
        let mut members = self.members.subscribe();
        loop {
            tokio::select! {
                biased;
                () = stop.cancelled() => return false,
                _ = conn.closed() => return false,
                update = members.next() => match update {
                    None => return false,
                    Some(Update::Change(MemberChange::Down(peer))) => {
                        let down = NodeMsg::Down { nodes: vec![peer.id] };
                        if write_msg(send, &down).await.is_err() {
                            return false;
                        }
                    }
                    Some(Update::Change(MemberChange::Up(_)) | Update::Resync(_)) => {
                        // A node came (back): records may have a new owner,
                        // or one that dropped this attachment when it took
                        // us for dead. Renew soon, once the ring settled.
                        renew.reset_after(REASSERT_AFTER);
                    }
                },
                _ = renew.tick() => {
                    if !self.renew(conn, client, names, send, &mut renew, since).await {
                        return false;
                    }
                }
                () = tokio::time::sleep_until(next_sample), if owed => {
                    owed = false;
                    next_sample = tokio::time::Instant::now() + PEERS_ANSWER_GAP;
                    let nodes = self.peer_sample();
                    if write_msg(send, &NodeMsg::Peers { nodes }).await.is_err() {
                        return false;
                    }
                }
                // Cancel-safe: a frame split across packets survives the
                // other branches firing.
                msg = control.next::<ClientMsg>() => match msg {
                    Ok(ClientMsg::Peers) => {
                        if owed {
                            self.peers_coalesced.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                        }
                        owed = true;
                    }
                    Ok(ClientMsg::Detach) => {
                        tracing::info!(%client, "client detaching; its open streams run to their end");
                        return true;
                    }
                    Ok(ClientMsg::Hello { .. }) | Err(_) => return false,
                },
            }
        }
    }

    /// Renews every name's lease. A name another client now holds is
    /// detached here and the client told; a renewal the DHT could not store
    /// is retried after [`RENEW_RETRY`]. False when the session should end
    /// (nothing left attached, or the client is gone).
    async fn renew(
        &self,
        conn: &Connection,
        client: ClientId,
        names: &mut Vec<String>,
        send: &mut SendStream,
        renew: &mut tokio::time::Interval,
        since: std::time::Instant,
    ) -> bool {
        let mut taken = Vec::new();
        let mut retry = false;
        for n in names.iter() {
            match self.attach(client, n, since.elapsed()).await {
                Ok(()) => {}
                Err(RefuseCode::NameTaken) => taken.push(n.clone()),
                Err(code) => {
                    tracing::warn!(tunnel = %n, %client, %code, "lease renewal failed; retrying");
                    retry = true;
                }
            }
        }
        if retry {
            renew.reset_after(RENEW_RETRY);
        }
        for n in taken {
            tracing::warn!(tunnel = %n, %client, "name now claimed by another client; detaching it");
            names.retain(|m| *m != n);
            // Locally only: the record belongs to its new owner.
            self.detach_here(std::slice::from_ref(&n), conn);
            let refused = NodeMsg::Refused {
                code: RefuseCode::NameTaken,
                name: Some(n),
            };
            if write_msg(send, &refused).await.is_err() {
                return false;
            }
        }
        !names.is_empty()
    }

    fn peer_sample(&self) -> Vec<Peer> {
        let mut nodes = self.members.live();
        nodes.push(self.me);
        nodes.shuffle(&mut rand::rng());
        nodes.truncate(PEER_SAMPLE);
        nodes
    }

    /// Claims and attaches `name` here for `client`, whose session has been
    /// attached for `attached_for` (how long the claim then outlives it:
    /// see [`super::quota::ClientLimits::claim_for`]).
    async fn attach(
        &self,
        client: ClientId,
        name: &str,
        attached_for: Duration,
    ) -> Result<(), RefuseCode> {
        let claim = self.clients.claim_for(attached_for);
        let op = WriteOp::Attach {
            client,
            node: self.me.id,
            addr: self.me.addr,
            version: now_ms(),
            lease_ms: u64::try_from(LEASE.as_millis()).unwrap_or(u64::MAX),
            claim_ms: u64::try_from(claim.as_millis()).unwrap_or(u64::MAX),
        };
        match self.dht.put(name, op).await {
            Some((Outcome::Wrote { .. }, _)) => {
                self.routes.invalidate(name);
                Ok(())
            }
            Some((
                Outcome::Refused(specter_dht::messages::ErrorCode::Write(
                    specter_dht::WriteError::NameTaken(_),
                )),
                _,
            )) => Err(RefuseCode::NameTaken),
            _ => Err(RefuseCode::Unavailable),
        }
    }

    async fn register(
        &self,
        client: ClientId,
        hello: ClientMsg,
    ) -> Result<Vec<String>, (RefuseCode, Option<String>)> {
        let ClientMsg::Hello {
            version,
            names,
            token,
        } = hello
        else {
            return Err((RefuseCode::Version, None));
        };
        if version != TUNNEL_PROTOCOL_VERSION {
            return Err((RefuseCode::Version, None));
        }
        if names.is_empty() || names.len() > MAX_NAMES_PER_CLIENT {
            return Err((
                RefuseCode::NameCount {
                    max: MAX_NAMES_PER_CLIENT,
                },
                None,
            ));
        }
        for n in &names {
            names::validate(n).map_err(|_| (RefuseCode::InvalidName, Some(n.clone())))?;
        }
        let token_cas = self
            .token_cas
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone();
        if let Some(cas) = &token_cas {
            let now = now_ms() / 1_000;
            let token = token.ok_or((RefuseCode::Unauthorized, None))?;
            let valid = cas
                .iter()
                .any(|ca| crate::token::verify(ca, &token, now, &names).is_ok());
            if !valid {
                return Err((RefuseCode::Unauthorized, None));
            }
        }
        let held = self.held_by(client);
        self.quotas
            .admit(
                &self.clients,
                client,
                &names,
                &held,
                std::time::Instant::now(),
            )
            .map_err(|exceeded| {
                let code = match exceeded {
                    Exceeded::Names(max) => RefuseCode::TooManyNames { max },
                    Exceeded::Rate(per_minute) => RefuseCode::TooManyNewNames { per_minute },
                };
                (code, None)
            })?;
        for n in &names {
            self.attach(client, n, Duration::ZERO)
                .await
                .map_err(|code| (code, Some(n.clone())))?;
        }
        Ok(names)
    }

    /// The names `client` holds attached here.
    fn held_by(&self, client: ClientId) -> Vec<String> {
        let attached = self.attached.lock().unwrap_or_else(PoisonError::into_inner);
        attached
            .iter()
            .filter(|(_, conns)| conns.iter().any(|c| peer_client_id(c) == Some(client)))
            .map(|(name, _)| name.clone())
            .collect()
    }
}
