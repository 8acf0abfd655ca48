//! Reloading a running node (SIGHUP, `POST /reload`, `specter reload`): the
//! config file and every certificate and key file are read again; the
//! certificates apply to new connections, and settings that only a restart
//! can change are reported, not applied. Anything that does not load leaves
//! the running node exactly as it was.

use std::sync::{Arc, Mutex, PoisonError};

use serde::Serialize;

use crate::config::NodeConfig;
use crate::ingress::{Edge, Ingress};
use crate::net::Transport;
use crate::net::tls::NodeTls;
use crate::node::tunnels::Tunnels;

/// Reads the node's configuration again, as it was read at start (the
/// command line's flags over the config file) and loads its node
/// certificate, key and CA.
pub type ReloadSource = Box<dyn Fn() -> anyhow::Result<(NodeConfig, NodeTls)> + Send + Sync>;

/// What a reload changed.
#[derive(Clone, Debug, Serialize)]
pub struct ReloadReport {
    /// Files now used for new connections.
    pub reloaded: Vec<String>,
    /// Settings that differ in the file but take effect only at restart.
    pub needs_restart: Vec<&'static str>,
}

/// Reloads a running node from its [`ReloadSource`].
pub struct Reloader {
    source: ReloadSource,
    /// The settings in force (the certificate paths follow reloads; the
    /// rest are the ones the node started with).
    running: Mutex<NodeConfig>,
    transport: Arc<Transport>,
    ingress: Arc<Ingress>,
    tunnels: Arc<Tunnels>,
}

impl Reloader {
    pub(super) fn new(
        source: ReloadSource,
        running: NodeConfig,
        transport: Arc<Transport>,
        ingress: Arc<Ingress>,
        tunnels: Arc<Tunnels>,
    ) -> Self {
        Reloader {
            source,
            running: Mutex::new(running),
            transport,
            ingress,
            tunnels,
        }
    }

    /// Reads everything again and applies what loads, or nothing. Logs one
    /// line either way.
    pub fn reload(&self) -> Result<ReloadReport, String> {
        let outcome = self.try_reload();
        match &outcome {
            Ok(report) if report.needs_restart.is_empty() => {
                tracing::info!(reloaded = ?report.reloaded, "reloaded");
            }
            Ok(report) => tracing::warn!(
                reloaded = ?report.reloaded,
                needs_restart = ?report.needs_restart,
                "reloaded; the changed settings listed take effect at restart"
            ),
            Err(err) => tracing::warn!(%err, "reload refused; the running settings stay"),
        }
        outcome
    }

    fn try_reload(&self) -> Result<ReloadReport, String> {
        // One reload at a time, so two cannot interleave their halves.
        let mut running = self.running.lock().unwrap_or_else(PoisonError::into_inner);
        let (config, tls) = (self.source)().map_err(|e| format!("{e:#}"))?;
        // Everything is loaded and checked before anything is applied; after
        // `set_tls` (which checks the key is this node's before it changes
        // anything) nothing can fail.
        let edge = match (&running.ingress, &config.ingress) {
            (Some(now), Some(next)) => Some(
                Edge::load(&now.domain, &next.edge_cert, &next.edge_key)
                    .map_err(|e| format!("edge certificate: {e:#}"))?,
            ),
            _ => None,
        };
        self.transport
            .set_tls(&tls)
            .map_err(|e| format!("{}: {e}", config.key.display()))?;
        self.tunnels
            .set_token_cas(tls.ca_certs().iter().map(|c| c.to_vec()).collect());
        let mut reloaded = vec![
            config.ca.display().to_string(),
            config.cert.display().to_string(),
            config.key.display().to_string(),
        ];
        if let (Some(edge), Some(next)) = (edge, &config.ingress) {
            self.ingress.set_edge(edge);
            reloaded.push(next.edge_cert.display().to_string());
            reloaded.push(next.edge_key.display().to_string());
        }
        let needs_restart = crate::config::restart_needed(&running, &config);
        running.ca = config.ca;
        running.cert = config.cert;
        running.key = config.key;
        if let (Some(now), Some(next)) = (&mut running.ingress, config.ingress) {
            now.edge_cert = next.edge_cert;
            now.edge_key = next.edge_key;
        }
        Ok(ReloadReport {
            reloaded,
            needs_restart,
        })
    }
}
